"""Captioning and VQA with a Fuyu-style decoder: one task, since both are "text given an
image and a prompt".

An example is {image: uint8 [h, w, 3] of any size, prompt: str (may be empty), target: str}:

  * `shapes`: each training example is, by its own rng, a caption (empty prompt, target =
    the caption) with probability `data.caption_fraction`, else a question (prompt = the
    question, target = the answer);
  * any other source (e.g. `data.source = "jsonl:/path/file.jsonl"`): the records' `image`,
    `prompt` and `target` fields.

`vlmjax/data/fuyu_layout.py` lays an example out as [patches + newlines] BOS prompt target
EOS; the loss is next-token prediction on the target and its EOS only (`fuyu.next_token_loss`).
Each global step takes exactly `batch_size` examples (so the data position stays "examples
consumed", as for every task) and packs them, longest first, into a fixed `data.pack_rows`
rows of `data.seq_len` tokens (`pack_rows = 0`: one example per row), with segment ids and
per-segment positions; attention never crosses segments. A batch that does not fit is an
error naming the settings to change. `train/packing_efficiency` (real tokens / all tokens)
is logged with the loss.

Evaluation (`evaluate_split`), on `shapes`:

  eval/caption_token_accuracy, eval/caption_perplexity, eval/caption_loss: teacher-forced
      next-token accuracy and exp(mean NLL) on the split's captions (empty prompt);
  eval/vqa_accuracy (+ _novel / _seen): exact match of the greedy answer (`generate`, KV
      cache, batched and jitted over the mesh) to the split's answer for its question;
  eval/vqa_majority_baseline: the exact match of always answering the most frequent train
      answer, for comparison.

On other sources the same numbers over (prompt, target) are eval/token_accuracy,
eval/perplexity, eval/loss and eval/exact_match (greedy, at most `eval_max_new_tokens`).

Config keys (beyond `defaults.base_config`): `model_name = "fuyu"`, `model.*` = FuyuDecoder
fields (`vocab_size` follows the tokenizer unless given), `data.seq_len`, `data.pack_rows`,
`data.caption_fraction`, `data.max_image_size` (0: keep sizes; else images are downscaled
to fit max x max, aspect kept), `eval_max_new_tokens`; `data.tokenizer` ("word": a
vocabulary over every text field the task reads).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from vlmjax import checkpoint
from vlmjax import config as config_lib
from vlmjax import generate as generate_lib
from vlmjax import mesh as mesh_lib
from vlmjax.data import fuyu_layout as fl
from vlmjax.data import pipeline, sources
from vlmjax.data import text as text_lib
from vlmjax.models import fuyu

log = logging.getLogger("vlmjax")

MODELS = {"fuyu": fuyu.FuyuDecoder}
SHAPES_FIELDS = ("caption", "question", "answer")
RECORD_FIELDS = ("prompt", "target")  # every other source
# Eval rows are padded to a multiple of this, so a split compiles few shapes.
LENGTH_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Settings:
    """The task's config keys, read in one place (see the module docstring)."""

    seq_len: int = 128
    pack_rows: int = 0  # 0: one example per row (no packing)
    caption_fraction: float = 0.3
    max_image_size: int = 0
    max_new_tokens: int = 8

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> Settings:
        data, defaults = config.data, cls()
        out = cls(
            seq_len=data.get("seq_len", defaults.seq_len),
            pack_rows=data.get("pack_rows", defaults.pack_rows),
            caption_fraction=data.get("caption_fraction", defaults.caption_fraction),
            max_image_size=data.get("max_image_size", defaults.max_image_size),
            max_new_tokens=config.get("eval_max_new_tokens", defaults.max_new_tokens),
        )
        if out.seq_len < 2 or out.pack_rows < 0 or out.max_new_tokens < 1:
            raise config_lib.ConfigError(
                f"data.seq_len={out.seq_len} must be >= 2, data.pack_rows={out.pack_rows} >= 0 "
                f"and eval_max_new_tokens={out.max_new_tokens} >= 1"
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


def tokenizer(config: ml_collections.ConfigDict):
    return text_lib.get_tokenizer(config.data, fields=text_fields(config.data))


def _model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    if config.model_name not in MODELS:
        raise config_lib.ConfigError(
            f"model_name={config.model_name!r} is not one of {sorted(MODELS)} for task 'captioning'"
        )
    kwargs = config_lib.module_kwargs(fuyu.FuyuDecoder, config.model.to_dict(), "model")
    if not kwargs.get("vocab_size"):
        # The tokenizer's ids, then the image placeholder and image-newline ids. A config
        # that gives model.vocab_size builds without the data (layout_spec checks it).
        kwargs["vocab_size"] = tokenizer(config).vocab_size + 2
    return kwargs


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The decoder of `config.model` (vocabulary = tokenizer ids + image + newline)."""
    Settings.of(config)  # config errors before anything is compiled
    kwargs = _model_kwargs(config)
    return MODELS[config.model_name](**kwargs)


def layout_spec(config: ml_collections.ConfigDict) -> fl.LayoutSpec:
    """How this run lays examples out: the tokenizer's special ids, and the image ids
    reserved after its vocabulary (no BOA token: the prompt is followed by the target)."""
    tok, settings = tokenizer(config), Settings.of(config)
    vocab_size = config.model.get("vocab_size")
    if vocab_size and vocab_size < tok.vocab_size + 2:
        raise config_lib.ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary plus the "
            f"image and image-newline ids ({tok.vocab_size + 2}): raise it, or set it to 0 (it "
            "then follows the tokenizer)"
        )
    ids = fl.Tokens(
        image=tok.vocab_size,
        newline=tok.vocab_size + 1,
        bos=tok.bos_id,
        eos=tok.eos_id,
        pad=tok.pad_id,
        boa=None,
    )
    size = settings.max_image_size
    patch_size, channels = _patch(config)
    return fl.LayoutSpec(
        patch_size=patch_size,
        channels=channels,
        tokens=ids,
        canvas=(size, size) if size else None,
    )


def _patch(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(patch_size, channels) of the model config, FuyuDecoder's defaults where unset."""
    model = config.model
    return (
        model.get("patch_size", fuyu.FuyuDecoder.patch_size),
        model.get("channels", fuyu.FuyuDecoder.channels),
    )


def init_inputs(config: ml_collections.ConfigDict) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract (tokens, patches, image_mask) of one row for `model.init`."""
    length = Settings.of(config).seq_len
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


def _image(record: dict, data: ml_collections.ConfigDict) -> np.ndarray:
    if data.image_key not in record:
        raise KeyError(
            f"dataset record has no '{data.image_key}' field (fields: {sorted(record)}); set "
            "data.image_key"
        )
    return pipeline.as_image(record[data.image_key], None, 1.0)  # any size, 3 channels


def _record_texts(record: dict, fields: Sequence[str]) -> list[str]:
    missing = [f for f in fields if f not in record]
    if missing:
        raise KeyError(f"dataset record has no {missing} field(s) (fields: {sorted(record)})")
    return [text_lib.as_str(record[f]) for f in fields]


def rows_per_batch(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """Rows that `num_examples` examples (a share of the global batch) are packed into."""
    pack_rows = Settings.of(config).pack_rows
    if not pack_rows:
        return num_examples
    return pack_rows * num_examples // config.batch_size


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


def _check_rows(config: ml_collections.ConfigDict, process_count: int) -> None:
    """The packed rows must split evenly over processes, batch shards and micro-batches."""
    settings = Settings.of(config)
    rows = settings.pack_rows or config.batch_size
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1
    if not mesh.empty:
        shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    accum = config.optimizer.grad_accum_steps
    if settings.pack_rows and (rows % process_count or rows % (shards * accum)):
        raise config_lib.ConfigError(
            f"data.pack_rows={rows} must be divisible by the {process_count} processes and by "
            f"the batch shards (data*fsdp={shards}) times optimizer.grad_accum_steps={accum}"
        )


def train_dataset(
    config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    start_example: int = 0,
) -> grain.IterDataset:
    """This process's packed rows of each global batch, from example `start_example` on.

    The global stream of examples is shuffled (reshuffled each epoch) and cut into chunks of
    batch_size / process_count, as in `pipeline.train_dataset`, so global batch k is the
    same examples whatever the process count; each chunk is laid out and packed here.
    """
    data, settings = config.data, Settings.of(config)
    _check_rows(config, process_count)
    tok, spec = tokenizer(config), layout_spec(config)
    source = _source(data, data.train_split)
    per_process = config.batch_size // process_count
    if len(source) < config.batch_size:
        raise ValueError(
            f"the dataset has {len(source)} examples, fewer than one batch of {config.batch_size}"
        )
    shapes_data = is_shapes(data)

    def example(record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = _image(record, data)
        if shapes_data:
            caption, question, answer = _record_texts(record, SHAPES_FIELDS)
            # Drawn for every example (whatever the fraction), so the stream stays the same.
            captioning = rng.random() < settings.caption_fraction
            prompt, target = ("", caption) if captioning else (question, answer)
        else:
            prompt, target = _record_texts(record, RECORD_FIELDS)
        return fl.layout(image, text_ids(tok, prompt), text_ids(tok, target), spec)

    rows = rows_per_batch(config, per_process)

    def pack(sequences):
        return pack_examples(sequences, rows, settings.seq_len, spec.tokens.pad)

    ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
    ds = ds.random_map(example, seed=config.seed + 1)
    ds = ds[start_example:].batch(per_process, drop_remainder=True, batch_fn=pack)
    ds = ds[process_index::process_count]
    read = grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
    return ds.to_iter_dataset(read)


def _source(data: ml_collections.ConfigDict, split: str):
    required = () if is_shapes(data) else RECORD_FIELDS
    return sources.source(data, split, required=required)


def fake_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    """A random packed batch of `batch_size` examples (images of `data.image_size`, prompts
    of 6 and targets of 2 random words, as a `shapes` question), laid out like the real ones."""
    rng = np.random.default_rng(0)
    spec, settings = layout_spec(config), Settings.of(config)
    size, words = config.data.image_size, tokenizer(config).vocab_size
    sequences = [
        fl.layout(
            rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            rng.integers(4, words, 6).tolist(),
            rng.integers(4, words, 2).tolist(),
            spec,
        )
        for _ in range(batch_size)
    ]
    rows = rows_per_batch(config, batch_size)
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
    loss, m = fuyu.next_token_loss(
        logits=logits, targets=batch["targets"], loss_mask=batch["loss_mask"]
    )
    metrics = {
        "loss": loss,
        "token_accuracy": m["accuracy"],
        "target_tokens": m["tokens"],
        "packing_efficiency": (batch["segment_ids"] > 0).mean(),
    }
    return loss, (metrics, model_state)


def make_loss_fn(config: ml_collections.ConfigDict, model: nn.Module):
    """loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))."""
    del config
    return functools.partial(loss_fn, model)


def make_eval_fn(config: ml_collections.ConfigDict, model: nn.Module):
    """eval(params, model_state, batch) -> teacher-forced sums over the target tokens of the
    rows whose `mask` is set: nll, correct, tokens (replicated by the caller)."""
    del config

    def eval_fn(params, model_state, batch):
        logits = model.apply({"params": params, **model_state}, **fuyu.model_inputs(batch))
        mask = batch["loss_mask"] * batch["mask"][:, None].astype(jnp.float32)  # [R, T]
        nll = fuyu.token_nll(logits, batch["targets"])  # [R, T]
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        return {
            "nll": (nll * mask).sum(),
            "correct": (correct * mask).sum(),
            "tokens": mask.sum(),
        }

    return eval_fn


# --- evaluation ------------------------------------------------------------------------------


def eval_splits(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    split = config.data.eval_split
    return (split,) if split else ()


def _global_max(value: int) -> int:
    """The largest `value` over all processes, rounded up to LENGTH_BUCKET: every process
    then builds arrays of one shape and runs the same jitted calls."""
    if jax.process_count() > 1:
        value = int(np.max(multihost_utils.process_allgather(np.int32(value))))
    return -(-value // LENGTH_BUCKET) * LENGTH_BUCKET


def _eval_records(
    config: ml_collections.ConfigDict, split: str
) -> Iterator[tuple[list, np.ndarray]]:
    """(records, mask [n]) for this process's share of each global eval batch, in order;
    every process gets the same number of batches (padding rows repeat a record, mask 0)."""
    source = _source(config.data, split)
    total = len(source)
    if config.data.eval_max_examples:
        total = min(total, config.data.eval_max_examples)
    batches = pipeline.eval_batches(
        range(total),
        lambda i: {"index": np.int64(i)},
        batch_size=config.eval_batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for batch in batches:
        yield [source[int(i)] for i in batch["index"]], batch["mask"]


def _eval_pairs(config: ml_collections.ConfigDict, record: dict, teacher_forced: bool):
    """(prompt, target) of one eval record: on `shapes` the caption for teacher forcing and
    the question/answer for generation; elsewhere the record's prompt and target."""
    if not is_shapes(config.data):
        return _record_texts(record, RECORD_FIELDS)
    caption, question, answer = _record_texts(record, SHAPES_FIELDS)
    return ("", caption) if teacher_forced else (question, answer)


