"""Evaluator metrics against brute-force numpy definitions: retrieval with several captions
per image, zero-shot classification, the few-shot ridge probe, VQA answer normalisation,
and the class-name sets."""

import os

import numpy as np
import pytest

from vlmjax.data import classnames
from vlmjax.data import text as text_lib
from vlmjax.evaluators import answers, fewshot, retrieval, zeroshot


def _unit(rng, n, d=8):
    return zeroshot.l2_normalise(rng.normal(size=(n, d)))


def _recall_brute(scores, relevant, k):
    """Per query row: do fewer than k irrelevant items score at least the best relevant one?"""
    hits = []
    for q in range(scores.shape[0]):
        best = max(scores[q, j] for j in range(scores.shape[1]) if relevant[q, j])
        ahead = sum(
            1 for j in range(scores.shape[1]) if not relevant[q, j] and scores[q, j] >= best
        )
        hits.append(ahead < k)
    return float(np.mean(hits))


@pytest.mark.parametrize("duplicates", [False, True])
def test_retrieval_with_several_captions_per_image_matches_brute_force(duplicates):
    rng = np.random.default_rng(0)
    num_images = 30
    counts = rng.integers(1, 6, num_images)  # 1-5 captions per image, as COCO's 5
    owner = np.repeat(np.arange(num_images), counts)  # [T]
    img = _unit(rng, num_images)
    txt = zeroshot.l2_normalise(rng.normal(size=(len(owner), 8)) + 0.9 * img[owner])
    # With duplicates, a few captions are copies of other images' captions.
    groups = np.arange(len(owner))
    if duplicates:
        groups[rng.choice(len(owner), 10, replace=False)] = rng.choice(len(owner), 10)
    got = retrieval.recall_at_k(img, txt, owner, groups if duplicates else None, (1, 5))
    # Brute force: text j is relevant to image i if i owns a caption identical to j.
    relevant = np.array(
        [[any(groups[c] == groups[j] for c in np.flatnonzero(owner == i))
          for j in range(len(owner))] for i in range(num_images)]
    )  # fmt: skip
    sim = img @ txt.T
    for k in (1, 5):
        assert got[f"i2t_recall@{k}"] == pytest.approx(_recall_brute(sim, relevant, k))
        assert got[f"t2i_recall@{k}"] == pytest.approx(_recall_brute(sim.T, relevant.T, k))
    assert 0.0 < got["t2i_recall@1"] < got["t2i_recall@5"] < 1.0


def test_retrieval_any_caption_of_an_image_is_a_hit():
    # Image 0 has captions 0 and 1 and is close to caption 1 only; image 1 has caption 2.
    img = zeroshot.l2_normalise(np.array([[1, 0], [0.1, 1]], np.float32))
    txt = zeroshot.l2_normalise(np.array([[0, 1], [1, 0.1], [0.1, 1]], np.float32))
    got = retrieval.recall_at_k(img, txt, np.array([0, 0, 1]), None, (1,))
    assert got["i2t_recall@1"] == 1.0
    # Caption 0 ([0, 1]) is closest to image 1, not its own image 0: a t2i miss.
    assert got["t2i_recall@1"] == pytest.approx(2 / 3)


def test_retrieval_chunks_agree(monkeypatch):
    rng = np.random.default_rng(3)
    img, txt = _unit(rng, 50), _unit(rng, 120)
    owner = rng.integers(0, 50, 120)
    owner[:50] = np.arange(50)  # every image has a caption
    whole = retrieval.recall_at_k(img, txt, owner)
    monkeypatch.setattr(retrieval, "CHUNK", 7)
    assert retrieval.recall_at_k(img, txt, owner) == whole


def test_zeroshot_classifier_is_normalised_prompt_mean():
    rng = np.random.default_rng(1)
    prompts = rng.normal(size=(3, 4, 8)).astype(np.float32)
    classifier = zeroshot.zeroshot_classifier(prompts)
    unit = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)
    expected = unit.mean(1) / np.linalg.norm(unit.mean(1), axis=-1, keepdims=True)
    np.testing.assert_allclose(classifier, expected, rtol=1e-6)


