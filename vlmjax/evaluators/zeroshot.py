"""Zero-shot classification (Radford et al., 2021) of a labelled set with a CLIP model.

Each class's text embedding is the mean of its prompts' unit embeddings (a prompt ensemble
over `templates`), renormalised; an image gets the class of largest cosine similarity.

Metrics: `accuracy` (+ `accuracy_top5` with 10 or more classes; + `accuracy_novel` /
`accuracy_seen` where records carry a `novel` flag, as `shapes` does), `count`.
Keys: `label_key`, `class_names` (see `vlmjax/data/classnames.py`), `templates`.
"""

from __future__ import annotations

import numpy as np

from vlmjax.data import classnames, jsonl, sources
from vlmjax.data import text as text_lib
from vlmjax.evaluators import common

KEYS = {"label_key": None, "class_names": "", "templates": None}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zeroshot_classifier(prompt_embeddings: np.ndarray) -> np.ndarray:
    """[C, T, E] embeddings of T prompts for each of C classes -> [C, E] unit class
    embeddings (the normalised mean of the unit prompt embeddings)."""
    return l2_normalise(l2_normalise(prompt_embeddings).mean(axis=1))


def topk_correct(
    image_embeddings: np.ndarray, classifier: np.ndarray, labels: np.ndarray, k: int = 1
) -> np.ndarray:
    """Per-image 0/1 [N]: is labels[i] among the k classes most similar to image i?

    image_embeddings [N, E], classifier [C, E] (both unit norm), labels int [N]. Ties are
    broken against the true class: correct only if fewer than k others score >= it."""
    scores = image_embeddings @ classifier.T  # [N, C]
    k = min(k, scores.shape[1])
    true = scores[np.arange(len(labels)), labels][:, None]  # [N, 1]
    better = (scores > true).sum(1) + ((scores == true).sum(1) - 1)
    return (better < k).astype(np.float32)


def _check_labels(data: common.Data, source, label_key: str, num_names: int) -> None:
    """The class list must cover the labels: a ClassLabel's size, or a jsonl file's ids."""
    if jsonl.parse(data.cfg.source) is not None:
        labels = source.field(label_key)
        bad = [v for v in labels if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise ValueError(f"'{label_key}' values must be integers >= 0, got {bad[0]!r}")
        if max(labels) >= num_names:
            raise ValueError(f"labels go up to {max(labels)} but class_names has {num_names} names")
        return
    _, num_classes = sources.classification_source(data.cfg, data.split)
    if num_classes != num_names:
        raise ValueError(
            f"the source's '{label_key}' has {num_classes} classes but class_names has "
            f"{num_names} names"
        )


class ZeroShot:
    """`run(state)` -> zero-shot metrics of the images of `data` (see the module doc)."""

    def __init__(self, cfg: dict, data: common.Data, task, mesh):
        if task.embed_images is None or task.tokenize is None:
            raise ValueError(f"needs image and text towers; task {task.name!r} has none")
        self.data, self.task, self.mesh = data, task, mesh
        self.label_key = cfg["label_key"] or data.cfg.label_key
        self.source = common.open_source(data, required=(self.label_key,))
        self.names = classnames.class_names(cfg["class_names"], self._source_names())
        _check_labels(data, self.source, self.label_key, len(self.names))
        self.templates = text_lib.templates(cfg["templates"] or data.cfg.templates)
        self.prompt_tokens = task.tokenize(
            [t.format(name) for name in self.names for t in self.templates]
        )  # [C * T, L]
        self.rows = common.rows_per_process(cfg["batch_size"], mesh)
        self.embed_images = common.make_gather(
            lambda v, b: {
                "z": task.embed_images(v, b["image"]),
                "label": b["label"],
                **({"novel": b["novel"]} if "novel" in b else {}),
            },  # fmt: skip
            mesh,
        )
        self.embed_texts = common.make_gather(
            lambda v, b: {"z": task.embed_texts(v, b["tokens"])}, mesh
        )

    def _source_names(self) -> list[str] | None:
        if jsonl.parse(self.data.cfg.source) is not None:
            return None
        cfg = self.data.cfg.copy_and_resolve_references()
        cfg.label_key = self.label_key
        return sources.class_names(cfg)

    def run(self, state) -> dict[str, float]:
        variables = common.variables(state)
        count = common.num_examples(self.source, self.data.max_examples)
        fetch = common.labelled_fetch(self.data, self.source, self.label_key)
        images = self.embed_images(variables, common.batches(count, fetch, self.rows))
        prompts = self.embed_texts(
            variables,
            common.batches(
                len(self.prompt_tokens), lambda i: {"tokens": self.prompt_tokens[i]}, self.rows
            ),
        )
        z = prompts["z"].reshape(len(self.names), len(self.templates), -1)
        classifier = zeroshot_classifier(z)
        correct = topk_correct(images["z"], classifier, images["label"])
        metrics = {"accuracy": float(correct.mean()), "count": float(len(correct))}
        if len(self.names) >= 10:
            top5 = topk_correct(images["z"], classifier, images["label"], k=5)
            metrics["accuracy_top5"] = float(top5.mean())
        return {**metrics, **common.novel_and_seen(correct, images)}
