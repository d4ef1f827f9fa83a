"""Text for image-text tasks: captions from records, class prompts, and the tokenizer that
`data.tokenizer` names.

A record's text is its `data.caption_key` field (a string, UTF-8 bytes, or a list of them,
one picked at random per training example), or, with `data.caption_key = ""`, its class
label turned into a sentence by one of the `data.templates` (e.g. "a photo of a {}.").
The same templates, averaged over, give the zero-shot classifier (`vlmjax/evaluators/zeroshot.py`).

`data.tokenizer`:
  * "word": a word-level vocabulary trained on the train split's captions (or, for the
    decoder, on the record fields it reads: `prepare_tokenizer(cfg, fields=...)`). For `shapes`
    it is trained once and saved beside the prepared dataset; for other sources it is
    trained when a run first starts and saved in its workdir, whence later starts (resume,
    `vlmjax eval`, `vlmjax generate`) load it (`prepare_tokenizer`).
  * "sentencepiece:N": a SentencePiece unigram model of about N pieces trained on the same
    text (saved beside `shapes` like "word"); subwords, so unseen words still encode.
  * a path: a saved WordTokenizer JSON, or pretrained tokenizer files (see
    `tokenizer.load_tokenizer`): a Hugging Face CLIP folder, a SentencePiece `.model` file or
    a folder holding one (SigLIP, T5, Gemma).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from vlmjax.data import classnames, jsonl, shapes, sources, spm
from vlmjax.data import tokenizer as tokenizer_lib
from vlmjax.data.decode import BadRecord

log = logging.getLogger("vlmjax")

# Prompt sets by name; `data.templates` may instead list its own, separated by "|".
SENTENCEPIECE = "sentencepiece:"  # data.tokenizer prefix of a model trained on the captions

TEMPLATES = {
    # A caption of a shapes scene names the large (or only) shape as "a large COLOUR KIND";
    # the label is that shape's kind, so the ensemble covers every colour of it.
    "shapes": tuple(f"a large {colour} {{}}" for colour in shapes.COLOURS),
    # Short, generic photo prompts in the style of CLIP's ImageNet prompt ensemble.
    "photo": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a close-up photo of a {}.",
        "a photo of the large {}.",
        "a photo of the small {}.",
        "a low resolution photo of a {}.",
        "a drawing of a {}.",
    ),
}


def templates(spec: str) -> tuple[str, ...]:
    """`data.templates` -> prompt templates, each with one "{}" for the class name."""
    found = (
        TEMPLATES.get(spec)
        or classnames.template_set(spec)
        or tuple(t.strip() for t in spec.split("|") if t.strip())
    )
    if not found or any(t.count("{}") != 1 for t in found):
        names = sorted([*TEMPLATES, *classnames.TEMPLATE_SETS])
        raise ValueError(
            f"templates={spec!r}: name a set ({names}) or give templates "
            f"separated by '|', each with exactly one '{{}}' for the class name"
        )
    return found


def as_str(text: Any) -> str:
    """str, bytes or numpy scalar text -> str."""
    if isinstance(text, np.ndarray) and text.ndim == 0:
        text = text.item()
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def captions_of(record: dict, cfg: ml_collections.ConfigDict, names: Sequence[str] | None):
    """Every candidate text of one record, as a list of str (at least one)."""
    if cfg.caption_key:
        value = record
        for part in cfg.caption_key.split("/"):  # nested features, e.g. "captions/text"
            if not isinstance(value, dict) or part not in value:
                raise KeyError(
                    f"record has no '{cfg.caption_key}' field (fields: {sorted(record)}); set "
                    "data.caption_key, or data.caption_key='' to build captions from labels"
                )
            value = value[part]
        if isinstance(value, str | bytes) or np.ndim(value) == 0:
            return [as_str(value)]
        texts = [as_str(v) for v in value]
        if not texts:
            raise ValueError(f"record has an empty '{cfg.caption_key}' list")
        return texts
    if names is None:
        raise ValueError(
            f"data.caption_key='' builds captions from class labels, but data.source="
            f"{cfg.source!r} has no class names"
        )
    name = names[int(record[cfg.label_key])]
    return [t.format(name) for t in templates(cfg.templates)]


def _train_captions(cfg: ml_collections.ConfigDict):
    """Lazily, every caption of the train split (for training a word vocabulary)."""
    path = jsonl.parse(cfg.source)
    if path is not None and cfg.caption_key:
        source = jsonl.JsonlSource(path, required=(cfg.caption_key,))
        for value in source.field(cfg.caption_key, skip_bad=True):  # as training skips them
            yield from ([value] if isinstance(value, str) else value)
        return
    names = sources.class_names(cfg) if not cfg.caption_key else None
    source = sources.source(cfg, cfg.train_split)
    read_caption = getattr(source, "caption", None)  # file sources: the text, no image
    for i in range(len(source)):
        try:
            yield from [read_caption(i)] if read_caption else captions_of(source[i], cfg, names)
        except BadRecord:
            continue  # training skips it too (vlmjax/data/skips.py)


def _train_fields(cfg: ml_collections.ConfigDict, fields: tuple[str, ...]):
    """Lazily, every value of the record `fields` in the train split (str, or lists of str),
    e.g. captions, questions and answers for the decoder's vocabulary."""
    path = jsonl.parse(cfg.source)
    if path is not None:
        source = jsonl.JsonlSource(path, required=fields)
        for field in fields:
            for value in source.field(field, skip_bad=True):
                yield from ([value] if isinstance(value, str) else value)
        return
    source = sources.source(cfg, cfg.train_split)
    for i in range(len(source)):
        record = source[i]
        for field in fields:
            value = record[field]
            if isinstance(value, str | bytes) or np.ndim(value) == 0:
                yield as_str(value)
            else:
                yield from (as_str(v) for v in value)


