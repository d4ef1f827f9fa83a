"""Optimizer: one optax chain (clip -> AdamW or SGD-momentum -> lr multipliers -> schedule).

`build(config.optimizer, total_steps)` is the only function that reads the ConfigDict; the
helpers take plain values so other modules (and tests) can reuse them. Which parameters are
decayed, frozen or rescaled is decided from their '/'-joined path, never from their shape:
`nn.scan` adds a leading "layers" axis that would make biases look like matrices.

The returned transformation needs `params` in `update(grads, state, params)` whenever weight
decay is on. Its state is made of standard optax states, so it can be jitted with sharded
params and saved with orbax.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def default_config() -> ml_collections.ConfigDict:
    """Defaults for the `optimizer` sub-config; experiment files start from these."""
    c = ml_collections.ConfigDict()
    c.name = "adamw"  # "adamw" | "sgd" (SGD with momentum)
    c.learning_rate = 1e-3  # peak, reached at the end of warmup
    c.warmup_steps = 0  # linear warmup from 0; must be <= total_steps
    c.schedule = "cosine"  # decay after warmup: "cosine" | "linear" | "constant"
    c.end_learning_rate_factor = 0.0  # final lr = factor * learning_rate (cosine, linear)
    c.weight_decay = 1e-4  # decoupled (x lr) for adamw; L2 added to the gradient for sgd
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.momentum = 0.9
    c.nesterov = False
    c.grad_clip_norm = 1.0  # global-norm clipping, first in the chain; 0 or None = off
    # Drop the update of a step whose loss or gradient norm is inf/NaN (counted in
    # train/skipped_steps) instead of stopping the run; applied around the step (train.py).
    c.skip_nonfinite = False
    c.wd_params = r"(.*/)?(kernel|embedding)"  # re.fullmatch on the param path
    c.decay_pos_embedding = False
    c.frozen = ""  # regex of params whose updates are zeroed; "" = nothing frozen
    c.lr_multipliers = ()  # ((regex, factor), ...); the first matching regex wins
    # Exponential moving average of the params (0 = off): ema <- d * ema + (1 - d) * params
    # after every step, started at the initial (or imported) params, kept in the train state
    # (sharded like the params, checkpointed) and used by the evaluators and `vlmjax export`
    # in place of the raw params. 0.999-0.9999 for long runs (about 1 / (1 - d) steps of memory).
    c.ema_decay = 0.0
    return c


def ema_update(ema, params, decay: float):
    """One EMA step: decay * ema + (1 - decay) * params, leaf by leaf (float32 trees alike)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"optimizer.{key}={value!r} is not one of: {', '.join(choices)}")


def _compile(key: str, pattern: str) -> re.Pattern:
    # re.error is not a ValueError; re-raise so config mistakes surface uniformly.
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"optimizer.{key}: invalid regex {pattern!r}: {e}") from None


def make_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    end_factor: float = 0.0,
) -> optax.Schedule:
    """Linear warmup 0 -> `learning_rate` over `warmup_steps`, then decay to the end value.

    "cosine" and "linear" reach `end_factor * learning_rate` at `total_steps` and stay there;
    "constant" keeps `learning_rate`. Step 0 has lr 0 when there is a warmup.
    """
    _check_choice("schedule", schedule, SCHEDULES)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"optimizer.warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]"
        )
    decay_steps = max(total_steps - warmup_steps, 1)  # warmup == total: no decay phase

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        if schedule == "cosine":
            factor = end_factor + (1.0 - end_factor) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        elif schedule == "linear":
            factor = 1.0 + (end_factor - 1.0) * t
        else:
            factor = jnp.ones_like(t)
        warm = step / max(warmup_steps, 1)
        return learning_rate * jnp.where(step < warmup_steps, warm, factor)

    return fn


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_paths(params):
    """Pytree like `params` whose leaves are '/'-joined paths, e.g. "encoder/layers/fc1/kernel"."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(_key_name(k) for k in path), params
    )


def weight_decay_mask(params, wd_params: str, decay_pos_embedding: bool):
    """Pytree of bools like `params`: True where the path fullmatches `wd_params`.

    Paths containing "pos_embedding" are excluded unless `decay_pos_embedding`.
    """
    pattern = _compile("wd_params", wd_params)

    def decay(path: str) -> bool:
        if "pos_embedding" in path and not decay_pos_embedding:
            return False
        return pattern.fullmatch(path) is not None

    return jax.tree.map(decay, param_paths(params))


def _scale_by_path(multipliers: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies each update by the factor of the first regex fullmatching its path (else 1)."""
    rules = [(_compile("lr_multipliers", p), float(f)) for p, f in multipliers]

    def factor(path: str) -> float:
        return next((f for rx, f in rules if rx.fullmatch(path)), 1.0)

    def update_fn(updates, state, params=None):
        del params
        # Paths come from the tree structure only, so this is static under jit.
        scaled = jax.tree.map(lambda u, p: u * factor(p), updates, param_paths(updates))
        return scaled, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def build(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its lr schedule (for logging) from the `optimizer` sub-config."""
    _check_choice("name", config.name, OPTIMIZERS)
    schedule = make_schedule(
        config.learning_rate,
        total_steps,
        config.warmup_steps,
        config.schedule,
        config.end_learning_rate_factor,
    )
    wd_params, decay_pos = config.wd_params, config.decay_pos_embedding
    _compile("wd_params", wd_params)  # fail at build time, not at the first update
    decay = optax.identity()
    if config.weight_decay:
        decay = optax.add_decayed_weights(
            config.weight_decay, mask=lambda p: weight_decay_mask(p, wd_params, decay_pos)
        )

    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.name == "adamw":
        # Decay after Adam's scaling: decoupled (Loshchilov & Hutter), still multiplied by lr.
        parts += [optax.scale_by_adam(config.b1, config.b2, config.eps), decay]
    else:
        # L2 enters the gradient before momentum, as in torch.optim.SGD.
        parts += [decay, optax.trace(decay=config.momentum, nesterov=config.nesterov)]
    if config.lr_multipliers:
        parts.append(_scale_by_path(config.lr_multipliers))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)

    if config.frozen:
        frozen = _compile("frozen", config.frozen)

        def labels(params):
            return jax.tree.map(
                lambda p: "frozen" if frozen.fullmatch(p) else "train", param_paths(params)
            )

        # Outside the chain, so frozen grads neither count towards the clip norm nor get
        # optimizer state (they become optax.MaskedNode in the "train" branch).
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
