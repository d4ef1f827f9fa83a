"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG) and the data
position, saved asynchronously under WORKDIR/checkpoints/<step>.

The data position is {"examples": n, "skipped": k}: the number of examples of the global
input stream consumed so far (see `data/pipeline.py`), and of bad records replaced in it
(`data/skipped`, `data/skips.py`). Unlike a per-process iterator state, it stays
meaningful when a run is restored with another process count or batch size.

Only steps whose save committed are listed by orbax, so a run killed mid-save resumes from
the previous good step. Restoring takes an abstract target carrying the *current* shardings,
so a checkpoint saved on one mesh restores onto another.

Each step also carries a manifest, `<step>/vlmjax_manifest.json`: the size and SHA-256 of every
file of its items. Process 0 writes it into the step's temporary directory after all
processes have written their files and before orbax renames that directory into place, so a
committed step always has one. `restore` checks it first: orbax/TensorStore read a chunk with
some bytes overwritten without complaint (10 of 12 trials in issue 12), and training then
goes on from corrupted Adam moments. `restore_latest` moves a step that fails to verify or
restore aside (`<step>.corrupt`, never deleted; orbax ignores the name) and falls back to
the previous one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("vlmjax")

MANIFEST = "vlmjax_manifest.json"  # {"files": {relative path: [size, sha256 hex]}}
ITEMS = ("state", "data")  # the checkpoint's item directories, the files the manifest covers


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be restored."""


class DamagedCheckpoint(CheckpointError):
    """A step whose files fail their manifest or cannot be read: damaged, not mismatched."""


class DiskFull(CheckpointError):
    """A save that ran out of space (ENOSPC / RESOURCE_EXHAUSTED): earlier steps are kept."""


# --- manifests --------------------------------------------------------------------------------


def _item_files(step_dir: str) -> list[str]:
    files = []
    for item in ITEMS:
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            files += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(files)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: str) -> None:
    """Records size and SHA-256 of every item file of `step_dir` (written atomically)."""
    files = {
        rel: [os.path.getsize(os.path.join(step_dir, rel)), _digest(os.path.join(step_dir, rel))]
        for rel in _item_files(step_dir)
    }
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
    """None when every file of `step_dir`'s manifest is there with its size and checksum (or
    the step has no manifest: saved before manifests existed); otherwise what is wrong,
    naming the file."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None if _item_files(step_dir) else "the step directory holds no checkpoint files"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{path} is unreadable: {e}"
    for rel, (size, digest) in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.exists(full):
            return f"{full} is missing"
        if os.path.getsize(full) != size:
            return f"{full} has {os.path.getsize(full)} bytes, {size} when saved"
        if _digest(full) != digest:
            return f"{full} does not match its checksum (SHA-256) in {MANIFEST}"
    return None


def _manifest_pending(directory: str) -> None:
    """orbax's post-finalization callback (process 0, after every process wrote its files,
    before the temporary directory is renamed into place): a manifest for each step being
    committed."""
    for name in os.listdir(directory):
        step_dir = os.path.join(directory, name)
        if ".orbax-checkpoint-tmp" in name and not os.path.exists(os.path.join(step_dir, MANIFEST)):
            write_manifest(step_dir)


