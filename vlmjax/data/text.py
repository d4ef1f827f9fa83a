"""Text for image-text tasks: captions from records, class prompts, and the tokenizer that
`data.tokenizer` names.

A record's text is its `data.caption_key` field (a string, UTF-8 bytes, or a list of them,
one picked at random per training example), or, with `data.caption_key = ""`, its class
label turned into a sentence by one of the `data.templates` (e.g. "a photo of a {}.").
The same templates, averaged over, give the zero-shot classifier (`vlmjax/evaluate.py`).

`data.tokenizer`:
  * "word": a word-level vocabulary trained on the train split's captions (or, for the
    decoder, on the record fields it reads: `get_tokenizer(cfg, fields=...)`). For `shapes`
    it is trained once and saved beside the prepared dataset; for other sources it is
    trained when a run first starts and saved in its workdir, whence later starts (resume,
    `vlmjax eval`, `vlmjax generate`) load it (`keep_trained_tokenizers_in`).
  * "sentencepiece:N": a SentencePiece unigram model of about N pieces trained on the same
    text (saved beside `shapes` like "word"); subwords, so unseen words still encode.
  * a path: a saved WordTokenizer JSON, or pretrained tokenizer files (see
    `tokenizer.load_tokenizer`): a Hugging Face CLIP folder, a SentencePiece `.model` file or
    a folder holding one (SigLIP, T5, Gemma).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from vlmjax.data import jsonl, shapes, sources, spm
from vlmjax.data import tokenizer as tokenizer_lib

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
    found = TEMPLATES.get(spec) or tuple(t.strip() for t in spec.split("|") if t.strip())
    if not found or any(t.count("{}") != 1 for t in found):
        raise ValueError(
            f"data.templates={spec!r}: name a set ({sorted(TEMPLATES)}) or give templates "
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
        for value in jsonl.JsonlSource(path, required=(cfg.caption_key,)).field(cfg.caption_key):
            yield from ([value] if isinstance(value, str) else value)
        return
    names = sources.class_names(cfg) if not cfg.caption_key else None
    source = sources.source(cfg, cfg.train_split)
    for i in range(len(source)):
        yield from captions_of(source[i], cfg, names)


def _train_fields(cfg: ml_collections.ConfigDict, fields: tuple[str, ...]):
    """Lazily, every value of the record `fields` in the train split (str, or lists of str),
    e.g. captions, questions and answers for the decoder's vocabulary."""
    path = jsonl.parse(cfg.source)
    if path is not None:
        source = jsonl.JsonlSource(path, required=fields)
        for field in fields:
            for value in source.field(field):
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


_keep_dir: str | None = None  # see keep_trained_tokenizers_in


@contextlib.contextmanager
def keep_trained_tokenizers_in(directory: str | os.PathLike) -> Iterator[None]:
    """Within this context, tokenizers trained on a source other than `shapes` are saved in
    `directory` (a run's workdir: `vlmjax train`, `eval` and `generate` use it) and loaded
    from there when it already holds them. A resumed run, or an evaluation, thus keeps the
    ids its checkpoints were trained with even if the captions changed since, and needs no
    training data to rebuild them. (`shapes` is deterministic: its tokenizers are kept
    beside the prepared data.)"""
    global _keep_dir
    previous, _keep_dir = _keep_dir, os.fspath(directory)
    try:
        yield
    finally:
        _keep_dir = previous


def _trained_tokenizer_path(
    cfg: ml_collections.ConfigDict,
    fields: tuple[str, ...] = (),
    kind: str = "word",
    keep_dir: str | None = None,
) -> str | None:
    """Where a tokenizer trained on the data is kept: beside the prepared `shapes` data, or
    in `keep_dir` for other sources; None if nowhere. It is named after its kind and the
    fields it was trained on (`word_tokenizer_caption+question.json`,
    `sentencepiece1000_tokenizer_caption.model`)."""
    if cfg.source == "shapes":
        directory = shapes.dataset_dir(cfg.data_dir, cfg.image_size, cfg.num_train, cfg.num_heldout)
    elif keep_dir is not None:
        directory = keep_dir
    else:
        return None
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


@functools.lru_cache(maxsize=8)
def _load(
    spec: str, frozen_cfg: str, fields: tuple[str, ...] = (), keep_dir: str | None = None
) -> tokenizer_lib.Tokenizer:
    cfg = ml_collections.ConfigDict(__import__("json").loads(frozen_cfg))
    texts = _train_fields(cfg, fields) if fields else _train_captions(cfg)  # lazy
    what = f"{list(fields) or 'the captions'} of {cfg.source}"
    if spec == "word":
        path = _trained_tokenizer_path(cfg, fields, keep_dir=keep_dir)
        if path is not None:
            if os.path.exists(path) and cfg.source != "shapes":
                log.info("word tokenizer from %s (trained when the run started)", path)
            return tokenizer_lib.build_for_captions(texts, path)
        log.info("training a word tokenizer on %s", what)
        return tokenizer_lib.WordTokenizer.train(texts)
    size = _sentencepiece_size(spec)
    if size is not None:
        path = _trained_tokenizer_path(cfg, fields, kind=f"sentencepiece{size}", keep_dir=keep_dir)
        if path is not None and os.path.exists(path):
            log.info("SentencePiece model from %s", path)
            return spm.SentencePieceTokenizer.load(path)
        log.info("training a %d-piece SentencePiece model on %s", size, what)
        tok = spm.train(texts, size)
        if path is not None:
            spm.save(tok, path)
        return tok
    return tokenizer_lib.load_tokenizer(os.path.expanduser(spec))


def get_tokenizer(
    cfg: ml_collections.ConfigDict, fields: tuple[str, ...] | None = None
) -> tokenizer_lib.Tokenizer:
    """The tokenizer named by `cfg.tokenizer` (`cfg` is the `data` config); cached per
    process, so the train and eval pipelines share one.

    `fields`: the record fields a "word" vocabulary is trained on (e.g. ("caption",
    "question", "answer")); None trains it on the captions (`cfg.caption_key`), as the
    contrastive task does. Pretrained tokenizers ignore it."""
    frozen = cfg.to_json_best_effort(sort_keys=True)
    return _load(cfg.tokenizer, frozen, tuple(fields or ()), _keep_dir)
