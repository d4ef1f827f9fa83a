"""Captioning and VQA with a Fuyu-style decoder: one task, since both are "text given an
image and a prompt".

An example is {image: uint8 [h, w, 3] of any size, prompt: str (may be empty), target: str}:

  * `shapes`: each training example is, by its own rng, a caption (empty prompt, target =
    the caption) with probability `data.caption_fraction`, else a question (prompt = the
    question, target = the answer);
  * any other source (e.g. `data.source = "jsonl:/path/file.jsonl"`): the records' `image`,
    `prompt` and `target` fields.

`vlmjax/data/fuyu_layout.py` lays an example out as [patches + newlines] BOS prompt target
EOS; the loss is next-token prediction on the target and its EOS only
(`losses.next_token_loss`).
Each global step takes exactly `batch_size` examples (so the data position stays "examples
consumed", as for every task) and packs them, longest first, into a fixed `data.pack_rows`
rows of `data.seq_len` tokens (rounded up to split over the processes and batch shards;
`pack_rows = 0`: one example per row), with segment ids and
per-segment positions; attention never crosses segments. A batch that does not fit is an
error naming the settings to change. `train/packing_efficiency` (real tokens / all tokens)
is logged with the loss.

Evaluation is by the `captioning` (teacher-forced token accuracy and perplexity) and `vqa`
(greedy answers, VQAv2 exact match) evaluators (`vlmjax/evaluators/decoder.py`), which read
the prepared tokenizer and layout from the task.

Config keys (beyond `defaults.base_config`): `model_name = "fuyu"`, `model.*` = FuyuDecoder
fields (`vocab_size` follows the tokenizer unless given), `data.seq_len`, `data.pack_rows`,
`data.caption_fraction`, `data.max_image_size` (0: keep sizes; else images are downscaled
to fit max x max, aspect kept); `data.tokenizer` ("word": a vocabulary over every text
field the task reads); `data.special_tokens`:

  * "reserved" (the default, for runs from scratch): the image and image-newline ids are
    the two after the tokenizer's vocabulary, BOS is the tokenizer's, no BOA;
  * "fuyu": FuyuProcessor's tokens, looked up in the tokenizer's vocabulary: |SPEAKER| at
    patch positions, |NEWLINE| after each row, <s> after the image, <0x04> (BOA) after
    every prompt. `init_from=hf:` a Fuyu folder sets it, so its embedding rows keep their
    meaning and an exported run is laid out as transformers expects.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlmjax import config as config_lib
from vlmjax import flops, losses
from vlmjax.data import fuyu_layout as fl
from vlmjax.data import pipeline, skips, sources, workers
from vlmjax.data import text as text_lib
from vlmjax.models import fuyu
from vlmjax.tasks import Task

log = logging.getLogger("vlmjax")

MODELS = {"fuyu": fuyu.FuyuDecoder}
SHAPES_FIELDS = ("caption", "question", "answer")
RECORD_FIELDS = ("prompt", "target")  # every other source
# Eval rows are padded to a multiple of this, so a split compiles few shapes.
LENGTH_BUCKET = 16
SPECIAL_TOKENS = ("reserved", "fuyu")
# data.special_tokens="fuyu": the vocabulary entries FuyuProcessor lays examples out with.
FUYU_TOKENS = dict(image="|SPEAKER|", newline="|NEWLINE|", bos="<s>", boa="<0x04>")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The task's config keys, read in one place (see the module docstring)."""

    seq_len: int = 128
    pack_rows: int = 0  # 0: one example per row (no packing)
    caption_fraction: float = 0.3
    max_image_size: int = 0
    special_tokens: str = "reserved"  # or "fuyu" (see the module doc)

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> Settings:
        data, defaults = config.data, cls()
        out = cls(
            seq_len=data.get("seq_len", defaults.seq_len),
            pack_rows=data.get("pack_rows", defaults.pack_rows),
            caption_fraction=data.get("caption_fraction", defaults.caption_fraction),
            max_image_size=data.get("max_image_size", defaults.max_image_size),
            special_tokens=data.get("special_tokens", defaults.special_tokens),
        )
        if out.special_tokens not in SPECIAL_TOKENS:
            raise config_lib.ConfigError(
                f"data.special_tokens={out.special_tokens!r} must be one of {SPECIAL_TOKENS}"
            )
        if out.seq_len < 2 or out.pack_rows < 0:
            raise config_lib.ConfigError(
                f"data.seq_len={out.seq_len} must be >= 2 and data.pack_rows={out.pack_rows} >= 0"
            )
        if not 0.0 <= out.caption_fraction <= 1.0:
            raise config_lib.ConfigError(
                f"data.caption_fraction={out.caption_fraction} must be in [0, 1]"
            )
        return out