def _trained_tokenizer_path(
    cfg: ml_collections.ConfigDict,
    fields: tuple[str, ...] = (),
    kind: str = "word",
    directory: str | None = None,
) -> str | None:
    """Where a tokenizer trained on the data is kept: in `directory` (a run's workdir) when
    given, else beside the prepared `shapes` data, else nowhere (None). It is named after
    its kind and the fields it was trained on (`word_tokenizer_caption+question.json`,
    `sentencepiece1000_tokenizer_caption.model`)."""
    if directory is None:
        if cfg.source != "shapes":
            return None
        directory = shapes.dataset_dir(cfg.data_dir, cfg.image_size, cfg.num_train, cfg.num_heldout)
    name = "+".join(fields) if fields else (cfg.caption_key or "labels")
    suffix = "json" if kind == "word" else "model"
    return os.path.join(directory, f"{kind}_tokenizer_{name}.{suffix}")


def _sentencepiece_size(spec: str) -> int | None:
    """N for a spec "sentencepiece:N" (a model of N pieces trained on the captions)."""
    if not spec.startswith(SENTENCEPIECE):
        return None
    size = spec[len(SENTENCEPIECE) :]
    if not size.isdigit() or int(size) < 8:
        raise ValueError(
            f"data.tokenizer={spec!r}: write {SENTENCEPIECE}N with a vocabulary size N >= 8, "
            f"e.g. {SENTENCEPIECE}1000"
        )
    return int(size)


def _save(tok: tokenizer_lib.Tokenizer, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(tok, tokenizer_lib.WordTokenizer):
        tok.save(path)
    else:
        spm.save(tok, path)


def _load_saved(path: str, kind: str) -> tokenizer_lib.Tokenizer:
    if kind == "word":
        return tokenizer_lib.WordTokenizer.load(path)
    return spm.SentencePieceTokenizer.load(path)


def prepare_tokenizer(
    cfg: ml_collections.ConfigDict,
    fields: tuple[str, ...] | None = None,
    workdir: str | None = None,
) -> tokenizer_lib.Tokenizer:
    """The tokenizer named by `cfg.tokenizer` (`cfg` is the `data` config), built once per
    run by the task.

    A tokenizer trained on the data ("word", "sentencepiece:N") is loaded from `workdir`
    when the run saved one there, else trained (or, for the deterministic `shapes`, taken
    from beside the prepared dataset) and saved in `workdir`: a resumed run, `vlmjax eval`
    and `vlmjax generate` then keep the ids the checkpoints were trained with, even if the
    captions changed since, and need no training data to rebuild them.

    `fields`: the record fields a vocabulary is trained on (e.g. ("caption", "question",
    "answer")); None trains it on the captions (`cfg.caption_key`), as the contrastive task
    does. Pretrained tokenizers (a path) ignore both."""
    spec, fields = cfg.tokenizer, tuple(fields or ())
    size = _sentencepiece_size(spec)
    if spec != "word" and size is None:
        return tokenizer_lib.load_tokenizer(os.path.expanduser(spec))
    kind = "word" if size is None else f"sentencepiece{size}"
    kept = _trained_tokenizer_path(cfg, fields, kind, workdir) if workdir else None
    if kept is not None and os.path.exists(kept):
        log.info("%s tokenizer from %s (trained when the run started)", kind, kept)
        return _load_saved(kept, kind)
    beside_data = _trained_tokenizer_path(cfg, fields, kind)
    if beside_data is not None and os.path.exists(beside_data):
        tok = _load_saved(beside_data, kind)
    else:
        texts = _train_fields(cfg, fields) if fields else _train_captions(cfg)  # lazy
        log.info("training a %s tokenizer on %s of %s", kind, list(fields) or "the captions",
                 cfg.source)  # fmt: skip
        tok = tokenizer_lib.WordTokenizer.train(texts) if size is None else spm.train(texts, size)
        if beside_data is not None:
            _save(tok, beside_data)
    if kept is not None:
        _save(tok, kept)
    return tok
