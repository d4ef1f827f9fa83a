"""optimizer.ema_decay: the EMA of the params follows its numpy recurrence, is sharded like
the params, survives a checkpoint exactly, and is what the evaluators evaluate."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlmjax import checkpoint, evaluators, optim, tasks, train
from vlmjax import config as config_lib
from vlmjax import mesh as mesh_lib
from vlmjax.evaluators import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = 0.8


def _config(**overrides):
    config = config_lib.load(os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny")
    values = {
        "batch_size": 16,
        "optimizer.warmup_steps": 0,
        "optimizer.learning_rate": 0.05,  # large steps, so the EMA is far from the params
        "optimizer.ema_decay": DECAY,
        **overrides,
    }
    for key, value in values.items():
        config_lib.override(config, key, str(value))
    return config


def test_ema_step_matches_numpy_recurrence():
    """Three train steps of a toy least-squares model: the EMA equals d * ema + (1 - d) * p
    computed in numpy from the params after each step, started at the initial params."""
    import jax.numpy as jnp
    import optax

    def loss_fn(params, model_state, batch, rng):
        pred = batch["x"] @ params["w"] + params["b"]  # [b, 2]
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, ({"loss": loss}, model_state)

    mesh = mesh_lib.make_mesh(-1, 1, 1)
    tx = optax.sgd(0.3)
    step = train.make_train_step(loss_fn, tx, lambda s: 0.3, 1, mesh, ema_decay=DECAY)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state={},
        rng=jax.random.PRNGKey(0),
        ema=jax.tree.map(np.copy, params),
    )
    expected = params
    for _ in range(3):
        batch = {
            "x": rng.normal(size=(8, 3)).astype(np.float32),
            "y": rng.normal(size=(8, 2)).astype(np.float32),
        }
        state, _ = jax.jit(step)(state, batch)
        now = jax.device_get(state.params)
        expected = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * p, expected, now)
    for name in ("w", "b"):
        np.testing.assert_allclose(
            np.asarray(state.ema[name]), expected[name], rtol=1e-6, atol=1e-7
        )
        assert np.abs(np.asarray(state.ema[name]) - now[name]).max() > 1e-2  # it lags
    assert common.variables(state)["params"] is state.ema


def test_ema_is_sharded_like_the_params():
    config = _config()
    mesh = mesh_lib.make_mesh(2, 4, 1)  # fsdp shards the params, and so the EMA
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config)
        tx, _ = optim.build(config.optimizer, 10)
        _, shardings, abstract = train.state_shardings(
            task.model, tx, task.init_inputs, mesh, ema=True
        )
    assert jax.tree.structure(abstract.ema) == jax.tree.structure(abstract.params)
    assert jax.tree.leaves(shardings.ema) == jax.tree.leaves(shardings.params)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings.ema))


def test_ema_is_checkpointed_and_evaluated(tmp_path, data_dir):
    """A run with the EMA on: its checkpoint restores the EMA (not the params) and the
    evaluators score it: the restored EMA evaluated as plain params gives the numbers the
    run reported at its last step."""
    config = _config(
        **{
            "total_steps": 3,
            "checkpoint_every": 3,
            "eval_every": 3,
            "data.data_dir": data_dir,
            "data.num_train": 4096,
            "data.num_heldout": 256,
            "evals.heldout.max_examples": 64,
        }
    )
    workdir = str(tmp_path / "run")
    metrics = train.train(config, workdir)
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config)
        run = train.setup(config, task, mesh)
        mngr = checkpoint.manager(workdir, max_to_keep=None)
        state = checkpoint.restore(mngr, checkpoint.abstract(run.abstract, run.shardings))
        mngr.close()
        as_params = state.replace(params=state.ema, ema=None)
        got = evaluators.run(evaluators.build(config, task, mesh), as_params)
    assert got == pytest.approx(metrics, abs=1e-6)
    gaps = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params), strict=True)
    ]
    assert max(gaps) > 1e-3  # the restored EMA is not a copy of the params
