"""`vlmjax bench`: every command on tiny sizes, checking the numbers it reports (never the
timings themselves, which depend on the machine)."""

import json
import math
import os
import tarfile

import numpy as np
import pytest

from vlmjax import cli, flops, losses
from vlmjax import mesh as mesh_lib
from vlmjax.bench import common, inputs, loss, step
from vlmjax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_timed_runs_caps_runs_by_budget():
    calls = []
    median, runs = common.timed_runs(lambda: calls.append(1), repeats=5, max_seconds=1e9)
    assert runs == 5 and len(calls) == 6 and median >= 0  # one warm-up
    calls.clear()
    _, runs = common.timed_runs(lambda: calls.append(1), repeats=5, max_seconds=0.0)
    assert runs == 1 and len(calls) == 2


def test_markdown_table():
    assert common.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n| --- | --- |\n| 1 | x |"


def test_loss_bench_memory_and_timing(capsys):
    results = loss.bench_loss((2048,), embed_dim=16, repeats=1, max_seconds=0.0, tile=64)
    out = capsys.readouterr().out
    assert len(results) == len(losses.KINDS) * len(losses.IMPLS)
    by = {(r["kind"], r["impl"]): r for r in results}
    for kind in losses.KINDS:
        gathered, chunked, tiled = (by[kind, impl] for impl in ("all_gather", "chunked", "tiled"))
        # Each of 8 devices holds 256 rows: all_gather builds [256, 2048] float32 logits
        # (2 MiB; the softmax builds both directions), the ring only [256, 256] blocks, the
        # tiled ring [256, 64] tiles.
        assert gathered["temp_bytes"] >= 2 * 2**20
        assert chunked["temp_bytes"] < gathered["temp_bytes"] / 2
        assert tiled["temp_bytes"] < chunked["temp_bytes"] / 2
        for r in (gathered, chunked, tiled):
            assert r["step_s"] > 0 and r["runs"] == 1
            assert r["total_bytes"] >= 8 * r["temp_bytes"]
        assert f"{kind} B=2048: tiled temp = 1/" in out
    assert out.count("| 2048 |") == 6 and "temp MiB / device" in out
    assert out.count("x chunked's") == 2


def test_loss_bench_skips_timing_that_would_not_fit(capsys):
    mesh = mesh_lib.make_mesh()
    r = loss.loss_case("sigmoid", "all_gather", 1024, 8, mesh, ram_fraction=0.0)
    assert r["step_s"] is None and r["runs"] == 0 and r["temp_bytes"] > 0 and not r["fits"]
    r = loss.loss_case("sigmoid", "chunked", 1024, 8, mesh, repeats=0)  # memory only
    assert r["step_s"] is None and r["runs"] == 0 and r["fits"]
    loss.bench_loss((1024,), embed_dim=8, ram_fraction=0.0)
    assert capsys.readouterr().out.count("not timed (would need ") == 6


def test_accumulation_bench(capsys):
    """The CLIP step at k = 1, 2 (a tiny CLIP, 32 pairs): equal gradients. (At this size
    fixed costs dominate the memory; tests/test_contrastive_accum.py checks that it falls.)"""
    from contrastive_accum_worker import tiny_clip

    model = tiny_clip("softmax")
    results = loss.bench_accum((1, 2), 32, steps=1, model=model, image_size=16)
    one, two = results
    assert (one["k"], two["k"]) == (1, 2) and one["grad_diff"] == 0
    assert two["grad_diff"] < 1e-5 and one["temp_bytes"] > 0 and two["temp_bytes"] > 0
    assert one["step_s"] > 0 and two["step_s"] > 0
    out = capsys.readouterr().out
    assert "| 2 | 32 |" in out and "ViT 16 px, patch 8, width 32, 2 layers" in out


def test_measure_peak_runs():
    assert step.measure_peak_tflops(size=128, iters=2) > 0


