"""Two local processes x 4 CPU devices (gloo collectives) against one process x 8 devices."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlmjax import checkpoint, tasks, train
from vlmjax import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny"
OVERRIDES = {
    "total_steps": 6,
    "log_every": 1,
    "eval_every": 0,  # evaluate at the end only
    "checkpoint_every": 3,
    "optimizer.warmup_steps": 2,
}


def _launch(processes: int, devices: int, workdir: str, data_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PORT")}
    env.update(JAX_PLATFORMS="cpu", VLMJAX_CPU_DEVICES=str(devices))
    cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), str(processes), "--"]
    cmd += [sys.executable, "-m", "vlmjax.cli", "train", "--config", TINY, "--workdir", workdir]
    cmd += [f"--config.data.data_dir={data_dir}"]
    cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[1] " in result.stdout  # both processes ran and reported


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _params(workdir, config, mesh_shape, step=None):
    mesh = mesh_lib.make_mesh(*mesh_shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        run = train.setup(config, tasks.build(config), mesh)
        mngr = checkpoint.manager(workdir)
        state = checkpoint.restore(mngr, checkpoint.abstract(run.abstract, run.shardings), step)
        mngr.close()
    return jax.device_get(state.params)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("mp") / "two")
    _launch(2, 4, workdir, data_dir)
    return workdir


def _assert_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


def test_two_processes_equal_one(two_process_run, tiny_config, tmp_path):
    """Same losses, final params (atol 1e-5: gloo and in-process reductions add in another
    order) and held-out metrics as one process with 8 devices on the same seed."""
    one = str(tmp_path / "one")
    config = tiny_config(OVERRIDES)
    metrics = train.train(config, one)
    with open(os.path.join(two_process_run, train.FINAL_METRICS)) as f:
        two_metrics = json.load(f)["metrics"]
    assert two_metrics["eval/heldout/accuracy"] == pytest.approx(
        metrics["eval/heldout/accuracy"], abs=1e-6
    )
    one_losses, two_losses = _losses(one), _losses(two_process_run)
    assert sorted(two_losses) == list(range(1, 7))
    np.testing.assert_allclose(
        [two_losses[s] for s in range(1, 7)], [one_losses[s] for s in range(1, 7)], rtol=1e-5
    )
    _assert_close(_params(two_process_run, config, (8, 1, 1)), _params(one, config, (8, 1, 1)))


def test_restore_two_process_checkpoint_on_one_process_and_another_mesh(
    two_process_run, tiny_config, tmp_path
):
    """Saved by 2 processes on data=8; restored by 1 process on fsdp=8 (bit-identical), then
    extended to 9 steps exactly as a 1-process run extended the same way."""
    config = tiny_config(OVERRIDES)
    saved = _params(two_process_run, config, (8, 1, 1), step=6)
    on_fsdp = _params(two_process_run, config, (1, 8, 1), step=6)
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(on_fsdp), strict=True):
        np.testing.assert_array_equal(x, y)

    longer = {**OVERRIDES, "total_steps": 9}
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two_process_run, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "3"))
    train.train(tiny_config({**longer, "mesh.data": 1, "mesh.fsdp": 8}), resumed)
    straight = str(tmp_path / "straight")
    train.train(tiny_config(OVERRIDES), straight)  # 6 steps, as the 2-process run did
    train.train(tiny_config(longer), straight)
    resumed_losses, straight_losses = _losses(resumed), _losses(straight)
    np.testing.assert_allclose(
        [resumed_losses[s] for s in (7, 8, 9)], [straight_losses[s] for s in (7, 8, 9)], rtol=1e-5
    )
    _assert_close(_params(resumed, config, (8, 1, 1)), _params(straight, config, (8, 1, 1)))


EVAL_OVERRIDES = {
    "total_steps": 2,
    "log_every": 1,
    "eval_every": 0,
    "checkpoint_every": 2,
    "eval_batch_size": 13,  # divides neither the 8 devices nor the splits
    "optimizer.warmup_steps": 1,
}


def _eval_two_processes(workdir: str, step: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PORT")}
    env.update(JAX_PLATFORMS="cpu", VLMJAX_CPU_DEVICES="4")
    cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "--"]
    cmd += [sys.executable, "-m", "vlmjax.cli", "eval", "--workdir", workdir]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(workdir, f"eval_{step}.json")) as f:
        return json.load(f)["metrics"]


@pytest.mark.parametrize(
    "name, evals",
    [
        ("shapes_clip.py:tiny", {"evals.fewshot.shots": (1, 3), "evals.zeroshot.max_examples": 40,
                                 "evals.retrieval.max_examples": 40,
                                 "evals.fewshot.max_examples": 40}),
        ("shapes_decoder.py:tiny", {"evals.vqa.max_examples": 30, "evals.caption.max_examples": 30,
                                    "evals.vqa.max_new_tokens": 2}),
    ],
)  # fmt: skip
def test_two_process_eval_equals_one(data_dir, tmp_path, name, evals):
    """`vlmjax eval` on 2 processes x 4 devices gives the numbers one process with 8 devices
    gave at the end of training, for every evaluator of the CLIP and decoder recipes."""
    from conftest import experiment

    config = experiment(name, data_dir, {**EVAL_OVERRIDES, **evals})
    workdir = str(tmp_path / "run")
    one = train.train(config, workdir)
    two = _eval_two_processes(workdir, 2)
    assert set(two) == set(one) and len(one) >= 5
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
