"""Tasks: one module per objective, each defining the same functions (see classification.py).

A task module provides:

- `build_model(config)`, `init_inputs(config)` (abstract inputs for `model.init`) and
  `fake_batch(config, batch_size)` (random host arrays shaped like a train batch; `vlmjax
  bench` trains on them);
- `train_dataset(config, process_index, process_count, start_example=0)`;
- `make_loss_fn(config, model)` -> `loss_fn(params, model_state, batch, rng)` returning
  (loss, (metrics, new model_state)), and `make_eval_fn(config, model)` -> the jitted eval
  step's body;
- `eval_splits(config)`, then either `eval_dataset(config, split, process_index,
  process_count)` with `eval_finalize(sums)`, for metrics that are sums over batches
  (classification), or `evaluate_split(config, split, model, eval_step, state,
  batch_sharding)`, for metrics that need the whole split at once (retrieval, generation).

The train loop (`vlmjax/train.py`) knows nothing else about them.
"""

import importlib
from types import ModuleType

TASKS = ("classification", "contrastive", "captioning")


def get(name: str) -> ModuleType:
    """The task module called `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; config.task must be one of {TASKS}")
    return importlib.import_module(f"vlmjax.tasks.{name}")