def _teacher_forced(config, split, eval_step, state, batch_sharding) -> dict[str, float]:
    tok, spec = tokenizer(config), layout_spec(config)
    totals = collections.Counter()
    for records, mask in _eval_records(config, split):
        seqs = []
        for record in records:
            prompt, target = _eval_pairs(config, record, teacher_forced=True)
            seqs.append(
                fl.layout(
                    _image(record, config.data), text_ids(tok, prompt), text_ids(tok, target), spec
                )
            )
        length = _global_max(max(len(s["tokens"]) for s in seqs))
        rows = [fl.pack([s], length, 1, spec.tokens.pad) for s in seqs]  # one example per row
        host = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        host["mask"] = mask
        sums = eval_step(state.params, state.model_state, pipeline.to_global(host, batch_sharding))
        totals.update({k: float(v) for k, v in jax.device_get(sums).items()})
    tokens = max(totals["tokens"], 1.0)
    loss = totals["nll"] / tokens
    return {
        "token_accuracy": totals["correct"] / tokens,
        "loss": loss,
        "perplexity": float(np.exp(loss)),
    }


@functools.lru_cache(maxsize=4)
def _scorer(mesh: jax.sharding.Mesh):
    """Jitted (generated, reference [B, M], mask, novel [B]) -> sums, replicated to every
    process (a process cannot read the other processes' rows of a sharded array)."""

    def score(generated, reference, mask, novel):
        correct = jnp.all(generated == reference, axis=1) & (mask > 0)  # [B]
        novel = (novel > 0) & (mask > 0)
        return {
            "count": (mask > 0).sum(),
            "correct": correct.sum(),
            "novel_count": novel.sum(),
            "novel_correct": (correct & novel).sum(),
        }

    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(score, out_shardings=rep)


