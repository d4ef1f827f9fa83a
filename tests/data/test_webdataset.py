"""WebDataset / parquet / CSV sources and mixtures; bad samples skipped and counted in
training, resume, and per-process shares (issue 15)."""

import json
import logging
import os
import pickle

import numpy as np
import pytest
import wds_testdata as td
from conftest import experiment
from PIL import Image

from vlmjax import tasks, train
from vlmjax.data import decode, file_index, mixture, pipeline, skips, sources, webdataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    return {
        "tar": td.write_shards(str(root / "tar")),
        "parquet": td.write_parquet(str(root / "parquet")),
        "csv": td.write_csv(str(root / "csv")),
    }


def _expected_image(i):
    _, image, _ = td.sample(i)
    if i == td.GREY16:
        return None
    import io

    with Image.open(io.BytesIO(image)) as img:
        return np.asarray(img.convert("RGB"))


def test_tar_source_index_records_and_bad_samples(data):
    src = webdataset.TarSource(data["tar"])
    assert len(src) == td.NUM and len(src.shards) == 2
    # 36 bytes a sample on disk, after a 64-byte header; in memory, one integer per shard.
    for shard in src.shards:
        size = os.path.getsize(shard + file_index.SUFFIX)
        assert size == file_index.HEADER_BYTES + 36 * td.PER_SHARD
    assert src._starts.tolist() == [0, 20, 40]
    for i in range(td.NUM):
        if i in td.BAD:
            with pytest.raises(decode.BadRecord) as e:
                src[i]
            assert str(e.value).startswith(f"{src.shards[i // 20]}:{td.key(i)}"), e.value
            continue
        record = src[i]
        assert record["caption"] == td.sample(i)[2].decode()
        assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
        if i == td.GREY16:  # scaled to 8 bits: the grey levels come back exactly
            scene = Image.fromarray(td.shapes.split_example("train", i, 32)["image"])
            grey = np.asarray(scene.convert("L"))
            np.testing.assert_array_equal(record["image"], np.repeat(grey[..., None], 3, -1))
        else:
            np.testing.assert_array_equal(record["image"], _expected_image(i))
    # CMYK JPEG -> RGB near the scene (JPEG error only).
    scene = td.shapes.split_example("train", td.CMYK, 32)["image"].astype(int)
    assert np.abs(src[td.CMYK]["image"].astype(int) - scene).mean() < 6
    # The caption from a key of the .json member instead of the .txt.
    src_json = webdataset.TarSource(data["tar"], json_caption_key="caption")
    assert src_json[0]["caption"] == td.sample(0)[2].decode()
    with pytest.raises(decode.BadRecord, match=r"000000013\.json: no caption"):
        src_json[13]
    assert src_json.caption(3) == td.sample(3)[2].decode()
    with pytest.raises(decode.BadRecord, match=r"000000013\.txt: no caption"):
        src.caption(13)


def test_index_is_rebuilt_when_the_shard_changes_and_can_live_elsewhere(data, tmp_path):
    import shutil
    import tarfile

    shard = str(tmp_path / "00000.tar")
    shutil.copy(webdataset.TarSource(data["tar"]).shards[0], shard)
    assert len(webdataset.TarSource(shard)) == td.PER_SHARD
    with tarfile.open(shard, "a") as tar:  # one more sample: size and mtime change
        td._add(tar, "extra.txt", b"an extra caption")
        td._add(tar, "extra.jpg", td.sample(0)[1])
    grown = webdataset.TarSource(shard)
    assert len(grown) == td.PER_SHARD + 1 and grown[td.PER_SHARD]["caption"] == "an extra caption"
    elsewhere = str(tmp_path / "index")
    webdataset.TarSource(shard, index_dir=elsewhere)
    (built,) = os.listdir(elsewhere)
    assert built.startswith("00000.tar.") and built.endswith(file_index.SUFFIX)
    assert not [f for f in os.listdir(elsewhere) if f.startswith(".idx-")]  # no temp left