def test_train_bench_cli(tiny_config, tmp_path, capsys):
    config = tiny_config()
    out_json = tmp_path / "train.json"
    argv = ["bench", "train", "--config", os.path.join(ROOT, "experiments/shapes_vit.py:tiny")]
    argv += ["--steps", "2", "--warmup", "1", "--measure_peak", "--peak_size", "128"]
    argv += ["--json", str(out_json), f"--config.data.data_dir={config.data.data_dir}"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| batch | img/s | step ms |" in out and "123.26 GFLOP" in out
    report = json.loads(out_json.read_text())
    (r,) = report["results"]
    assert r["batch"] == 64 and r["devices"] == 8 and r["device_kind"] == "cpu"
    model = vit.ViT(**config.model.to_dict(), num_classes=6)
    assert r["flops_per_example"] == pytest.approx(flops.per_example(config, model))
    assert r["examples_per_sec"] == pytest.approx(64 / r["step_s"])
    tflops = r["flops_per_example"] * r["examples_per_sec"] / 8 / 1e12
    assert r["tflops_per_device"] == pytest.approx(tflops)
    assert r["mfu"] is None  # no datasheet peak for a CPU
    assert r["mfu_measured"] == pytest.approx(tflops / report["measured_peak_tflops"])
    assert r["peak_memory_bytes"] is None  # CPU devices report no memory stats
    # The head starts at zero: the loss begins at log(6) and three steps barely move it.
    assert abs(r["loss"] - math.log(6)) < 0.3
    assert r["compile_s"] > 0


def test_data_bench(tiny_config, capsys):
    result = inputs.bench_data(tiny_config(), batches=2, warmup=1)
    assert result["shapes"]["image"] == (64, 32, 32, 3)
    assert result["workers"] == 0  # shapes: the automatic count is 0
    assert result["examples_per_sec"] > 0 and result["cores"] >= 1 and result["start_s"] > 0
    assert result["per_core"] == pytest.approx(result["examples_per_sec"] / result["cores"])
    assert result["per_worker"] == result["examples_per_sec"]
    print(inputs.data_table(tiny_config(), [result]))
    assert "| img/s per worker |" in capsys.readouterr().out


def test_webdataset_bench_writes_shards_and_reads_them_as_clip_does(tmp_path, capsys):
    """`bench data --wds DIR --make_shards 1`: img2dataset-layout shards of 256 px JPEGs,
    a CLIP BPE trained on their captions, and CLIP ViT-B/16's batches (224 px, 77 tokens)."""
    from PIL import Image

    from vlmjax.data import hf_tokenizer, shapes
    from vlmjax.data.tokenizer import load_tokenizer

    folder = str(tmp_path / "wds")
    argv = ["bench", "data", "--wds", folder, "--make_shards", "1", "--samples_per_shard", "12"]
    argv += ["--num_workers", "0", "--batch_size", "4", "--batches", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| contrastive | 4 | 0 |" in out
    assert "index: 36 bytes per record on disk" in out
    with tarfile.open(os.path.join(folder, "00000.tar")) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
        assert len(names) == 36
        image = Image.open(tar.extractfile("000000003.jpg"))
        assert (image.format, image.size) == ("JPEG", (256, 256))
        caption = tar.extractfile("000000003.txt").read().decode()
    assert caption == shapes.split_example("train", 3, 256)["caption"]
    tok = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    assert isinstance(tok, hf_tokenizer.HFTokenizer)
    assert tok.decode(tok.encode(caption, 77)[0]) == caption

    report = inputs.bench_wds(folder, num_workers=(0,), batch_size=4, batches=1)
    (r,) = report["results"]
    assert (r["shapes"]["image"], r["shapes"]["tokens"]) == ((4, 224, 224, 3), (4, 77))
    # On disk a fixed 36-byte record per sample; in memory a few arrays per shard, whatever
    # the number of samples (here well under 2 KiB for the shard's 12).
    assert report["index_bytes_on_disk"] == 36
    assert 0 < report["index_bytes_in_memory"] * 12 < 2048


def test_compile_time_of_a_train_step(tiny_config):
    lower_s, compile_s = step.compile_time(tiny_config())
    assert lower_s > 0 and compile_s > 0


def test_vit_b16_compile_config_is_b16():
    config = step.vit_b16_config(depth=24, scan=True, batch_size=8)
    model = flops.model_from_config(config)
    assert model.hparams() == dict(width=768, depth=24, mlp_dim=3072, num_heads=12, patch_size=16)
    assert model.scan and config.data.image_size == 224
    # 24 layers: twice the encoder FLOPs of ViT-B/16 plus the same patch embedding and head.
    assert flops.per_example(config) == pytest.approx(
        3 * (2 * 17.56e9 * 2 - flops.dense(196, 768, 768) + flops.dense(1, 768, 1000)), rel=1e-3
    )


def test_flops_command(capsys):
    argv = ["bench", "flops", "--config", os.path.join(ROOT, "experiments/shapes_vit.py:tiny")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "vit: 7.9 MFLOP per example" in out
    assert "123.26 GFLOP per image-text pair" in out and "123.8" in out


def test_simulate_cpu_devices_keeps_an_explicit_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    common.simulate_cpu_devices()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    common.simulate_cpu_devices(8)
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_dump_to=/tmp/x",
        "--xla_force_host_platform_device_count=8",
    ]
    assert np.isfinite(common.available_ram()) and common.available_ram() > 0
