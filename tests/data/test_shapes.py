"""Tests of the embedded shapes dataset: rendering, semantics of the text, tfds round trip."""

import itertools
import re
import threading

import numpy as np
import pytest

from vlmjax.data import shapes

TINY = dict(image_size=32, num_train=64, num_heldout=32)
HELD = {(shapes.KINDS.index(k), shapes.COLOURS.index(c)) for k, c in shapes.HELDOUT_COMBOS}
_WORDS = "|".join
_OBJ = rf"a (small|large) ({_WORDS(shapes.COLOURS)}) ({_WORDS(shapes.KINDS)})"  # size colour kind
CAPTION = re.compile(rf"^{_OBJ}(?: ({_WORDS(shapes.RELATIONS)}) {_OBJ})?$")
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("shapes_tfds"))
    shapes.prepare(data_dir=path, **TINY)
    return path


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _scene(example) -> tuple[list[tuple[str, str, str]], str | None]:
    """([(size, colour, kind)] large first, relation of the small to the large) from the caption.

    Also checks that the caption agrees with `kinds`, `colours` and `label`.
    """
    match = CAPTION.match(_text(example["caption"]))
    assert match, example["caption"]
    first = match.group(1, 2, 3)
    kinds, colours = np.asarray(example["kinds"]), np.asarray(example["colours"])
    if match.group(4) is None:
        objects, relation = [first], None
        assert kinds[1] == colours[1] == -1
    else:
        second = match.group(5, 6, 7)
        assert {first[0], second[0]} == {"small", "large"}
        if first[0] == "large":
            objects, relation = [first, second], INVERSE[match.group(4)]
        else:
            objects, relation = [second, first], match.group(4)
    for slot, (_, colour, kind) in enumerate(objects):
        assert shapes.KINDS[kinds[slot]] == kind
        assert shapes.COLOURS[colours[slot]] == colour
    assert example["label"] == kinds[0]  # the large shape's kind, or the only shape's
    return objects, relation


def _expected_answer(question: str, objects, relation) -> str:
    """The answer to `question` about the scene, worked out independently of the renderer."""

    def find(ref: str) -> int:  # "the [size] kind" -> the one slot it denotes
        words = ref.split()
        hits = [i for i, (s, _, k) in enumerate(objects) if k == words[-1]]
        if len(words) == 3:
            hits = [i for i in hits if objects[i][0] == words[1]]
        assert len(hits) == 1, (question, objects)
        return hits[0]

    if m := re.fullmatch(r"what colour is (the .+)\?", question):
        return objects[find(m[1])][1]
    if m := re.fullmatch(r"what size is (the .+)\?", question):
        return objects[find(m[1])][0]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        hits = [k for s, c, k in objects if m[1] in (s, c)]
        assert len(hits) == 1, (question, objects)
        return hits[0]
    if question == "how many shapes are there?":
        return ("one", "two")[len(objects) - 1]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((c, k) == (m[1], m[2]) for _, c, k in objects) else "no"
    if m := re.fullmatch(r"where is (the .+) relative to (the .+)\?", question):
        a, b = find(m[1]), find(m[2])
        assert {a, b} == {0, 1}
        return relation if a == 1 else INVERSE[relation]
    raise AssertionError(f"unknown question {question!r}")


def _colour_masks(image: np.ndarray) -> np.ndarray:
    """bool [6, S, S]: bright pixels whose hue is nearest to each palette colour."""
    image = image.astype(np.float32)
    bright = image.max(-1)
    palette = shapes._RGB / shapes._RGB.max(-1, keepdims=True)
    hue = image / np.maximum(bright, 1.0)[..., None]
    nearest = np.argmin(((hue[..., None, :] - palette) ** 2).sum(-1), -1)
    return np.stack([(bright > 140) & (nearest == c) for c in range(len(shapes.COLOURS))])


def test_render_example_types_and_values():
    example = shapes.render_example(np.random.default_rng(0), 48, False, False)
    assert set(example) == {
        "image", "label", "caption", "question", "answer", "novel", "kinds", "colours",
    }  # fmt: skip
    assert example["image"].shape == (48, 48, 3) and example["image"].dtype == np.uint8
    assert example["kinds"].dtype == np.int64 and example["kinds"].shape == (2,)
    assert example["colours"].dtype == np.int64 and example["colours"].shape == (2,)
    assert example["novel"] == 0
    _scene(example)
    # Same generator state, same example; a pure function of the rng.
    again = shapes.render_example(np.random.default_rng(0), 48, False, False)
    np.testing.assert_array_equal(example["image"], again["image"])
    assert example["question"] == again["question"]
    with pytest.raises(ValueError):
        shapes.render_example(np.random.default_rng(0), 32, allow_heldout=False, force_novel=True)


