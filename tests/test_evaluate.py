"""Zero-shot and retrieval metrics against brute-force definitions."""

import numpy as np
import pytest

from vlmjax import evaluate


def _unit(rng, n, d=8):
    return evaluate.normalise(rng.normal(size=(n, d)))


def _recall_brute(sim, groups, k):
    """For each query row: is any item of its group among the k highest-scoring items,
    counting ties against the query (stable, worst case)?"""
    hits = []
    for q in range(sim.shape[0]):
        relevant = groups == groups[q]
        best = sim[q][relevant].max()
        ahead = sum(1 for j in range(sim.shape[1]) if not relevant[j] and sim[q, j] >= best)
        hits.append(ahead < k)
    return float(np.mean(hits))


@pytest.mark.parametrize("with_duplicates", [False, True])
def test_retrieval_recall_matches_brute_force(with_duplicates):
    rng = np.random.default_rng(0)
    n = 40
    img, txt = _unit(rng, n), _unit(rng, n)
    txt = evaluate.normalise(txt + 0.8 * img)  # paired items are similar, not identical
    groups = rng.integers(0, 15, n) if with_duplicates else np.arange(n)
    got = evaluate.retrieval_recall(img, txt, groups if with_duplicates else None, (1, 5))
    sim = img @ txt.T
    for k in (1, 5):
        assert got[f"i2t_recall@{k}"] == pytest.approx(_recall_brute(sim, groups, k))
        assert got[f"t2i_recall@{k}"] == pytest.approx(_recall_brute(sim.T, groups, k))
    assert 0.0 < got["i2t_recall@1"] < got["i2t_recall@5"] < 1.0


def test_retrieval_perfect_and_duplicate_captions():
    eye = np.eye(4, dtype=np.float32)
    assert evaluate.retrieval_recall(eye, eye, ks=(1,)) == {
        "i2t_recall@1": 1.0,
        "t2i_recall@1": 1.0,
    }
    # Texts 0 and 1 are the same caption: image 1 retrieving text 0 is not a miss.
    img = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    txt = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    groups = evaluate.caption_groups(np.array([[5, 6], [5, 6], [7, 8]]))
    assert groups[0] == groups[1] != groups[2]
    assert evaluate.retrieval_recall(img, txt, groups, ks=(1,))["i2t_recall@1"] == 1.0
    assert evaluate.retrieval_recall(img, txt, None, ks=(1,))["i2t_recall@1"] == pytest.approx(
        2 / 3
    )


def test_zeroshot_classifier_is_normalised_prompt_mean():
    rng = np.random.default_rng(1)
    prompts = rng.normal(size=(3, 4, 8)).astype(np.float32)
    classifier = evaluate.zeroshot_classifier(prompts)
    unit = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)
    expected = unit.mean(1) / np.linalg.norm(unit.mean(1), axis=-1, keepdims=True)
    np.testing.assert_allclose(classifier, expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(classifier, axis=-1), 1.0, rtol=1e-6)


def test_topk_accuracy():
    classifier = np.eye(3, dtype=np.float32)
    images = np.array([[0.9, 0.1, 0.0], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [1, 1, 0]], np.float32)
    labels = np.array([0, 1, 2, 1])
    # Row 1: class 1 is second; row 3 ties classes 0 and 1: a tie counts against it.
    np.testing.assert_array_equal(
        evaluate.topk_accuracy(images, classifier, labels, k=1), [1, 0, 1, 0]
    )
    np.testing.assert_array_equal(
        evaluate.topk_accuracy(images, classifier, labels, k=2), [1, 1, 1, 1]
    )
