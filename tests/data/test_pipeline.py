"""The grain pipeline: per-process shards, seeded order, resumable position, eval padding."""

import jax
import numpy as np
import pytest

from vlmjax import mesh as mesh_lib
from vlmjax.data import pipeline


class FakeSource:
    """len() + indexing like a tfds data source; record i has label i and an image of i's."""

    def __init__(self, n, size=8):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((self.size, self.size, 3), i % 256, np.uint8), "label": i}


def _features(size=8):
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(image_key="image", label_key="label", image_size=size))
    return pipeline.classification_features(cfg)


def _labels(it, steps):
    return [next(it)["label"].tolist() for _ in range(steps)]


def test_process_shards_are_disjoint_and_cover_an_epoch():
    source, seen = FakeSource(64), []
    for p in range(4):
        ds = pipeline.train_dataset(
            source, _features(), batch_size=4, seed=0, process_index=p, process_count=4
        )
        seen += sum(_labels(iter(ds), 4), [])  # one epoch of this process's 16 records
    assert sorted(seen) == list(range(64))


def test_global_batches_do_not_depend_on_the_process_count():
    source = FakeSource(48)
    single = iter(pipeline.train_dataset(source, _features(), batch_size=12, seed=5))
    split = [
        iter(
            pipeline.train_dataset(
                source, _features(), batch_size=4, seed=5, process_index=p, process_count=3
            )
        )
        for p in range(3)
    ]
    for _ in range(6):  # 1.5 epochs
        assert next(single)["label"].tolist() == sum(
            (next(it)["label"].tolist() for it in split), []
        )


def test_start_example_resumes_the_global_stream_at_any_batch_size():
    source = FakeSource(40)
    stream = sum(
        _labels(iter(pipeline.train_dataset(source, _features(), batch_size=6, seed=2)), 10), []
    )
    resumed = iter(
        pipeline.train_dataset(source, _features(), batch_size=4, seed=2, start_example=18)
    )
    assert sum(_labels(resumed, 5), []) == stream[18:38]


def test_order_is_seeded_and_reshuffled_each_epoch():
    make = lambda seed: iter(  # noqa: E731
        pipeline.train_dataset(FakeSource(32), _features(), batch_size=8, seed=seed)
    )
    a, b, c = _labels(make(0), 8), _labels(make(0), 8), _labels(make(1), 8)
    assert a == b and a != c
    first_epoch, second_epoch = sum(a[:4], []), sum(a[4:], [])
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(32))
    assert first_epoch != second_epoch


def test_iterator_state_resumes_on_the_next_batch():
    ds = pipeline.train_dataset(FakeSource(40), _features(), batch_size=8, seed=3, augment="flip")
    it = iter(ds)
    _labels(it, 3)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(ds)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["image"], want["image"])  # augmentation too


def test_augmentations():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    flips = [pipeline._augment(image, np.random.default_rng(s), ("flip",), 0) for s in range(20)]
    assert any((f == image[:, ::-1]).all() for f in flips)
    assert any((f == image).all() for f in flips)
    shifts = [pipeline._augment(image, np.random.default_rng(s), ("shift",), 2) for s in range(8)]
    assert any(not (s == image).all() for s in shifts)
    # Each shifted image is a window of the edge-padded original.
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")
    windows = [padded[y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
    assert all(any((w == s).all() for w in windows) for s in shifts)
    shuffled = pipeline._augment(image, np.random.default_rng(2), ("channel_shuffle",), 0)
    assert sorted(shuffled.reshape(-1, 3).T.tolist()) == sorted(image.reshape(-1, 3).T.tolist())
    assert pipeline.parse_augment("flip, channel_shuffle") == ("flip", "channel_shuffle")
    big = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    crops = [
        pipeline._augment(big, np.random.default_rng(s), ("random_resized_crop",), 0, size=16)
        for s in range(5)
    ]
    assert all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 5  # random crops differ
    assert pipeline.parse_augment("none") == ()
    with pytest.raises(ValueError, match="not one of"):
        pipeline.train_dataset(FakeSource(8), _features(), batch_size=2, seed=0, augment="mixup")


def test_features_resize_grayscale_and_name_missing_fields():
    features = _features(size=8)
    out = features({"image": np.zeros((16, 12), np.uint8), "label": 3})
    assert out["image"].shape == (8, 8, 3) and out["image"].dtype == np.uint8
    assert out["label"] == 3 and out["label"].dtype == np.int32
    with pytest.raises(KeyError, match="data.image_key"):
        features({"img": np.zeros((8, 8, 3), np.uint8), "label": 1})


@pytest.mark.parametrize("processes", [1, 3])
def test_eval_batches_cover_each_example_once(processes):
    seen, batches = [], []
    for p in range(processes):
        batches.append(
            list(
                pipeline.eval_batches(
                    FakeSource(10),
                    _features(),
                    batch_size=4,
                    process_index=p,
                    process_count=processes,
                )
            )
        )
        for b in batches[-1]:
            seen += b["label"][b["mask"] == 1].tolist()
    assert sorted(seen) == list(range(10))
    assert len({len(b) for b in batches}) == 1  # every process runs the same number of steps


def test_to_global_shards_the_batch_over_data_axes():
    mesh = mesh_lib.make_mesh(data=2, fsdp=4, tensor=1)
    batch = {"label": np.arange(16, dtype=np.int32)}
    out = pipeline.to_global(batch, mesh_lib.batch_sharding(mesh))["label"]
    assert out.shape == (16,)
    assert {s.data.shape for s in out.addressable_shards} == {(2,)}
    np.testing.assert_array_equal(jax.device_get(out), np.arange(16))
