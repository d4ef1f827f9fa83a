"""Evaluation of image-text embeddings: zero-shot classification and retrieval recall@K.

The metric functions are plain numpy on host arrays of unit-norm float32 embeddings, so they
are exact and easy to check; the device work (running the towers over a split, sharded over
the mesh) is done by the task (`tasks/contrastive.py`), which gathers every embedding to
every process first.

- Zero-shot classification (Radford et al., 2021): each class's text embedding is the mean
  of its prompts' unit embeddings (a prompt ensemble), renormalised; an image is assigned
  the class with the largest cosine similarity.
- Retrieval: image->text and text->image over the N pairs of a split. Captions often repeat
  (two photos both "a dog on grass"): a retrieved item counts as correct when its caption is
  identical (same tokens) to the query's, so duplicates are not scored as misses. With
  unique captions this is the usual recall@K (the paired item is in the top K).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zeroshot_classifier(prompt_embeddings: np.ndarray) -> np.ndarray:
    """[C, T, E] unit embeddings of T prompts for each of C classes -> [C, E] unit
    class embeddings (the normalised mean over prompts)."""
    return normalise(normalise(prompt_embeddings).mean(axis=1))


def topk_accuracy(
    image_embeddings: np.ndarray, classifier: np.ndarray, labels: np.ndarray, k: int = 1
) -> np.ndarray:
    """Per-image 0/1 [N]: is labels[i] among the k classes most similar to image i?

    image_embeddings [N, E], classifier [C, E] (both unit norm), labels int [N]."""
    scores = image_embeddings @ classifier.T  # [N, C]
    k = min(k, scores.shape[1])
    # Ties are broken against the true class: correct only if strictly fewer than k
    # classes score higher or equal.
    true = scores[np.arange(len(labels)), labels][:, None]
    better = (scores > true).sum(1) + ((scores == true).sum(1) - 1)
    return (better < k).astype(np.float32)


def caption_groups(tokens: np.ndarray) -> np.ndarray:
    """int [N]: equal ids for identical token rows (identical captions)."""
    _, groups = np.unique(np.asarray(tokens), axis=0, return_inverse=True)
    return groups.reshape(-1)


def retrieval_recall(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    groups: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K both ways over N pairs (image i <-> text i).

    image_embeddings, text_embeddings [N, E] unit norm; `groups` [N] (e.g. from
    `caption_groups`) marks texts that are the same caption, so retrieving any of them
    counts; None means every caption is distinct. Returns {"i2t_recall@K", "t2i_recall@K"}.
    """
    n = image_embeddings.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    sim = image_embeddings @ text_embeddings.T  # [N images, N texts]
    relevant = groups[:, None] == groups[None, :]  # [N, N] symmetric
    out = {}
    for name, scores in (("i2t", sim), ("t2i", sim.T)):
        # Rank of the best relevant item: how many irrelevant items score strictly higher.
        best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
        rank = np.where(relevant, False, scores >= best).sum(axis=1)
        for k in ks:
            out[f"{name}_recall@{k}"] = float((rank < k).mean())
    return out
