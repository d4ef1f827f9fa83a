"""Checkpoints: restore onto another mesh, clear errors for missing or damaged steps, and
verified restores (a manifest of checksums) that fall back past a damaged newest step."""

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


def _save(workdir, mesh, steps=(5,)):
    run = _setup(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        state = run.init_fn(jax.random.PRNGKey(1))
    mngr = checkpoint.manager(workdir)
    for step in steps:
        checkpoint.save(mngr, step, state, {"examples": step})
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
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"5 is damaged: .*process_0 is missing"):
        _restore(str(tmp_path), mesh)


def _largest_array_file(step_dir):
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.sep + "d" + os.sep in os.path.join(root, name)  # ocdbt data files
    ]
    return max(files, key=os.path.getsize)


def test_same_size_overwrite_is_detected_and_restore_falls_back(tmp_path):
    """Issue 12: 64 bytes overwritten in an array file restored silently in 10 of 12 trials;
    an empty step directory stopped the run. Now both are moved aside and the newest good
    step restores."""
    mesh = mesh_lib.make_mesh(data=8, fsdp=1, tensor=1)
    workdir = str(tmp_path)
    saved = _save(workdir, mesh, steps=(2, 4))
    root = os.path.join(workdir, "checkpoints")
    assert all(checkpoint.verify(os.path.join(root, str(s))) is None for s in (2, 4))
    victim = _largest_array_file(os.path.join(root, "4"))
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(64))  # zeros: same size, different bytes
    assert os.path.getsize(victim) == size
    os.makedirs(os.path.join(root, "6"))  # a step directory with nothing in it
    with pytest.raises(checkpoint.DamagedCheckpoint, match="does not match its checksum"):
        _restore(workdir, mesh, step=4)  # eval's path: an error, nothing moved

    run = _setup(mesh)
    mngr = checkpoint.manager(workdir)
    try:
        state, data = checkpoint.restore_latest(
            mngr, checkpoint.abstract(run.abstract, run.shardings)
        )
        assert mngr.all_steps() == [2]
    finally:
        mngr.close()
    assert data == {"examples": 2}
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, jax.device_get(b))
    # Moved aside, never deleted; orbax ignores the new names.
    assert sorted(os.listdir(root)) == ["2", "4.corrupt", "6.corrupt"]
    assert (
        os.path.getsize(victim.replace(f"{os.sep}4{os.sep}", f"{os.sep}4.corrupt{os.sep}")) == size
    )
