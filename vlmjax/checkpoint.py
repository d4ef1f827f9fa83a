"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG) and the data
position, saved asynchronously under WORKDIR/checkpoints/<step>.

The data position is {"examples": n}, the number of examples of the global input stream
consumed so far (see `data/pipeline.py`): unlike a per-process iterator state, it stays
meaningful when a run is restored with another process count or batch size.

Only steps whose save committed are listed by orbax, so a run killed mid-save resumes from
the previous good step. Restoring takes an abstract target carrying the *current* shardings,
so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

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
    mngr: ocp.CheckpointManager, step: int, state: Any, data: dict[str, int] | None = None
) -> bool:
    """Starts saving `state` (and the data position) at `step`; returns whether it did.

    Saves are asynchronous: the state's arrays are copied before this returns, so training
    may continue (and donate the state) while files are written.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data is not None:
        items["data"] = ocp.args.JsonSave(data)
    return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(
    mngr: ocp.CheckpointManager,
    abstract_state: Any,
    step: int | None = None,
    with_data: bool = False,
) -> Any:
    """Restores the state at `step` (default: latest) onto `abstract_state`'s shardings.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `.sharding` set. With
    `with_data`, returns (state, data position) instead of the state alone.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    if step not in mngr.all_steps():
        raise CheckpointError(
            f"no checkpoint for step {step} in {mngr.directory}; kept steps: {mngr.all_steps()}"
        )
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
        items["data"] = ocp.args.JsonRestore()
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
    return (restored["state"], restored["data"]) if with_data else restored["state"]


def abstract(tree: Any, shardings: Any) -> Any:
    """Tree of ShapeDtypeStructs carrying `shardings` (restore targets)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _state_dir(source: str, step: int | None) -> str:
    """WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/<step> -> the step's state item."""
    source = os.path.abspath(source)
    if os.path.isdir(os.path.join(source, "state")):
        return os.path.join(source, "state")
    directory = source
    if os.path.isdir(os.path.join(source, "checkpoints")):
        directory = os.path.join(source, "checkpoints")
    steps = sorted(
        int(d)
        for d in (os.listdir(directory) if os.path.isdir(directory) else [])
        if d.isdigit() and os.path.exists(os.path.join(directory, d, "commit_success.txt"))
    )
    if not steps:
        raise CheckpointError(f"init_from: no finished checkpoint under {source}")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(f"init_from: no checkpoint for step {step} in {directory}: {steps}")
    return os.path.join(directory, str(step), "state")


def load_params(
    source: str, abstract_params: Any, shardings: Any, select: str = ".*", step: int | None = None
) -> dict[str, jax.Array]:
    """Parameters of another run whose '/'-joined path fullmatches `select`.

    Only those arrays are read (a partial restore), straight onto `shardings` (a tree like
    `abstract_params`), whatever mesh the source was saved on. Returns {path: array}. A
    selected parameter that the source lacks, or has with another shape, is an error.
    """
    import re

    from flax import traverse_util

    path = _state_dir(source, step)
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path).item_metadata.tree.get("params", {})
    saved = traverse_util.flatten_dict(saved, sep="/")
    ours = traverse_util.flatten_dict(abstract_params, sep="/")
    ours_sharding = traverse_util.flatten_dict(shardings, sep="/")
    pattern = re.compile(select)
    chosen = [k for k in ours if pattern.fullmatch(k)]
    if not chosen:
        raise CheckpointError(f"init_from_params={select!r} matches no parameter of this model")
    problems = [
        f"{k}: ours {ours[k].shape}, saved {saved[k].shape if k in saved else 'missing'}"
        for k in chosen
        if k not in saved or tuple(saved[k].shape) != tuple(ours[k].shape)
    ]
    if problems:
        raise CheckpointError(
            f"init_from {path}: {len(problems)} selected parameters do not match "
            f"(narrow init_from_params): " + "; ".join(problems[:5])
        )
    target = traverse_util.unflatten_dict(
        {
            k: jax.ShapeDtypeStruct(ours[k].shape, ours[k].dtype, sharding=ours_sharding[k])
            for k in chosen
        },
        sep="/",
    )
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    restored = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": restore_args},
            partial_restore=True,
        ),
    )
    return traverse_util.flatten_dict(restored["params"], sep="/")