def test_zeroshot_topk_matches_brute_force():
    rng = np.random.default_rng(2)
    images, classifier = _unit(rng, 200), _unit(rng, 12)
    labels = rng.integers(0, 12, 200)
    scores = images @ classifier.T
    for k in (1, 5):
        brute = [labels[i] in np.argsort(-scores[i])[:k] for i in range(200)]
        np.testing.assert_array_equal(zeroshot.topk_correct(images, classifier, labels, k), brute)
    # A tie with another class counts against the true one.
    tie = zeroshot.topk_correct(np.array([[1.0, 1.0]]), np.eye(2), np.array([1]), k=1)
    assert tie.tolist() == [0.0]


@pytest.mark.parametrize("n, d", [(30, 8), (6, 20)])  # the primal and the dual form
def test_ridge_probe_matches_numpy_least_squares(n, d):
    rng = np.random.default_rng(4)
    num_classes, l2 = 3, 0.5
    x, labels = rng.normal(size=(n, d)), np.arange(n) % num_classes
    x_test = rng.normal(size=(40, d))
    got = fewshot.ridge_probe(x, labels, x_test, num_classes, l2)
    # Reference: standardise, centre the targets, solve the regularised normal equations as
    # one stacked least-squares problem [xs; sqrt(l2) I] w = [y - mean; 0].
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    a = np.concatenate([xs, np.sqrt(l2) * np.eye(d)])
    b = np.concatenate([y - y.mean(0), np.zeros((d, num_classes))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    expected = (((x_test - mean) / std) @ w + y.mean(0)).argmax(1)
    np.testing.assert_array_equal(got, expected)


def test_ridge_probe_separates_informative_features():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 16)) * 3
    labels = np.repeat(np.arange(4), 5)
    x = centres[labels] + rng.normal(size=(20, 16))
    test_labels = rng.integers(0, 4, 100)
    x_test = centres[test_labels] + rng.normal(size=(100, 16))
    predicted = fewshot.ridge_probe(x, labels, x_test, 4, 1.0)
    assert (predicted == test_labels).mean() > 0.95


def test_pick_shots_takes_the_first_of_each_class():
    order = [(10, 0), (11, 1), (12, 0), (13, 0), (14, 2), (15, 1)]
    assert fewshot.pick_shots(iter(order), 2, 3) == {0: [10, 12], 1: [11, 15], 2: [14]}
    consumed = iter(order)
    assert fewshot.pick_shots(consumed, 1, 3) == {0: [10], 1: [11], 2: [14]}
    assert next(consumed) == (15, 1)  # stopped reading once every class was full


@pytest.mark.parametrize(
    "said, truth, same",
    [
        ("Two", "2", True),
        ("the red one.", "red 1", True),
        ("a Circle", "circle", True),
        ("1,000", "1000", True),
        ("3.5", "3 5", False),
        ("dont know", "don't know", True),
        ("yes!", "yes", True),
        ("blue", "red", False),
    ],
)
def test_vqa_answer_normalisation(said, truth, same):
    assert (answers.normalise_answer(said) == answers.normalise_answer(truth)) is same


def test_shipped_class_names_and_templates(tmp_path):
    imagenet = classnames.shipped("imagenet1k")
    assert len(imagenet) == 1000 and imagenet[0] == "tench" and imagenet[-1] == "toilet paper"
    assert classnames.wordnet_names()["n01440764"] == "tench"
    assert len(classnames.shipped("cifar10")) == 10
    cifar100 = classnames.shipped("cifar100")
    assert len(cifar100) == 100 and cifar100[1] == "aquarium fish"
    openai = text_lib.templates("openai_imagenet")
    assert len(openai) == 80 and all(t.count("{}") == 1 for t in openai)
    assert len(text_lib.templates("openai_cifar")) == 18
    # WordNet-id labels become the curated names; other labels only lose underscores.
    assert classnames.from_labels(["n01443537", "n01440764"]) == ["goldfish", "tench"]
    assert classnames.from_labels(["aquarium_fish"]) == ["aquarium fish"]
    with pytest.raises(ValueError, match="outside ImageNet-1k"):
        classnames.from_labels(["n99999999"])
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ncat\n\ndog\n")
    assert classnames.class_names(str(path), None) == ["cat", "dog"]
    assert classnames.class_names(["a", "b"], None) == ["a", "b"]
    assert classnames.class_names("", ["x_y"]) == ["x y"]
    with pytest.raises(ValueError, match="no class names"):
        classnames.class_names("", None)
    with pytest.raises(ValueError, match="neither a shipped set"):
        classnames.class_names(os.path.join(str(tmp_path), "missing.txt"), None)