def _reference(ids: list[int], eos: int, pad: int, length: int) -> np.ndarray:
    """What `generate` returns for a perfect answer: ids, EOS, then pad ([length] int32)."""
    out = np.full(length, pad, np.int32)
    row = [*ids, eos][:length]
    out[: len(row)] = row
    return out


def _exact_match(config, split, model, state, batch_sharding) -> dict[str, float]:
    """Greedy answers to the split's prompts, compared with the targets token by token."""
    tok, spec, settings = tokenizer(config), layout_spec(config), Settings.of(config)
    ids = spec.tokens
    totals = collections.Counter()
    for records, mask in _eval_records(config, split):
        examples, references = [], []
        for record in records:
            prompt, target = _eval_pairs(config, record, teacher_forced=False)
            examples.append({"image": _image(record, config.data), "prompt": text_ids(tok, prompt)})
            references.append(
                _reference(text_ids(tok, target), ids.eos, ids.pad, settings.max_new_tokens)
            )
        prompts = [fl.layout(e["image"], e["prompt"], None, spec) for e in examples]
        length = _global_max(max(len(p["tokens"]) for p in prompts))
        host = fl.prompt_batch(examples, spec, length=length)
        novel = [int(r.get("novel", 0)) for r in records]
        batch = pipeline.to_global(host, batch_sharding)
        generated = generate_lib.generate(
            model,
            {"params": state.params, **state.model_state},
            batch,
            max_new_tokens=settings.max_new_tokens,
            eos_id=ids.eos,
            pad_id=ids.pad,
        )
        extra = pipeline.to_global(
            {
                "reference": np.stack(references),
                "mask": np.asarray(mask, np.int32),
                "novel": np.asarray(novel, np.int32),
            },
            batch_sharding,
        )
        sums = _scorer(batch_sharding.mesh)(
            generated, extra["reference"], extra["mask"], extra["novel"]
        )
        totals.update({k: int(v) for k, v in jax.device_get(sums).items()})
    count = max(totals["count"], 1)
    metrics = {"exact_match": totals["correct"] / count, "count": float(totals["count"])}
    if totals["novel_count"]:
        metrics["exact_match_novel"] = totals["novel_correct"] / totals["novel_count"]
        seen = totals["count"] - totals["novel_count"]
        if seen:
            metrics["exact_match_seen"] = (totals["correct"] - totals["novel_correct"]) / seen
    return metrics


