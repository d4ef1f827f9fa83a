"""What every evaluator shares: its data config, padded batches over a split, and sharded
application of a device function with the outputs gathered to every process.

An evaluator's batch size is a wish, not a constraint: it is rounded up to a multiple of
the batch shards (mesh `data` x `fsdp`), and the last batch of a split is padded; padding
rows repeat a real example and carry `mask == 0`, so nothing is counted twice. Every process
runs the same number of batches of the same shape (the jitted calls must match).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from vlmjax import mesh as mesh_lib
from vlmjax.data import jsonl, pipeline, sources

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Data:
    """An evaluator's dataset: the run's `data` config with the evaluator's overrides
    (`cfg`, a `data`-like ConfigDict that `vlmjax.data.sources` reads), and its split."""

    cfg: ml_collections.ConfigDict
    split: str
    max_examples: int  # 0: the whole split


def open_source(data: Data, split: str | None = None, required: tuple[str, ...] = ()) -> Any:
    """The random-access source of `split` (default: the evaluator's). A jsonl evaluator
    reads its `source` file whatever the split: one file is one split."""
    path = jsonl.parse(data.cfg.source)
    if path is not None:
        return jsonl.JsonlSource(path, required=required)
    if sources.is_file_source(data.cfg.source):  # tar / parquet / CSV: one file set, one split
        return sources.source(data.cfg, data.cfg.train_split, required)
    split = data.split if split is None else split
    source = sources.source(data.cfg, split)
    if not len(source):
        raise ValueError(f"split {split!r} of {data.cfg.source!r} is empty")
    return source


def num_examples(source: Any, max_examples: int) -> int:
    return min(len(source), max_examples) if max_examples else len(source)


def rows_per_process(batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """This process's rows of a global eval batch of at least `batch_size` rows, rounded up
    so every batch shard (data x fsdp) gets the same number."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    global_rows = -(-batch_size // shards) * shards
    return global_rows // jax.process_count()


def batches(count: int, fetch: Callable[[int], Batch], rows: int) -> Iterator[Batch]:
    """One pass over examples 0..count-1 in global batches of `rows` per process.

    Process i takes examples i, i+P, ... (P processes), so each record is read once. A host
    batch holds the stacked `fetch(index)` dicts plus 'index' int64 [rows] and 'mask' int32
    [rows] (0 on padding rows)."""
    pc, pi = jax.process_count(), jax.process_index()
    indices = np.arange(pi, count, pc)
    per_process = -(-count // pc)
    for b in range(-(-per_process // rows)):
        chosen = indices[b * rows : (b + 1) * rows]
        valid = len(chosen)
        filler = indices[0] if len(indices) else 0
        chosen = np.concatenate([chosen, np.full(rows - valid, filler, np.int64)])
        examples = [fetch(int(i)) for i in chosen]
        batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
        batch["index"] = chosen.astype(np.int64)
        batch["mask"] = (np.arange(rows) < valid).astype(np.int32)
        yield batch


def image_fetch(data: Data, source: Any, fields: tuple[str, ...] = ()) -> Callable[[int], Batch]:
    """index -> {'image': uint8 [S, S, 3] (resized, centre-cropped), <fields> as arrays}."""
    cfg = data.cfg

    def fetch(index: int) -> Batch:
        record = source[index]
        if cfg.image_key not in record:
            raise KeyError(
                f"record {index} has no '{cfg.image_key}' field (fields: {sorted(record)}); "
                "set image_key"
            )
        image = record[cfg.image_key]
        out = {
            "image": pipeline.as_image(
                image, cfg.image_size, cfg.eval_crop_fraction, cfg.get("interpolation", "bilinear")
            )
        }
        for field in fields:
            out[field] = np.asarray(record[field])
        return out

    return fetch


def labelled_fetch(data: Data, source: Any, label_key: str) -> Callable[[int], Batch]:
    """index -> {'image', 'label': int32 []} (+ 'novel' int where records flag held-out
    attribute combinations, as `shapes` does)."""
    fields = (label_key, *(("novel",) if "novel" in source[0] else ()))
    fetch = image_fetch(data, source, fields)

    def labelled(index: int) -> Batch:
        ex = fetch(index)
        ex["label"] = np.asarray(ex.pop(label_key), np.int32)
        return ex

    return labelled


def novel_and_seen(correct: np.ndarray, got: dict[str, np.ndarray]) -> dict[str, float]:
    """{'accuracy_novel', 'accuracy_seen'}: per-example 0/1 `correct` split by the gathered
    'novel' flags, where there are any (else {})."""
    if "novel" not in got or not got["novel"].any():
        return {}
    novel = got["novel"].astype(bool)
    out = {"accuracy_novel": float(correct[novel].mean())}
    if (~novel).any():
        out["accuracy_seen"] = float(correct[~novel].mean())
    return out


def make_gather(fn: Callable[[Any, dict], dict], mesh: jax.sharding.Mesh):
    """`fn(variables, batch) -> {name: [rows, ...]}` jitted once over the mesh; returns
    gather(variables, host_batches) -> {name: host array}, the real rows of every global
    batch (plus 'index'), sorted by index, the same on every process."""
    sharding = mesh_lib.batch_sharding(mesh)

    def step(variables, batch):
        return {**fn(variables, batch), "index": batch["index"], "mask": batch["mask"]}

    jitted = jax.jit(step, out_shardings=mesh_lib.replicated(mesh))

    def gather(variables, host_batches: Iterator[Batch]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for host in host_batches:
            out = jax.device_get(jitted(variables, pipeline.to_global(host, sharding)))
            for k, v in out.items():
                parts.setdefault(k, []).append(np.asarray(v))
        got = {k: np.concatenate(v) for k, v in parts.items()}
        keep = got.pop("mask").astype(bool)
        got = {k: v[keep] for k, v in got.items()}
        order = np.argsort(got["index"], kind="stable")
        return {k: v[order] for k, v in got.items()}

    return gather


def local_rows(array: jax.Array, mesh: jax.sharding.Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order it supplied them."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    spec = PartitionSpec(mesh_lib.BATCH_AXES)
    return np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, spec))


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Per-process sums -> global sums (every process gets the same)."""
    if jax.process_count() == 1:
        return values
    keys = sorted(values)
    local = np.asarray([values[k] for k in keys], np.float64)
    total = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)
    return {k: float(v) for k, v in zip(keys, total, strict=True)}


def variables(state) -> dict:
    """A TrainState's params and non-parameter collections, as `model.apply` takes them:
    the EMA of the params when the run keeps one (optimizer.ema_decay > 0), else the params.
    (BatchNorm statistics are the running ones either way.)"""
    ema = getattr(state, "ema", None)
    return {"params": state.params if ema is None else ema, **state.model_state}
