"""Classification accuracy of a classifier's logits on a labelled set.

Metrics: `accuracy` (+ `accuracy_top5` with 10 or more classes; + `accuracy_novel` /
`accuracy_seen` where records carry a `novel` flag, as `shapes` does), `loss` (mean
cross-entropy, no label smoothing), `count`. Keys: `label_key`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vlmjax import losses
from vlmjax.evaluators import common

KEYS = {"label_key": None}


class Classification:
    """`run(state)` -> accuracy and loss of the task's logits on `data`."""

    def __init__(self, cfg: dict, data: common.Data, task, mesh):
        if task.logits is None:
            raise ValueError(f"needs a classifier; task {task.name!r} gives no logits")
        self.data = data
        self.label_key = cfg["label_key"] or data.cfg.label_key
        self.source = common.open_source(data, required=(self.label_key,))
        self.rows = common.rows_per_process(cfg["batch_size"], mesh)

        def per_row(variables, batch):
            logits = task.logits(variables, batch["image"]).astype(jnp.float32)  # [b, C]
            label = batch["label"]
            true = jnp.take_along_axis(logits, label[:, None], axis=1)  # [b, 1]
            # Rank of the true class; ties count against it (as the zero-shot evaluator).
            rank = (logits > true).sum(1) + (logits == true).sum(1) - 1
            out = {"rank": rank, "loss": losses.cross_entropy(logits, label)}
            return {**out, **({"novel": batch["novel"]} if "novel" in batch else {})}

        self.gather = common.make_gather(per_row, mesh)
        self.num_classes = task.model.num_classes if hasattr(task.model, "num_classes") else 0

    def run(self, state) -> dict[str, float]:
        count = common.num_examples(self.source, self.data.max_examples)
        fetch = common.labelled_fetch(self.data, self.source, self.label_key)
        got = self.gather(common.variables(state), common.batches(count, fetch, self.rows))
        correct = (got["rank"] == 0).astype(np.float64)
        metrics = {
            "accuracy": float(correct.mean()),
            "loss": float(got["loss"].astype(np.float64).mean()),
            "count": float(len(correct)),
        }
        if self.num_classes >= 10:
            metrics["accuracy_top5"] = float((got["rank"] < 5).mean())
        return {**metrics, **common.novel_and_seen(correct, got)}
