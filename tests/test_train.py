"""The train step under sharding, gradient accumulation, resume, and a short learning run."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlmjax import cli, tasks, train
from vlmjax import config as config_lib
from vlmjax import mesh as mesh_lib
from vlmjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    """The tiny ViT config with heads/mlp that divide a tensor axis of 4 (no data needed)."""
    config = config_lib.load(os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny")
    defaults = {
        "model.num_heads": 4,
        "model.width": 32,
        "model.mlp_dim": 64,
        "batch_size": 16,
        "optimizer.warmup_steps": 0,
    }
    for key, value in {**defaults, **overrides}.items():
        config_lib.override(config, key, str(value))
    return config


def _batches(n, batch_size, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, 6, (batch_size,)).astype(np.int32),
        }
        for _ in range(n)
    ]


def _run_steps(config, mesh, batches):
    """Init on `mesh`, run the jitted step over `batches`; returns (host params, losses)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        run = train.setup(config, tasks.build(config), mesh)
        state = run.init_fn(jax.random.PRNGKey(config.seed))
        losses = []
        for host_batch in batches:
            state, metrics = run.train_step(
                state, pipeline.to_global(host_batch, run.batch_sharding)
            )
            losses.append(float(metrics["train/loss"]))
        return jax.device_get(state.params), losses, state


@pytest.mark.parametrize(
    "shape",
    # Every axis, alone and with another (data x fsdp x tensor: test_contrastive.py (2, 2, 2)).
    [(8, 1, 1), (2, 4, 1), (1, 2, 4)],
    ids=["data8", "data2-fsdp4", "fsdp2-tensor4"],
)
def test_sharded_step_equals_single_device(shape):
    """Same loss (rtol 1e-6) and params (atol 1e-5) on 8 devices as on 1."""
    config = _config(**{"optimizer.weight_decay": 0.1})
    # Adam divides by sqrt(v): float32 noise in a near-zero gradient can move a parameter by
    # a visible fraction of one step (lr=2e-3); atol 1e-5 is 0.5% of a step.
    batches = _batches(2, config.batch_size)
    one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ref_params, ref_losses, _ = _run_steps(config, one, batches)
    mesh = mesh_lib.make_mesh(*shape)
    params, losses, state = _run_steps(config, mesh, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The sharding is real: the MLP kernel is split as the rules say.
    kernel = state.params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    expected = {"fsdp": shape[1], "tensor": shape[2]}
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (
        32 // expected["fsdp"],
        64 // expected["tensor"],
    )


def test_gradient_accumulation_equals_full_batch():
    batches = _batches(2, 16)
    mesh = mesh_lib.make_mesh(4, 1, 2)
    full, full_losses, _ = _run_steps(_config(), mesh, batches)
    accum, accum_losses, _ = _run_steps(_config(**{"optimizer.grad_accum_steps": 2}), mesh, batches)
    np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accum), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_errors_before_compiling(tiny_config, tmp_path):
    with pytest.raises(mesh_lib.MeshError, match="needs 3 devices"):
        train.train(tiny_config({"mesh.data": 3}), str(tmp_path / "a"))
    with pytest.raises(mesh_lib.MeshError, match="not divisible by the batch axes"):
        train.train(tiny_config({"batch_size": 36}), str(tmp_path / "b"))
    with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=3"):
        train.train(tiny_config({"optimizer.grad_accum_steps": 3}), str(tmp_path / "c"))
    with pytest.raises(config_lib.ConfigError, match="did you mean 'width'"):
        with config_lib.load(os.path.join(ROOT, "experiments", "shapes_vit.py")).unlocked() as c:
            c.model.widht = 3
            tasks.build(c)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_params(workdir, config):
    from vlmjax import checkpoint

    mngr = checkpoint.manager(workdir)
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        run = train.setup(config, tasks.build(config), mesh)
        state = checkpoint.restore(mngr, checkpoint.abstract(run.abstract, run.shardings))
    mngr.close()
    return int(state.step), jax.device_get(state.params)


def test_resume_equals_straight_run(tiny_config, tmp_path):
    """12 steps straight == 6 steps, stop, resume for 6: same params, same batches (losses)."""
    overrides = {
        "total_steps": 12,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint_every": 100,  # only the stop and the end save
        "optimizer.warmup_steps": 2,
    }
    straight = str(tmp_path / "straight")
    train.train(tiny_config(overrides), straight)

    resumed = str(tmp_path / "resumed")
    train.train(tiny_config(overrides), resumed, stop_at=6)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["6"]
    train.train(tiny_config(overrides), resumed)

    step_a, params_a = _final_params(straight, tiny_config(overrides))
    step_b, params_b = _final_params(resumed, tiny_config(overrides))
    assert step_a == step_b == 12
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)
    loss_a = {m["step"]: m["train/loss"] for m in _metrics(straight) if "train/loss" in m}
    loss_b = {m["step"]: m["train/loss"] for m in _metrics(resumed) if "train/loss" in m}
    assert sorted(loss_a) == sorted(loss_b) == list(range(1, 13))
    assert loss_a == loss_b  # the same batches, in the same order, after the restart


def test_cli_run_learns_and_writes_its_workdir(tmp_path, capsys, data_dir):
    """The ViT learns on a short run: loss falls, held-out accuracy beats chance (1/6).

    500 steps of the tiny variant reached 0.43 held-out accuracy (256 examples, where chance
    would give 0.17 +- 0.02), with the held-out loss down from 1.79 to 1.39.
    """
    workdir = str(tmp_path / "run")
    config = os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny"
    args = ["train", "--config", config, "--workdir", workdir]
    args += [f"--config.data.data_dir={data_dir}"]
    assert cli.main(args) == 0
    assert "final: eval/heldout/accuracy=" in capsys.readouterr().out
    records = _metrics(workdir)
    losses = [m["train/loss"] for m in records if "train/loss" in m]
    evals = [m for m in records if "eval/heldout/accuracy" in m]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])
    assert [m["step"] for m in evals] == [250, 500]
    assert evals[-1]["eval/heldout/accuracy"] > 0.3
    assert evals[-1]["eval/heldout/loss"] < 1.6  # ln(6) = 1.79 at chance
    for key in ("train/learning_rate", "train/examples_per_sec", "train/grad_norm"):
        assert key in records[0]
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert "500" in os.listdir(os.path.join(workdir, "checkpoints"))