@functools.lru_cache(maxsize=4)
def _majority_answer(frozen_data: str) -> str:
    """The most frequent answer of the `shapes` train split (ties: alphabetical first)."""
    data = ml_collections.ConfigDict(__import__("json").loads(frozen_data))
    source = sources.source(data, data.train_split)
    counts = collections.Counter(text_lib.as_str(source[i]["answer"]) for i in range(len(source)))
    return min(counts, key=lambda a: (-counts[a], a))


def majority_baseline(config: ml_collections.ConfigDict, split: str) -> float:
    """Held-out exact match of always answering the most frequent train answer (`shapes`)."""
    answer = _majority_answer(config.data.to_json_best_effort(sort_keys=True))
    source = _source(config.data, split)
    total = len(source)
    if config.data.eval_max_examples:
        total = min(total, config.data.eval_max_examples)
    hits = sum(text_lib.as_str(source[i]["answer"]) == answer for i in range(total))
    return hits / max(total, 1)


def evaluate_split(
    config: ml_collections.ConfigDict, split: str, model, eval_step, state, batch_sharding
) -> dict[str, float]:
    """Teacher-forced token accuracy / perplexity and generated exact match (module doc)."""
    forced = _teacher_forced(config, split, eval_step, state, batch_sharding)
    matched = _exact_match(config, split, model, state, batch_sharding)
    if not is_shapes(config.data):
        return {**forced, **matched}
    metrics = {f"caption_{k}": v for k, v in forced.items()}
    metrics.update({k.replace("exact_match", "vqa_accuracy"): v for k, v in matched.items()})
    metrics["vqa_majority_baseline"] = majority_baseline(config, split)
    return metrics