def is_shapes(data: ml_collections.ConfigDict) -> bool:
    return data.source == "shapes"


def text_fields(data: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The record fields holding text (what a word vocabulary is trained on)."""
    return SHAPES_FIELDS if is_shapes(data) else RECORD_FIELDS


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a decoder run derives from its data and config, built once (`build`)."""

    tokenizer: Any
    settings: Settings
    layout: fl.LayoutSpec


def _model_kwargs(config: ml_collections.ConfigDict, prepared: Prepared) -> dict[str, Any]:
    if config.model_name not in MODELS:
        raise config_lib.ConfigError(
            f"model_name={config.model_name!r} is not one of {sorted(MODELS)} for task 'captioning'"
        )
    kwargs = config_lib.module_kwargs(fuyu.FuyuDecoder, config.model.to_dict(), "model")
    # The tokenizer's ids and the layout's image and image-newline ids (reserved after the
    # vocabulary, or entries of it).
    ids = prepared.layout.tokens
    needed = max(prepared.tokenizer.vocab_size, ids.image + 1, ids.newline + 1)
    if not kwargs.get("vocab_size"):
        kwargs["vocab_size"] = needed
    elif kwargs["vocab_size"] < needed:
        raise config_lib.ConfigError(
            f"model.vocab_size={kwargs['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"with the image and image-newline ids ({needed}): raise it, or set it to 0 (it "
            "then follows the tokenizer)"
        )
    return kwargs


def _vocabulary_id(tok, token: str, config: ml_collections.ConfigDict) -> int:
    found = tok.token_id(token) if hasattr(tok, "token_id") else None
    if found is None:
        raise config_lib.ConfigError(
            f"data.special_tokens='fuyu' needs {token!r} in the tokenizer's vocabulary, and "
            f"data.tokenizer={config.data.tokenizer!r} has no such entry: use a Fuyu "
            "tokenizer, or data.special_tokens='reserved'"
        )
    return found


def special_ids(config: ml_collections.ConfigDict, tok, settings: Settings) -> fl.Tokens:
    """The layout's token ids under `data.special_tokens` (see the module doc)."""
    if settings.special_tokens == "fuyu":
        found = {k: _vocabulary_id(tok, t, config) for k, t in FUYU_TOKENS.items()}
        return fl.Tokens(eos=tok.eos_id, pad=tok.pad_id, **found)
    # Reserved: no BOA token, the prompt is followed by the target.
    return fl.Tokens(
        image=tok.vocab_size,
        newline=tok.vocab_size + 1,
        bos=tok.bos_id,
        eos=tok.eos_id,
        pad=tok.pad_id,
        boa=None,
    )


def layout_spec(config: ml_collections.ConfigDict, tok, settings: Settings) -> fl.LayoutSpec:
    """How this run lays examples out: `special_ids`, the patch size and the canvas."""
    ids = special_ids(config, tok, settings)
    size = settings.max_image_size
    patch_size, channels = _patch(config)
    return fl.LayoutSpec(
        patch_size=patch_size,
        channels=channels,
        tokens=ids,
        canvas=(size, size) if size else None,
    )


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None) -> Prepared:
    """The tokenizer (a "word" vocabulary over every text field, kept in `workdir`), the
    task's settings and the layout of its examples."""
    settings = Settings.of(config)  # config errors before any data is read
    tok = text_lib.prepare_tokenizer(config.data, fields=text_fields(config.data), workdir=workdir)
    return Prepared(tok, settings, layout_spec(config, tok, settings))


def _patch(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(patch_size, channels) of the model config, FuyuDecoder's defaults where unset."""
    model = config.model
    return (
        model.get("patch_size", fuyu.FuyuDecoder.patch_size),
        model.get("channels", fuyu.FuyuDecoder.channels),
    )


def init_inputs(
    config: ml_collections.ConfigDict, settings: Settings
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract (tokens, patches, image_mask) of one row for `model.init`."""
    length = settings.seq_len
    patch_size, channels = _patch(config)
    patch_dim = patch_size * patch_size * channels
    return (
        jax.ShapeDtypeStruct((1, length), jnp.int32),
        jax.ShapeDtypeStruct((1, length, patch_dim), jnp.float32),
        jax.ShapeDtypeStruct((1, length), jnp.bool_),
    )


# --- text and examples -----------------------------------------------------------------------


def text_ids(tok, text: Any) -> list[int]:
    """One text (str or bytes) -> its token ids, without BOS/EOS."""
    text = text_lib.as_str(text)
    if not text:
        return []
    row = tok.encode([text], 4096)[0].tolist()
    return row[1 : row.index(tok.eos_id, 1)]


def record_image(record: dict, image_key: str) -> np.ndarray:
    """A record's image as uint8 [h, w, 3], any size."""
    if image_key not in record:
        raise KeyError(
            f"dataset record has no '{image_key}' field (fields: {sorted(record)}); set "
            "data.image_key"
        )
    return pipeline.as_image(record[image_key], None, 1.0)


def record_texts(record: dict, fields: Sequence[str]) -> list[str]:
    missing = [f for f in fields if f not in record]
    if missing:
        raise KeyError(f"dataset record has no {missing} field(s) (fields: {sorted(record)})")
    return [text_lib.as_str(record[f]) for f in fields]


def rows_per_batch(
    settings: Settings, batch_size: int, num_examples: int, multiple: int = 1
) -> int:
    """Rows that `num_examples` examples (a share of the global `batch_size`) are packed
    into: their share of `data.pack_rows`, rounded up to a multiple of `multiple` (the
    global rows must split over the processes, batch shards and micro-batches; spare rows
    are only padding, never a change of the step's examples or loss)."""
    if not settings.pack_rows:
        return num_examples
    total = -(-settings.pack_rows // multiple) * multiple
    return total * num_examples // batch_size


def pack_examples(
    sequences: Sequence[dict[str, np.ndarray]], num_rows: int, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """`fuyu_layout.layout` outputs -> one batch of exactly [num_rows, seq_len] rows.

    Longest first (first-fit decreasing), which leaves less unusable space at the row ends
    than arrival order, so fewer spare rows are needed. A batch that does not fit is a
    ValueError saying what to change (the examples of a step are fixed: the data position
    counts examples, so none may be carried over to the next batch).
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]["tokens"]))
    try:
        return fl.pack([sequences[i] for i in order], seq_len, num_rows, pad_id)
    except ValueError as e:
        total = sum(len(s["tokens"]) for s in sequences)
        raise ValueError(
            f"cannot pack {len(sequences)} examples ({total} tokens, longest "
            f"{len(sequences[order[0]]['tokens'])}) into {num_rows} rows of {seq_len} tokens "
            f"({num_rows * seq_len}): raise data.pack_rows or data.seq_len, lower batch_size, "
            f"or set data.max_image_size ({e})"
        ) from None


def _row_multiple(config: ml_collections.ConfigDict, settings: Settings, process_count: int):
    """What the global packed rows must be a multiple of: the processes, and the batch
    shards (data * fsdp) times the micro-batches. `data.pack_rows` is rounded up to it."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    multiple = math.lcm(process_count, shards * config.optimizer.grad_accum_steps)
    rows = settings.pack_rows
    if rows and rows % multiple:
        log.info(
            "data.pack_rows=%d rounded up to %d: rows split over %d processes, %d batch "
            "shards x %d micro-batches", rows, -(-rows // multiple) * multiple, process_count,
            shards, config.optimizer.grad_accum_steps,
        )  # fmt: skip
    return multiple


def train_dataset(
    config: ml_collections.ConfigDict,
    prepared: Prepared,
    process_index: int,
    process_count: int,
    start_example: int = 0,
) -> grain.IterDataset:
    """This process's packed rows of each global batch, from example `start_example` on.

    The global stream of examples is shuffled (reshuffled each epoch) and cut into chunks of
    batch_size / process_count, as in `pipeline.train_dataset`, so global batch k is the
    same examples whatever the process count; each chunk is laid out and packed here.
    """
    data, settings = config.data, prepared.settings
    multiple = _row_multiple(config, settings, process_count)
    tok, spec = prepared.tokenizer, prepared.layout
    source = _source(data, data.train_split)
    per_process = config.batch_size // process_count
    if len(source) < config.batch_size:
        raise ValueError(
            f"the dataset has {len(source)} examples, fewer than one batch of {config.batch_size}"
        )
    shapes_data = is_shapes(data)

    def example(record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = record_image(record, data.image_key)
        if shapes_data:
            caption, question, answer = record_texts(record, SHAPES_FIELDS)
            # Drawn for every example (whatever the fraction), so the stream stays the same.
            captioning = rng.random() < settings.caption_fraction
            prompt, target = ("", caption) if captioning else (question, answer)
        else:
            prompt, target = record_texts(record, RECORD_FIELDS)
        return fl.layout(image, text_ids(tok, prompt), text_ids(tok, target), spec)

    rows = rows_per_batch(settings, config.batch_size, per_process, multiple)

    def pack(sequences):
        return pack_examples(sequences, rows, settings.seq_len, spec.tokens.pad)

    # A bad record (decode.BadRecord, e.g. a jsonl line naming a missing image) is replaced
    # as in pipeline.train_dataset; packed rows carry no per-example fields, so here it is
    # not counted in data/skipped.
    ds = grain.MapDataset.source(skips.Replacing(source, dict)).shuffle(seed=config.seed)
    ds = ds.repeat()
    ds = ds.random_map(example, seed=config.seed + 1)
    ds = ds[start_example:].batch(per_process, drop_remainder=True, batch_fn=pack)
    ds = ds[process_index::process_count]
    read = grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
    return workers.with_workers(
        ds.to_iter_dataset(read), workers.resolve(data.num_workers, data.source)
    )


def _source(data: ml_collections.ConfigDict, split: str):
    required = () if is_shapes(data) else RECORD_FIELDS
    return sources.source(data, split, required=required)


def fake_batch(
    config: ml_collections.ConfigDict, prepared: Prepared, batch_size: int
) -> dict[str, np.ndarray]:
    """A random packed batch of `batch_size` examples (images of `data.image_size`, prompts
    of 6 and targets of 2 random words, as a `shapes` question), laid out like the real ones."""
    rng = np.random.default_rng(0)
    spec, settings = prepared.layout, prepared.settings
    size, words = config.data.image_size, prepared.tokenizer.vocab_size
    sequences = [
        fl.layout(
            rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            rng.integers(4, words, 6).tolist(),
            rng.integers(4, words, 2).tolist(),
            spec,
        )
        for _ in range(batch_size)
    ]
    rows = rows_per_batch(
        settings, config.batch_size, batch_size, _row_multiple(config, settings, 1)
    )
    return pack_examples(sequences, rows, settings.seq_len, spec.tokens.pad)


# --- loss ------------------------------------------------------------------------------------


def loss_fn(
    model: nn.Module,
    params: Any,
    model_state: dict,
    batch: dict[str, jax.Array],
    rng: jax.Array,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict]]:
    """Mean next-token NLL over the target tokens of packed rows [R, T] (see fuyu_layout);
    returns (loss, (metrics, model_state))."""
    logits = model.apply(
        {"params": params, **model_state},
        **fuyu.model_inputs(batch),
        train=True,
        rngs={"dropout": rng},
    )  # [R, T, vocab] float32
    loss, m = losses.next_token_loss(
        logits=logits, targets=batch["targets"], loss_mask=batch["loss_mask"]
    )
    metrics = {
        "loss": loss,
        "token_accuracy": m["accuracy"],
        "target_tokens": m["tokens"],
        "packing_efficiency": (batch["segment_ids"] > 0).mean(),
    }
    return loss, (metrics, model_state)


def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> Task:
    """The decoder task of `config`, prepared once (tokenizer kept in `workdir`)."""
    prepared = prepare(config, workdir)
    kwargs = _model_kwargs(config, prepared)
    model = MODELS[config.model_name](**kwargs)
    rows = prepared.settings.pack_rows or config.batch_size
    try:  # per example: the step's packed rows shared by its batch_size examples
        row_flops = flops.TRAIN_FACTOR * flops.fuyu_forward(model, prepared.settings.seq_len)
        flops_per_example = row_flops * rows / config.batch_size
    except ValueError:
        flops_per_example = None
    return Task(
        name="captioning",
        prepared=prepared,
        model=model,
        init_inputs=init_inputs(config, prepared.settings),
        loss_fn=functools.partial(loss_fn, model),
        train_dataset=functools.partial(train_dataset, config, prepared),
        fake_batch=functools.partial(fake_batch, config, prepared),
        flops_per_example=flops_per_example,
    )
