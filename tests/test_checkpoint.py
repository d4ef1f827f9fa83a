"""Checkpoints: restore onto another mesh, and clear errors for missing or damaged steps."""

import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlmjax import checkpoint, tasks, train
from vlmjax import config as config_lib
from vlmjax import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(mesh):
    config = config_lib.load(os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny")
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        return train.setup(config, tasks.build(config), mesh)


def _save(workdir, mesh):
    run = _setup(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        state = run.init_fn(jax.random.PRNGKey(1))
    mngr = checkpoint.manager(workdir)
    checkpoint.save(mngr, 5, state)
    mngr.wait_until_finished()
    mngr.close()
    return jax.device_get(state)


def _restore(workdir, mesh, step=None):
    run = _setup(mesh)
    mngr = checkpoint.manager(workdir)
    try:
        target = checkpoint.abstract(run.abstract, run.shardings)
        return checkpoint.restore(mngr, target, step=step), run
    finally:
        mngr.close()


def test_restore_onto_another_mesh(tmp_path):
    saved = _save(str(tmp_path), mesh_lib.make_mesh(data=1, fsdp=8, tensor=1))
    restored, run = _restore(str(tmp_path), mesh_lib.make_mesh(data=2, fsdp=1, tensor=4))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, jax.device_get(b))
    kernel = restored.params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding == run.shardings.params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_missing_and_damaged_checkpoints_are_clear_errors(tmp_path):
    mesh = mesh_lib.make_mesh(data=8, fsdp=1, tensor=1)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        _restore(str(tmp_path), mesh)
    _save(str(tmp_path), mesh)
    with pytest.raises(checkpoint.CheckpointError, match=r"kept steps: \[5\]"):
        _restore(str(tmp_path), mesh, step=7)
    # Damage the saved arrays: the error names the step directory and what to do.
    state_dir = os.path.join(str(tmp_path), "checkpoints", "5", "state")
    for entry in os.listdir(state_dir):
        path = os.path.join(state_dir, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
    with pytest.raises(checkpoint.CheckpointError, match="move that step directory aside"):
        _restore(str(tmp_path), mesh)