def test_parquet_and_csv_yield_the_tar_examples(data):
    tar = webdataset.TarSource(data["tar"])
    parquet = sources.parquet.ParquetSource(data["parquet"])
    table = sources.csv_source.CsvSource(data["csv"])
    assert len(tar) == len(parquet) == len(table) == td.NUM
    for i in range(td.NUM):
        if i in td.BAD:
            for src in (parquet, table):
                with pytest.raises(decode.BadRecord):
                    src[i]
            continue
        want = tar[i]
        for src in (parquet, table):
            got = src[i]
            assert got["caption"] == want["caption"]
            np.testing.assert_array_equal(got["image"], want["image"])
    for src in (tar, parquet, table):  # worker processes get the sources pickled
        copy = pickle.loads(pickle.dumps(src))
        np.testing.assert_array_equal(copy[1]["image"], tar[1]["image"])
    with pytest.raises(decode.BadRecord, match=r"train.tsv:24: not UTF-8"):
        table[22]  # record 0 is line 2, after the header
    with pytest.raises(decode.BadRecord, match=r"00001.parquet:#16: empty caption"):
        parquet[36]  # row 16 of the second file
    with pytest.raises(ValueError, match=r"csv_caption_key='caption' is not a column .*'title'"):
        sources.csv_source.CsvSource(data["csv"], caption_key="caption")
    with pytest.raises(ValueError, match=r"parquet_image_key='image' .*\['key', 'jpg'"):
        sources.parquet.ParquetSource(data["parquet"], image_key="image")


def test_patterns_and_mixture(data, tmp_path):
    folder = os.path.dirname(data["tar"])
    assert file_index.braces("a{08..10}b{x,y}") == [
        f"a{n}b{c}" for n in ("08", "09", "10") for c in "xy"
    ]
    both = [os.path.join(folder, f"0000{s}.tar") for s in (0, 1)]
    assert file_index.expand(data["tar"]) == both
    assert file_index.expand(f"{folder}/*.tar") == both
    assert file_index.expand(f"{both[1]},{both[0]}") == both[::-1]
    with pytest.raises(FileNotFoundError, match=r"00002.tar' matches no file"):
        file_index.expand(os.path.join(folder, "{00000..00002}.tar"))
    # Weights 1::3 over sources of 40 and 10 records: a quarter / three quarters of each
    # period; the 40-record source appears once per epoch, the other 12x.
    mix = mixture.Mixture([list(range(40)), list(range(100, 110))], [1, 3])
    assert len(mix) == 160
    drawn = [mix[j] for j in range(len(mix))]
    assert sorted(x for x in drawn if x < 100) == list(range(40))
    assert sorted(x for x in drawn if x >= 100) == sorted(list(range(100, 110)) * 12)
    assert len(mix.pattern) == 4 and sorted(mix.pattern.tolist()) == [0, 1, 1, 1]
    assert [mix[j] for j in range(160)] == drawn  # a pure function of the position
    with pytest.raises(ValueError, match="2 positive numbers"):
        mixture.weights("1::0", 2)
    # Through data.source: the tar shards and the TSV, 1::1 (each shows every record once).
    both_cfg = _config(data["tar"], {"data.source": f"{data['tar']}::{data['csv']}"})
    mixed = sources.source(both_cfg.data, "train")
    assert isinstance(mixed, mixture.Mixture) and len(mixed) == 2 * td.NUM
    assert sorted(mixed.locate(j) for j in range(len(mixed))) == [
        (s, i) for s in (0, 1) for i in range(td.NUM)
    ]
    assert mixed[1]["caption"] == td.sample(mixed.locate(1)[1])[2].decode()
    # Checked with the config, before anything is built.
    from vlmjax import config as config_lib

    bad = _config(data["tar"], {"data.source": f"{folder}/{{00000..00002}}.tar::{data['csv']}"})
    bad.data.source_weights = "1::2::3"
    with pytest.raises(
        config_lib.ConfigError, match=r"00002.tar' matches no file.*must be 2 positive"
    ):
        config_lib.validate(bad)


def test_an_evaluator_reads_its_own_shards(data):
    """evals.NAME.source='wds:...' needs no split: the evaluator reads those shards."""
    from vlmjax import evaluators
    from vlmjax.evaluators import common

    config = _config(data["tar"], {"data.source": "shapes"})
    settings = evaluators.check_settings(
        "val", {"type": "retrieval", "source": data["tar"]}, config
    )
    source = common.open_source(evaluators._data(settings, config), required=("caption",))
    assert isinstance(source, webdataset.TarSource) and len(source) == td.NUM
    with pytest.raises(Exception, match="split is required"):
        evaluators.check_settings("val", {"type": "retrieval"}, config)


