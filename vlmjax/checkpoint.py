"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG) and the data
iterator's position, saved asynchronously under WORKDIR/checkpoints/<step>.

Only steps whose save committed are listed by orbax, so a run killed mid-save resumes from
the previous good step. Restoring takes an abstract target carrying the *current* shardings,
so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be restored."""


def manager(
    workdir: str, *, max_to_keep: int | None = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager for WORKDIR/checkpoints (created if missing).

    It saves whenever asked: the train loop decides when (every `checkpoint_every` steps
    and at the end), not orbax's interval logic, which also saves the first step.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        create=True,
    )
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    return ocp.CheckpointManager(directory, options=options)


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iter: grain.DatasetIterator | None,
) -> bool:
    """Starts saving `state` (and the iterator position) at `step`; returns whether it did.

    Saves are asynchronous: the state's arrays are copied before this returns, so training
    may continue (and donate the state) while files are written.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(
    mngr: ocp.CheckpointManager,
    abstract_state: Any,
    data_iter: grain.DatasetIterator | None,
    step: int | None = None,
) -> Any:
    """Restores the state at `step` (default: latest) onto `abstract_state`'s shardings.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `.sharding` set. The data
    iterator, if given, is moved to the saved position in place.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    if step not in mngr.all_steps():
        raise CheckpointError(
            f"no checkpoint for step {step} in {mngr.directory}; kept steps: {mngr.all_steps()}"
        )
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for a damaged or mismatched checkpoint
        path = os.path.join(str(mngr.directory), str(step))
        raise CheckpointError(
            f"could not restore checkpoint {path}: {type(e).__name__}: {e}\n"
            "If it is damaged, move that step directory aside to resume from an earlier step; "
            "if the model or optimizer config changed, resume with the original config or use "
            "a new --workdir."
        ) from e
    return restored["state"]


def abstract(tree: Any, shardings: Any) -> Any:
    """Tree of ShapeDtypeStructs carrying `shardings` (restore targets)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