# --- generation from a run -------------------------------------------------------------------


def answer(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    variables: Any,
    image: np.ndarray,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """The model's text for one uint8 image [h, w, 3] (any size) and prompt."""
    tok, spec = tokenizer(config), layout_spec(config)
    example = {"image": pipeline.as_image(image, None, 1.0), "prompt": text_ids(tok, prompt)}
    batch = fl.prompt_batch([example], spec)
    tokens = generate_lib.generate(
        model,
        variables,
        batch,
        max_new_tokens=max_new_tokens,
        eos_id=spec.tokens.eos,
        pad_id=spec.tokens.pad,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
    )
    row = generate_lib.trim(tokens, eos_id=spec.tokens.eos)[0]
    # The image ids are no words: a model that emits one has nothing to say there.
    return tok.decode([t for t in row if t < tok.vocab_size])


def generate_from_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    image: np.ndarray,
    prompt: str,
    *,
    step: int | None = None,
    **options,
) -> str:
    """`answer` with the parameters of the checkpoint at `step` (default: latest) of
    `workdir`, on one device; only the parameters are read. `options` go to `answer`."""
    from vlmjax import optim, train  # train imports the tasks: import it late

    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with (
        jax.set_mesh(mesh),
        nn.logical_axis_rules(mesh_lib.RULES),
        text_lib.keep_trained_tokenizers_in(workdir),  # a vocabulary trained on the data
    ):
        model = build_model(config)
        tx, _ = optim.build(config.optimizer, config.total_steps)
        _, shardings, abstract = train.state_shardings(model, tx, init_inputs(config), mesh)
        flat = checkpoint.load_params(workdir, abstract.params, shardings.params, ".*", step)
        variables = {"params": traverse_util.unflatten_dict(flat, sep="/")}
        return answer(config, model, variables, image, prompt, **options)
