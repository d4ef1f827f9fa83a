"""Tasks: one module per objective, all behind the one `Task` interface below.

`build(config, workdir)` prepares a run's task once: it derives what the run needs from its
data (a tokenizer, the decoder's layout), keeps it in the workdir by name (a vocabulary
trained on the captions is saved there, so a resumed run or `vlmjax eval` uses the ids the
checkpoints were trained with), builds the model, and returns a frozen `Task`. The train
loop (`vlmjax/train.py`) and the evaluators (`vlmjax/evaluators/`) see only that object;
nothing is rebuilt from the raw config later, and no module keeps state between runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

TASKS = ("classification", "contrastive", "captioning")

Batch = dict[str, np.ndarray]
LossFn = Callable[..., tuple[jax.Array, tuple[dict[str, jax.Array], dict]]]


@dataclasses.dataclass(frozen=True)
class Task:
    """A prepared objective: the model, its loss, its data and what evaluators may ask of it.

    Shapes: images are uint8 [b, S, S, 3] (normalised on the device); tokens int32 [b, L].
    """

    name: str
    # What the run derived from its data (tokenizer, settings, layout): a frozen dataclass
    # of the task module, kept in the workdir where it was trained.
    prepared: Any
    model: nn.Module
    init_inputs: tuple[jax.ShapeDtypeStruct, ...]  # abstract positional inputs of model.init
    # (params, model_state, batch, rng) -> (loss, (metrics, new model_state)); jitted by the
    # loop, batch = one global (micro-)batch.
    loss_fn: LossFn
    # (process_index, process_count, start_example) -> this process's rows of each batch.
    train_dataset: Callable[[int, int, int], Any]
    fake_batch: Callable[[int], Batch]  # batch_size -> random host batch shaped like real ones
    flops_per_example: float | None  # analytic training FLOPs (fwd + bwd), None: unknown
    # (params, model_state, batch, rng, k) -> (loss, metrics, grads, model_state) of the
    # whole global batch, run as k micro-batches, for objectives that are not a mean of
    # per-example losses (contrastive). None: the loop averages `loss_fn`'s gradients over
    # the k micro-batches, which is exact for per-example losses.
    grad_fn: Callable[..., tuple[jax.Array, dict, Any, Any]] | None = None
    # Device functions that evaluators use (None where the task has no such output):
    # (variables, images) -> logits [b, C] float32.
    logits: Callable[[Any, jax.Array], jax.Array] | None = None
    # (variables, images) -> unit image embeddings [b, E] float32.
    embed_images: Callable[[Any, jax.Array], jax.Array] | None = None
    # (variables, tokens) -> unit text embeddings [b, E] float32.
    embed_texts: Callable[[Any, jax.Array], jax.Array] | None = None
    # texts -> int32 [n, L] token rows, as the text tower reads them.
    tokenize: Callable[[list[str]], np.ndarray] | None = None


def module(name: str):
    """The task module called `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; config.task must be one of {TASKS}")
    return importlib.import_module(f"vlmjax.tasks.{name}")


def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> Task:
    """`config.task` prepared for this run (see the module doc). `workdir` None keeps
    nothing (tests, benchmarks): a tokenizer trained on the data is then trained afresh,
    except for `shapes`, whose are kept beside the prepared dataset."""
    return module(config.task).build(config, workdir)