def _config(tar, workdir_overrides=()):
    overrides = {
        "data.source": f"wds:{tar}",
        "evals": "{}",
        "batch_size": 8,
        "total_steps": 5,  # one epoch of the 40 samples
        "log_every": 1,
        "checkpoint_every": 0,
        "optimizer.warmup_steps": 1,
        "data.max_skip_fraction": 0.5,
        **dict(workdir_overrides),
    }
    config = experiment("shapes_clip.py:tiny", "", overrides)
    if "num_workers" in config.data:  # decode in this process: a worker's start costs seconds
        config.data.num_workers = 0
    return config


def _expected_skips(num_batches, batch):
    """Failed reads per batch: each bad position and each bad replacement counts once."""
    task_src = list(range(td.NUM))
    order = [int(x) for x in pipeline.grain.MapDataset.source(task_src).shuffle(seed=0)]
    counts = []
    for b in range(num_batches):
        n = 0
        for pos in order[b * batch : (b + 1) * batch]:
            current, attempt = pos, 0
            while current in td.BAD:
                n += 1
                attempt += 1
                current = skips.replacement(pos, attempt, td.NUM)
        counts.append(n)
    return counts


def test_pipeline_shares_skip_fields_and_resume(data):
    config = _config(data["tar"])
    task = tasks.build(config)
    single = iter(task.train_dataset(0, 1, 0))
    halves = [iter(task.train_dataset(p, 2, 0)) for p in range(2)]
    resumed = iter(task.train_dataset(0, 1, 2 * 8))  # from the third batch
    expected = _expected_skips(5, 8)
    for b in range(5):
        whole = next(single)
        parts = [next(h) for h in halves]
        for k in ("image", "tokens", skips.SKIPPED):  # the union of the 2 shares is the batch
            np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
        assert int(whole[skips.SKIPPED].sum()) == expected[b]
        if b >= 2:
            again = next(resumed)
            for k in whole:
                np.testing.assert_array_equal(whole[k], again[k])
    reasons = [r for r in whole[skips.REASONS].tolist() if r] + ["x"]
    assert all(isinstance(r, str) for r in reasons)


def test_pipeline_processes_read_disjoint_records():
    """Each process opens the source but reads only its rows (and their replacements)."""
    import threading

    class Counting:
        def __init__(self):
            self.read, self.lock = [], threading.Lock()

        def __len__(self):
            return 64

        def __getitem__(self, i):
            with self.lock:
                self.read.append(int(i))
            return {"image": np.zeros((4, 4, 3), np.uint8), "label": int(i)}

    import ml_collections

    cfg = ml_collections.ConfigDict(dict(image_key="image", label_key="label", image_size=4))
    features = pipeline.classification_features(cfg)
    read = []
    for p in range(2):
        src = Counting()
        it = iter(
            pipeline.train_dataset(
                src, features, batch_size=4, seed=1, process_index=p, process_count=2, prefetch=0
            )
        )
        labels = sum((next(it)["label"].tolist() for _ in range(4)), [])
        assert sorted(set(src.read)) == sorted(labels)  # nothing else was read
        read.append(set(labels))
    assert not read[0] & read[1] and len(read[0] | read[1]) == 32


def _train_records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}


def test_training_skips_counts_and_resumes_exactly(data, tmp_path, caplog):
    """5 steps on the shards, stopped after step 2 and resumed: data/skipped counts exactly
    the bad reads at every step (the count survives the resume), the log names the first
    ones, and past data.max_skip_fraction a run stops. (That a resumed pipeline gives the
    straight run's batches: test_pipeline_shares_skip_fields_and_resume.)"""
    expected = np.cumsum(_expected_skips(5, 8)).tolist()
    workdir = str(tmp_path / "resumed")
    with caplog.at_level(logging.WARNING, logger="vlmjax"):
        train.train(_config(data["tar"]), workdir, stop_at=2)
    logged = [r.getMessage() for r in caplog.records if "skipped a bad record" in r.getMessage()]
    assert len(logged) == min(skips.LOGGED, expected[1])
    assert all(any(f":{td.key(i)}" in m for i in td.BAD) for m in logged), logged
    train.train(_config(data["tar"]), workdir)
    records = _train_records(workdir)
    assert [records[s]["data/skipped"] for s in range(1, 6)] == expected
    assert expected[-1] >= len(td.BAD)  # every bad sample was met in the epoch

    strict = _config(data["tar"], {"data.max_skip_fraction": 0.01})
    with pytest.raises(skips.TooManySkipped, match="max_skip_fraction=0.01"):
        train.train(strict, str(tmp_path / "strict"))
