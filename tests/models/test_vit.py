import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import layers, vit

TINY = dict(width=32, depth=3, mlp_dim=64, num_heads=4, patch_size=4)


def _init(model, size=16, batch=2):
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    return x, nn.meta.unbox(model.init(jax.random.key(0), x))


def test_attention_matches_naive_reference():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 3, 8))
    k = jax.random.normal(kk, (2, 7, 3, 8))
    v = jax.random.normal(kv, (2, 7, 3, 8))
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 5, 7)).at[..., 0].set(True)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)  # [b, h, q, k]
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    got = layers.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="not one of"):
        layers.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_vit_shapes(pool):
    model = vit.ViT(num_classes=7, pool=pool, **TINY)
    x, variables = _init(model)
    assert model.apply(variables, x).shape == (2, 7)
    assert model.apply(variables, x).dtype == jnp.float32
    pooled = vit.ViT(num_classes=0, pool=pool, **TINY).apply(variables, x)
    assert pooled.shape == (2, 32)
    assert variables["params"]["pos_embedding"]["pos_embedding"].shape == (1, 16, 32)


def test_vit_b16_parameter_count():
    """ViT-B/16 at 224, 1000 classes: 86,567,656 parameters in timm/Hugging Face, which give
    the class token a position of its own; here (as in big_vision) positions cover the 196
    patches and the class token is a free vector, so one 768-wide row fewer."""
    model = vit.ViT(num_classes=1000, variant="B/16", pool="cls")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 224, 224, 3)))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert count == 86_567_656 - 768


def test_scan_equals_unrolled_layers():
    scanned = vit.ViT(num_classes=5, scan=True, head_zero_init=False, **TINY)
    plain = vit.ViT(num_classes=5, head_zero_init=False, **TINY)
    x, variables = _init(plain)
    enc = variables["params"]["encoder"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[enc[f"layer_{i}"] for i in range(3)])
    scanned_params = {**variables["params"], "encoder": {"layers": stacked, "norm": enc["norm"]}}
    np.testing.assert_allclose(
        scanned.apply({"params": scanned_params}, x), plain.apply(variables, x), atol=1e-5
    )
    # Scanned params carry the leading "layers" logical axis.
    boxed = scanned.init(jax.random.key(0), x)
    spec = nn.get_partition_spec(boxed)["params"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "mlp")


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(remat):
    base = vit.ViT(num_classes=5, head_zero_init=False, scan=True, **TINY)
    x, variables = _init(base)
    ckpt = vit.ViT(num_classes=5, head_zero_init=False, scan=True, remat=remat, **TINY)

    def loss(model, params):
        return (model.apply({"params": params}, x) ** 2).sum()

    g0 = jax.grad(lambda p: loss(base, p))(variables["params"])
    g1 = jax.grad(lambda p: loss(ckpt, p))(variables["params"])
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = vit.ViT(num_classes=5, dtype="bfloat16", head_zero_init=False, **TINY)
    x, variables = _init(model)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    out = model.apply(variables, x)
    assert out.dtype == jnp.float32
    ref = vit.ViT(num_classes=5, head_zero_init=False, **TINY).apply(variables, x)
    np.testing.assert_allclose(out, ref, atol=0.1)


def test_bad_inputs_raise_clear_errors():
    model = vit.ViT(num_classes=5, **TINY)
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        model.init(jax.random.key(0), jnp.ones((1, 18, 18, 3)))
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        model.init(jax.random.key(0), jnp.ones((18, 18, 3)))
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit.parse_variant("XL/16")
    assert vit.parse_variant("S/8")["patch_size"] == 8
