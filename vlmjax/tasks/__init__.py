"""Tasks: one module per objective, each defining the same functions (see classification.py).

A task module provides `build_model(config)`, `init_inputs(config)`, `train_dataset(config,
process_index, process_count)`, `eval_splits(config)`, `eval_dataset(config, split,
process_index, process_count)`, `loss_fn(...)`, `eval_sums(...)` and `eval_finalize(sums)`.
The train loop knows nothing else about them.
"""

import importlib
from types import ModuleType

TASKS = ("classification", "contrastive", "captioning")


def get(name: str) -> ModuleType:
    """The task module called `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; config.task must be one of {TASKS}")
    return importlib.import_module(f"vlmjax.tasks.{name}")
