"""Few-shot linear probes on frozen image embeddings, solved in closed form (as big_vision's
`fewshot_lsr`): for each count k in `shots`, k examples per class are drawn from
`train_split` (a seeded order, the same every evaluation), a ridge regression maps their
standardised embeddings to +-1 class targets, and the test split is classified by argmax.

Metrics: `{k}shot_accuracy` for each k, and `count` (test examples). Keys: `label_key`,
`train_split` (for a jsonl evaluator, "jsonl:PATH" of the file to draw shots from), `shots`,
`l2_reg`, `seed`.
"""

from __future__ import annotations

import logging

import numpy as np

from vlmjax.data import jsonl, sources
from vlmjax.evaluators import common

log = logging.getLogger("vlmjax")

KEYS = {"label_key": None, "train_split": "train", "shots": (1, 5, 10, 25), "l2_reg": 1.0,
        "seed": 0}  # fmt: skip


def ridge_probe(
    x_train: np.ndarray, labels: np.ndarray, x_test: np.ndarray, num_classes: int, l2_reg: float
) -> np.ndarray:
    """Predicted classes [M] of x_test [M, d] by ridge regression on x_train [n, d] with
    integer labels [n] -> targets 2 * one_hot - 1 [n, C].

    Features are standardised with the train statistics; the intercept is the targets'
    mean (unregularised), the weights minimise |xs w - (y - mean y)|^2 + l2_reg |w|^2, in
    whichever of the two equivalent forms has the smaller system (n x n or d x d)."""
    x_train = np.asarray(x_train, np.float64)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xs = (x_train - mean) / std  # [n, d]
    y = 2.0 * np.eye(num_classes)[labels] - 1.0  # [n, C]
    y_mean = y.mean(0)
    n, d = xs.shape
    if n >= d:
        w = np.linalg.solve(xs.T @ xs + l2_reg * np.eye(d), xs.T @ (y - y_mean))  # [d, C]
    else:
        w = xs.T @ np.linalg.solve(xs @ xs.T + l2_reg * np.eye(n), y - y_mean)
    scores = ((np.asarray(x_test, np.float64) - mean) / std) @ w + y_mean  # [M, C]
    return scores.argmax(1)


def pick_shots(labels_in_order, max_shots: int, num_classes: int) -> dict[int, list[int]]:
    """{class: the first `max_shots` indices with that label}, reading (index, label) pairs
    until every class has enough (or the split ends)."""
    chosen: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    full = 0
    for index, label in labels_in_order:
        if 0 <= label < num_classes and len(chosen[label]) < max_shots:
            chosen[label].append(index)
            full += len(chosen[label]) == max_shots
            if full == num_classes:
                break
    return chosen


class FewShot:
    """`run(state)` -> few-shot probe accuracies (see the module doc)."""

    def __init__(self, cfg: dict, data: common.Data, task, mesh):
        if task.embed_images is None:
            raise ValueError(f"needs image embeddings; task {task.name!r} gives none")
        self.data = data
        self.label_key = cfg["label_key"] or data.cfg.label_key
        self.shots = tuple(sorted(int(k) for k in cfg["shots"]))
        if not self.shots or self.shots[0] < 1:
            raise ValueError(f"shots={cfg['shots']!r} must be counts >= 1 per class")
        self.l2_reg, self.seed = float(cfg["l2_reg"]), int(cfg["seed"])
        self.test = common.open_source(data, required=(self.label_key,))
        train_split = cfg["train_split"]
        if jsonl.parse(data.cfg.source) is not None:
            path = jsonl.parse(train_split)
            if path is None:
                raise ValueError("a jsonl evaluator draws shots from train_split='jsonl:PATH'")
            self.train = jsonl.JsonlSource(path, required=(self.label_key,))
        else:
            self.train = common.open_source(data, train_split, required=(self.label_key,))
        if isinstance(self.train, jsonl.JsonlSource):
            labels = [*self.train.field(self.label_key), *self.test.field(self.label_key)]
            self.num_classes = int(max(labels)) + 1
        else:
            self.num_classes = sources.classification_source(data.cfg, data.split)[1]
        self._shots = None  # {class: indices}, drawn on the first run
        self.rows = common.rows_per_process(cfg["batch_size"], mesh)
        self.embed = common.make_gather(
            lambda v, b: {"z": task.embed_images(v, b["image"]), "label": b["label"]}, mesh
        )

    def _labels(self, source, indices):
        if isinstance(source, jsonl.JsonlSource):
            values = source.field(self.label_key)
            return ((int(i), int(values[i])) for i in indices)
        return ((int(i), int(source[int(i)][self.label_key])) for i in indices)

    def _embed(self, variables, source, indices: np.ndarray) -> dict[str, np.ndarray]:
        fetch = common.labelled_fetch(self.data, source, self.label_key)
        return self.embed(
            variables, common.batches(len(indices), lambda i: fetch(int(indices[i])), self.rows)
        )

    def run(self, state) -> dict[str, float]:
        variables = common.variables(state)
        test = self._embed(
            variables, self.test, np.arange(common.num_examples(self.test, self.data.max_examples))
        )
        num_classes = self.num_classes
        if self._shots is None:
            order = np.random.default_rng(self.seed).permutation(len(self.train))
            self._shots = pick_shots(self._labels(self.train, order), self.shots[-1], num_classes)
            short = {c: len(v) for c, v in self._shots.items() if len(v) < self.shots[-1]}
            if short:
                log.warning("fewshot: classes with fewer than %d shots: %s", self.shots[-1], short)
        # Shot j of every class, for j < max shots: the k-shot set is the first k of each.
        picked = np.asarray([i for c in sorted(self._shots) for i in self._shots[c]])
        train = self._embed(variables, self.train, picked)
        rank = np.zeros(len(picked), np.int64)  # position of each shot within its class
        for c in sorted(self._shots):
            members = np.flatnonzero(train["label"] == c)
            rank[members] = np.arange(len(members))
        metrics = {"count": float(len(test["label"]))}
        for k in self.shots:
            use = rank < k
            predicted = ridge_probe(
                train["z"][use], train["label"][use], test["z"], num_classes, self.l2_reg
            )
            metrics[f"{k}shot_accuracy"] = float((predicted == test["label"]).mean())
        return metrics
