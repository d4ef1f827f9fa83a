"""Tests for vlmjax.optim: schedules, decay masks, and single steps against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import optim


def _config(**overrides):
    config = optim.default_config()
    config.update(overrides)
    return config


def _params():
    """A small flax-like ViT param dict; the scanned block has a leading layers axis of 2."""
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "embedding": {"proj": {"kernel": f(2, 2, 3, 4), "bias": f(4)}},
        "pos_embedding": {"pos_embedding": f(1, 5, 4)},
        "cls": f(1, 1, 4),
        "encoder": {
            "layers": {
                "norm1": {"scale": f(2, 4), "bias": f(2, 4)},
                "mlp": {"fc1": {"kernel": f(2, 4, 8), "bias": f(2, 8)}},
            },
            "norm": {"scale": f(4), "bias": f(4)},
        },
        "head": {"kernel": f(4, 3), "bias": f(3)},
    }


def _step(tx, params, grads_list):
    """Applies each grads in turn under jit; returns the final params."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_list:
        updates, state = update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params


@pytest.mark.parametrize(
    "schedule, mid, end",
    [("cosine", 0.55, 0.1), ("linear", 0.55, 0.1), ("constant", 1.0, 1.0)],
)
def test_schedule_values(schedule, mid, end):
    fn = optim.make_schedule(
        2.0, total_steps=110, warmup_steps=10, schedule=schedule, end_factor=0.1
    )
    steps = jnp.array([0, 5, 10, 60, 110, 200], jnp.int32)
    got = np.asarray(jax.jit(jax.vmap(fn))(steps))
    np.testing.assert_allclose(got, 2.0 * np.array([0.0, 0.5, 1.0, mid, end, end]), atol=1e-6)
    # Cosine quarter point: 0.1 + 0.9 * 0.5 * (1 + cos(pi / 4)).
    if schedule == "cosine":
        np.testing.assert_allclose(fn(35), 2.0 * (0.1 + 0.45 * (1 + np.cos(np.pi / 4))), rtol=1e-6)


def test_schedule_without_warmup_starts_at_peak():
    fn = optim.make_schedule(0.5, total_steps=10, warmup_steps=0, schedule="linear")
    np.testing.assert_allclose([fn(0), fn(5), fn(10)], [0.5, 0.25, 0.0], atol=1e-7)


def test_param_paths():
    paths = optim.param_paths(_params())
    assert paths["encoder"]["layers"]["mlp"]["fc1"]["kernel"] == "encoder/layers/mlp/fc1/kernel"
    assert paths["cls"] == "cls"


def test_weight_decay_mask():
    params = _params()
    default = optim.default_config()
    mask = optim.weight_decay_mask(params, default.wd_params, decay_pos_embedding=False)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    paths = jax.tree.leaves(optim.param_paths(params))
    decayed = {p for p, m in zip(paths, jax.tree.leaves(mask), strict=True) if m}
    # Kernels are decayed even with the leading layers axis; biases/scales 2-D there are not.
    assert decayed == {"embedding/proj/kernel", "encoder/layers/mlp/fc1/kernel", "head/kernel"}

    with_pos = optim.weight_decay_mask(params, r".*pos_embedding", decay_pos_embedding=True)
    assert with_pos["pos_embedding"]["pos_embedding"] is True
    # An nn.Embed position table ("pos_embedding/embedding") is excluded by the flag, not the regex.
    table = {"pos_embedding": {"embedding": 0.0}, "tok": {"embedding": 0.0}}
    assert optim.weight_decay_mask(table, default.wd_params, False) == {
        "pos_embedding": {"embedding": False},
        "tok": {"embedding": True},
    }
    assert optim.weight_decay_mask(table, default.wd_params, True)["pos_embedding"]["embedding"]