def manager(workdir: str, *, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    """An orbax CheckpointManager for WORKDIR/checkpoints (created if missing).

    It saves whenever asked: the train loop decides when (every `checkpoint_every` steps
    and at the end), not orbax's interval logic, which also saves the first step. Saves are
    asynchronous and each commits with its manifest (see the module docstring).
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=1,
        enable_async_checkpointing=True,
        create=True,
        async_options=ocp.options.AsyncOptions(
            post_finalization_callback=lambda: _manifest_pending(directory)
        ),
    )
    return ocp.CheckpointManager(directory, options=options)


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or its cause) is ENOSPC/EDQUOT, as Python or TensorStore reports it."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "No space left on device" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def save_failed(mngr: ocp.CheckpointManager, step: int | None, e: BaseException) -> CheckpointError:
    """The error to raise for `e`, raised by orbax while saving `step` (the save in flight:
    async errors surface at the next save or wait); a full disk is named as such."""
    directory = str(mngr.directory)
    kept = mngr.all_steps()
    where = f"checkpoint save of step {step}" if step is not None else "checkpoint save"
    if is_disk_full(e):
        return DiskFull(
            f"{where} failed: the disk is full (no space left on device) under {directory}; "
            f"the earlier checkpoints are kept ({list(kept)}). Free space and rerun the same "
            "command to resume."
        )
    return CheckpointError(f"{where} in {directory} failed: {type(e).__name__}: {e}")


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
    # No force=True: it would delete a committed directory of the same step (two runs on one
    # workdir deleted each other's steps, issue 12); orbax skips a step it already has.
    return mngr.save(step, args=ocp.args.Composite(**items))


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
    path = os.path.join(str(mngr.directory), str(step))
    problem = verify(path)
    if problem:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {problem}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
        items["data"] = ocp.args.JsonRestore()
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for a damaged or mismatched checkpoint
        mismatch = _shape_mismatch(mngr, step, abstract_state)
        if mismatch is None:
            raise DamagedCheckpoint(
                f"could not restore checkpoint {path}: {type(e).__name__}: {e}\n"
                "It is damaged: move that step directory aside to resume from an earlier step."
            ) from e
        raise CheckpointError(
            f"could not restore checkpoint {path}: it holds another model or optimizer "
            f"({mismatch}); resume with the original config or use a new --workdir."
        ) from e
    return (restored["state"], restored["data"]) if with_data else restored["state"]


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return sorted(tuple(x.shape) for x in leaves if hasattr(x, "shape"))


def _shape_mismatch(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> str | None:
    """How the saved arrays of `step` differ from `abstract_state` (None: they agree, or the
    metadata is unreadable, i.e. the step is damaged rather than from another config)."""
    try:
        saved = mngr.item_metadata(step)["state"]
        saved = _shapes(getattr(saved, "tree", saved))
    except Exception:  # noqa: BLE001 - unreadable metadata: a damaged step
        return None
    ours = _shapes(abstract_state)
    if not saved or saved == ours:
        return None
    return f"{len(saved)} saved arrays vs {len(ours)} in this config"


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
    """Renames checkpoints/<step> to <step>.corrupt (or .corrupt.N); returns the new path."""
    path = os.path.join(str(mngr.directory), str(step))
    target, n = path + ".corrupt", 1
    while os.path.exists(target):
        target, n = f"{path}.corrupt.{n}", n + 1
    os.rename(path, target)
    return target


def _all_agree(ok: bool) -> bool:
    """Whether `ok` holds on every process (each restores its own shards)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, Any] | None:
    """(state, data position) of the newest step that verifies and restores; None when the
    directory holds no step. Each damaged newer step is moved aside to `<step>.corrupt` (by
    process 0; never deleted) with a warning naming what failed; a step from another config
    is an error, not damage."""
    while (step := mngr.latest_step()) is not None:
        try:
            restored = restore(mngr, abstract_state, step, with_data=True)
            problem = None
        except DamagedCheckpoint as e:
            restored, problem = None, str(e)
        if _all_agree(problem is None):
            return restored
        if jax.process_index() == 0:
            moved = _move_aside(mngr, step)
            log.warning(
                "%s\nMoved it to %s (kept for inspection) and falling back to the previous step.",
                problem or f"checkpoint {step} failed to restore on another process",
                moved,
            )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"vlmjax_corrupt_{step}")
        mngr.reload()
    return None


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


def save_checked(mngr, step: int, state, data, in_flight: int | None) -> None:
    """`save`, with orbax's errors (the previous async save's surface here) named
    by the save that hit them; a full disk as such."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise save_failed(mngr, in_flight, e) from e
    try:
        save(mngr, step, state, data)
    except Exception as e:
        raise save_failed(mngr, step, e) from e


def close_after_error(mngr, in_flight: int | None, *closables) -> None:
    """After an exception: the save in flight (of a finite state) is finished rather than
    abandoned, then everything is closed; errors here are logged, never raised over the
    original one."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        log.warning("%s", save_failed(mngr, in_flight, e))
    for closable in (mngr, *closables):
        try:
            if closable is not None:
                closable.close()
        except Exception as e:  # noqa: BLE001
            log.warning("while closing %s: %s: %s", type(closable).__name__, type(e).__name__, e)
