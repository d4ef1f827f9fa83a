"""The finite-state guarantee: a train step wrapped with an on-device check of its loss,
gradient norm and parameter norm, so a state that went inf/NaN is never saved (the loop
reads the flag where it reads metrics anyway, and before each checkpoint)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vlmjax import mesh as mesh_lib


class NonFiniteError(FloatingPointError):
    """The loss, gradient norm or parameter norm became inf/NaN; nothing after it was saved."""


def guard_finite(run, skip_nonfinite: bool) -> Callable:
    """`run.train_step` with a finiteness check on device:
    (state, batch, health) -> (state, metrics, health).

    `health` = {"first_nonfinite": int32, the first step whose loss, gradient norm or
    parameter norm was inf/NaN (0: none yet), "skipped": int32, steps skipped}. It stays on
    device: the loop reads it only where it reads metrics anyway (log steps) and before a
    checkpoint is written, so a non-finite state is never saved and no step adds a host
    sync. With `skip_nonfinite`, such a step's update is dropped instead (params, optimizer
    and model state stay as they were; the step counter, hence data and RNG, moves on) and
    counted. One jit around the step: the wrapped jit is inlined, so this is one program.
    """
    rep = mesh_lib.replicated(run.batch_sharding.mesh)

    def step(state, batch, health):
        new, metrics = run.train_step(state, batch)
        finite = (
            jnp.isfinite(metrics["train/loss"])
            & jnp.isfinite(metrics["train/grad_norm"])
            & jnp.isfinite(metrics["train/param_norm"])
        )
        first, skipped = health["first_nonfinite"], health["skipped"]
        if skip_nonfinite:
            kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
            new = kept.replace(step=new.step)
            skipped = skipped + jnp.logical_not(finite).astype(jnp.int32)
        else:
            first = jnp.where((first == 0) & jnp.logical_not(finite), new.step, first)
        return new, metrics, {"first_nonfinite": first, "skipped": skipped}

    return jax.jit(
        step,
        in_shardings=(run.shardings, run.batch_sharding, rep),
        out_shardings=(run.shardings, rep, rep),
        donate_argnums=(0, 2),
    )


def check_finite(health, mngr, step: int) -> None:
    """Raises NonFiniteError if `health` (host values) saw a non-finite step."""
    first = int(health["first_nonfinite"])
    if not first:
        return
    mngr.wait_until_finished()  # the save in flight is of a finite state: let it land
    good = mngr.latest_step()
    where = (
        f"the newest finite checkpoint is step {good} ({mngr.directory}/{good}), where "
        "rerunning the same command resumes"
        if good is not None
        else "no checkpoint was saved yet, so rerunning starts afresh"
    )
    raise NonFiniteError(
        f"train/loss (or the gradient norm) first became non-finite at step {first} (found at "
        f"step {step}); nothing after it was saved: {where}. Lower optimizer.learning_rate, "
        "set optimizer.grad_clip_norm, or set optimizer.skip_nonfinite=true to skip such steps."
    )