def test_adamw_steps_match_numpy():
    lr, wd, b1, b2, eps = 0.1, 0.3, 0.9, 0.99, 1e-6
    config = _config(
        learning_rate=lr, warmup_steps=4, schedule="constant", weight_decay=wd,
        b1=b1, b2=b2, eps=eps, grad_clip_norm=0.0,
    )  # fmt: skip
    tx, _ = optim.build(config, total_steps=10)
    params = {"dense": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5, 3.0])}}
    grads = [
        {"dense": {"kernel": jnp.array([0.1, 0.2]), "bias": jnp.array([-0.3, 0.4])}},
        {"dense": {"kernel": jnp.array([-0.5, 0.7]), "bias": jnp.array([0.2, 0.1])}},
    ]
    got = _step(tx, params, grads)

    lrs = [0.0, lr / 4]  # warmup: step 0 -> 0, step 1 -> lr/4
    for name, decayed in (("kernel", True), ("bias", False)):
        p = np.asarray(params["dense"][name], np.float64)
        m = v = np.zeros_like(p)
        for t, (grad, step_lr) in enumerate(zip(grads, lrs, strict=True), start=1):
            g = np.asarray(grad["dense"][name], np.float64)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g**2
            upd = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            p = p - step_lr * (upd + (wd * p if decayed else 0.0))
        np.testing.assert_allclose(got["dense"][name], p, rtol=1e-5)
    assert not np.allclose(got["dense"]["kernel"], params["dense"]["kernel"])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_l2_matches_numpy(nesterov):
    lr, wd, mu = 0.1, 0.05, 0.9
    config = _config(
        name="sgd", learning_rate=lr, schedule="constant", weight_decay=wd, momentum=mu,
        nesterov=nesterov, grad_clip_norm=0.0,
    )  # fmt: skip
    tx, _ = optim.build(config, total_steps=10)
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5, 3.0])}
    grads = [
        {"kernel": jnp.array([0.1, 0.2]), "bias": jnp.array([-0.3, 0.4])},
        {"kernel": jnp.array([-0.5, 0.7]), "bias": jnp.array([0.2, 0.1])},
    ]
    got = _step(tx, params, grads)
    for name, decayed in (("kernel", True), ("bias", False)):
        p, buf = np.asarray(params[name], np.float64), 0.0
        for g in grads:  # torch.optim.SGD(dampening=0)
            d = np.asarray(g[name], np.float64) + (wd * p if decayed else 0.0)
            buf = mu * buf + d
            p = p - lr * (d + mu * buf if nesterov else buf)
        np.testing.assert_allclose(got[name], p, rtol=1e-5)


def _sgd_updates(params, grads, **overrides):
    base = dict(name="sgd", learning_rate=1.0, schedule="constant", weight_decay=0.0, momentum=0.0)
    tx, _ = optim.build(_config(**{**base, **overrides}), total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_clipping_scales_to_clip_norm():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    big = {"a": jnp.array([6.0, 0.0]), "b": jnp.array([8.0])}  # global norm 10
    updates = _sgd_updates(params, big, grad_clip_norm=2.0)
    np.testing.assert_allclose(updates["a"], [-1.2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-1.6], rtol=1e-6)
    small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}  # norm 0.5: unchanged
    np.testing.assert_allclose(_sgd_updates(params, small, grad_clip_norm=2.0)["b"], [-0.4])


def test_frozen_params_get_zero_updates():
    params = {"img": {"kernel": jnp.ones(2)}, "txt": {"kernel": jnp.ones(2)}}
    grads = {"img": {"kernel": jnp.array([30.0, 40.0])}, "txt": {"kernel": jnp.array([0.3, 0.4])}}
    config = _config(frozen="img/.*", grad_clip_norm=1.0, learning_rate=0.1, weight_decay=0.1)
    tx, _ = optim.build(config, total_steps=10)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_array_equal(updates["img"]["kernel"], [0.0, 0.0])
    # Frozen grads are outside the clip norm: txt (norm 0.5) is not rescaled by img's 50.
    updates = _sgd_updates(params, grads, frozen="img/.*", grad_clip_norm=1.0)
    np.testing.assert_allclose(updates["txt"]["kernel"], [-0.3, -0.4], rtol=1e-6)
    np.testing.assert_array_equal(updates["img"]["kernel"], [0.0, 0.0])


def test_lr_multipliers_scale_updates():
    params = _params()
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    config = _config(weight_decay=0.1)

    def updates():
        tx, _ = optim.build(config, total_steps=10)
        return tx.update(grads, tx.init(params), params)[0]

    base = updates()
    config.lr_multipliers = (("head/.*", 0.5), ("encoder/.*", 0.0), (".*", 2.0))
    got = updates()
    # First matching regex wins; the decoupled decay is scaled with the rest of the update.
    np.testing.assert_allclose(got["head"]["kernel"], 0.5 * base["head"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(got["encoder"]["norm"]["scale"], 0.0)
    np.testing.assert_allclose(got["cls"], 2.0 * base["cls"], rtol=1e-6)
    assert np.abs(base["cls"]).min() > 0


@pytest.mark.parametrize(
    "overrides, valid",
    [
        (dict(name="adam"), ["adamw", "sgd"]),
        (dict(schedule="cos"), ["cosine", "linear", "constant"]),
        (dict(warmup_steps=11), ["total_steps=10"]),
        (dict(frozen="(unclosed"), ["frozen"]),
    ],
)
def test_bad_config_raises(overrides, valid):
    with pytest.raises(ValueError) as info:
        optim.build(_config(**overrides), total_steps=10)
    for word in valid:
        assert word in str(info.value)


def test_default_config_builds_and_state_is_arrays():
    params = _params()
    tx, schedule = optim.build(optim.default_config(), total_steps=100)
    state = tx.init(params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    np.testing.assert_allclose(schedule(0), 1e-3)