def test_captions_answers_and_images_agree():
    relations, yes_no, seen_questions = 0, [], set()
    for i in range(300):
        example = shapes.split_example("train" if i % 2 else "heldout", i, 32)
        objects, relation = _scene(example)
        question = example["question"]
        assert example["answer"] == _expected_answer(question, objects, relation), example
        seen_questions.add(question.split()[:2][1])
        if question.startswith("is there"):
            yes_no.append(example["answer"] == "yes")
        masks = _colour_masks(example["image"])
        extents = []
        for _, colour, _ in objects:
            ys, xs = np.nonzero(masks[shapes.COLOURS.index(colour)])
            extents.append((ys.mean(), xs.mean(), max(np.ptp(ys), np.ptp(xs)) + 1))
        if len(objects) == 1:  # the stated size is the drawn size
            assert (extents[0][2] >= 12) == (objects[0][0] == "large"), example["caption"]
        elif objects[0][1] != objects[1][1]:  # distinct colours: check the stated relation
            (ly, lx, _), (sy, sx, _) = extents
            dy, dx = sy - ly, sx - lx  # small relative to large, y down
            axis = {"above": -dy, "below": dy, "left of": -dx, "right of": dx}
            assert axis[relation] > 0 and axis[relation] > max(axis.values()) - 1e-6
            relations += 1
    assert relations > 50
    assert 0.35 < np.mean(yes_no) < 0.65 and len(yes_no) > 20
    assert seen_questions == {"colour", "size", "shape", "many", "there", "is"}


def test_train_never_uses_heldout_combos_and_heldout_is_half_novel():
    novel = []
    for i in range(400):
        train = shapes.split_example("train", i, 32)
        pairs = {(k, c) for k, c in zip(train["kinds"], train["colours"], strict=True) if k >= 0}
        assert not pairs & HELD and train["novel"] == 0
        assert not any(f"{c} {k}" in train["question"] for k, c in shapes.HELDOUT_COMBOS)
        held = shapes.split_example("heldout", i, 32)
        pairs = {(k, c) for k, c in zip(held["kinds"], held["colours"], strict=True) if k >= 0}
        assert held["novel"] == bool(pairs & HELD)
        novel.append(held["novel"])
    assert 0.4 < np.mean(novel) < 0.6


def test_kinds_render_differently():
    for diameter in (0.25, 0.45):  # the smallest small and the smallest large shape at 32 px
        masks = [shapes._coverage(k, 16, 16, diameter * 16, 32) > 0.5 for k in range(6)]
        assert all(m.sum() >= 15 for m in masks)
        for a, b in itertools.combinations(masks, 2):
            # >= 10 pixels and >= 15% of the smaller shape differ (circle vs square,
            # the closest pair, differ in their four corners).
            assert (a != b).sum() >= max(10, 0.15 * min(a.sum(), b.sum()))


def test_prepare_is_deterministic_and_round_trips(tiny_dir, tmp_path):
    other = shapes.prepare(data_dir=str(tmp_path), **TINY)
    assert other.info.splits["train"].num_examples == 64
    assert other.info.splits["heldout"].num_examples == 32
    for split, n in (("train", 64), ("heldout", 32)):
        first = shapes.data_source(split, data_dir=tiny_dir, **TINY)
        second = shapes.data_source(split, data_dir=str(tmp_path), **TINY)
        assert len(first) == len(second) == n
        for i in (0, 1, n // 2, n - 1):
            a, b = first[i], second[i]
            assert a["image"].dtype == np.uint8 and a["image"].shape == (32, 32, 3)
            assert a["image"].tobytes() == b["image"].tobytes()
            assert isinstance(a["caption"], bytes) and a["caption"] == b["caption"]
            # Record i is example i, exactly as rendered.
            expected = shapes.split_example(split, i, 32)
            np.testing.assert_array_equal(a["image"], expected["image"])
            np.testing.assert_array_equal(a["kinds"], expected["kinds"])
            np.testing.assert_array_equal(a["colours"], expected["colours"])
            assert a["kinds"].dtype == a["colours"].dtype == np.int64
            assert int(a["label"]) == expected["label"] and int(a["novel"]) == expected["novel"]
            for key in ("caption", "question", "answer"):
                assert a[key].decode() == expected[key]
    train = shapes.data_source("train", data_dir=tiny_dir, **TINY)
    assert all(train[i]["novel"] == 0 for i in range(len(train)))


def test_prepare_is_idempotent_and_safe_concurrently(tmp_path):
    errors = []

    def build():
        try:
            shapes.prepare(data_dir=str(tmp_path), image_size=16, num_train=8, num_heldout=4)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    source = shapes.data_source(
        "heldout", data_dir=str(tmp_path), image_size=16, num_train=8, num_heldout=4
    )
    assert len(source) == 4 and source[3]["image"].shape == (16, 16, 3)
    builder = shapes.prepare(data_dir=str(tmp_path), image_size=16, num_train=8, num_heldout=4)
    assert builder.builder_config.name == "s16_tr8_ho4"


def test_unprepared_source_and_default_config(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="prepare"):
        shapes.data_source("train", data_dir=str(tmp_path), **TINY)
    monkeypatch.setenv("VLMJAX_DATA_DIR", str(tmp_path))
    assert shapes.default_data_dir() == str(tmp_path)
    # The default sizes resolve to the registered default config (not built here).
    builder = shapes._builder(None, 32, 20000, 2000)
    assert builder.builder_config is shapes.Shapes.BUILDER_CONFIGS[0]
    assert builder.builder_config.name == "s32_tr20000_ho2000"
    assert builder.data_dir.startswith(str(tmp_path))
