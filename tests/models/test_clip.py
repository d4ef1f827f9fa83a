import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import clip

TINY = dict(
    embed_dim=16,
    vision=dict(variant=None, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4),
    text=dict(vocab_size=50, context_length=8, width=24, depth=2, num_heads=4, mlp_dim=48),
)


def _inputs(batch=3):
    images = jax.random.normal(jax.random.key(1), (batch, 16, 16, 3))
    tokens = jax.random.randint(jax.random.key(2), (batch, 8), 1, 40).at[:, 5].set(49)
    return images, tokens


@pytest.fixture(scope="module")
def tiny():
    model = clip.CLIP(**TINY)
    images, tokens = _inputs()
    return model, nn.meta.unbox(model.init(jax.random.key(0), images, tokens))


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def test_outputs_shapes_dtypes_and_unit_norm(tiny):
    model, variables = tiny
    images, tokens = _inputs()
    out = model.apply(variables, images, tokens)
    assert set(out) == {"zimg", "ztxt", "log_scale", "bias"}
    assert out["zimg"].shape == out["ztxt"].shape == (3, 16)
    assert out["zimg"].dtype == out["ztxt"].dtype == out["log_scale"].dtype == jnp.float32
    assert out["bias"] is None and "bias" not in variables["params"]
    for z in (out["zimg"], out["ztxt"]):
        np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
    zimg = model.apply(variables, images, method="encode_image")
    ztxt = model.apply(variables, tokens, method="encode_text")
    np.testing.assert_allclose(zimg, out["zimg"], atol=1e-6)
    np.testing.assert_allclose(ztxt, out["ztxt"], atol=1e-6)
    params = variables["params"]
    assert params["image_proj"]["kernel"].shape == (32, 16)
    assert params["text_proj"]["kernel"].shape == (24, 16)
    assert "bias" not in params["image_proj"]
    # CLIP's image tower: pre-encoder LayerNorm (ln_pre), eps 1e-5, class-token pooling.
    assert "pre_norm" in params["image_tower"] and "cls" in params["image_tower"]

    # bfloat16 compute: float32 params and outputs, close to the float32 result.
    bf16 = clip.CLIP(**TINY, dtype="bfloat16")
    out16 = bf16.apply(variables, images, tokens)
    assert all(out16[k].dtype == jnp.float32 for k in ("zimg", "ztxt", "log_scale"))
    np.testing.assert_allclose(out16["zimg"], out["zimg"], atol=0.05)
    np.testing.assert_allclose(out16["ztxt"], out["ztxt"], atol=0.05)
    boxed = jax.eval_shape(bf16.init, jax.random.key(0), images, tokens)
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(boxed))} == {jnp.dtype("float32")}


def test_temperature_init_clamp_and_sigmoid_bias(tiny):
    model, variables = tiny
    images, tokens = _inputs()
    np.testing.assert_allclose(variables["params"]["log_scale"], math.log(1 / 0.07), rtol=1e-6)
    assert variables["params"]["log_scale"].shape == ()
    hot = {"params": {**variables["params"], "log_scale": jnp.float32(7.0)}}
    out = model.apply(hot, images, tokens)
    np.testing.assert_allclose(out["log_scale"], math.log(100.0), rtol=1e-6)
    # The clamp stops gradients to the parameter once it is above log(max_scale).
    grad = jax.grad(lambda p: model.apply({"params": p}, images, tokens)["log_scale"])
    assert grad(hot["params"])["log_scale"] == 0.0
    assert grad(variables["params"])["log_scale"] == 1.0

    siglip = clip.CLIP(**TINY, init_temperature=0.1, sigmoid_bias=-10.0)
    params = nn.meta.unbox(siglip.init(jax.random.key(0), images, tokens))
    out = siglip.apply(params, images, tokens)
    np.testing.assert_allclose(out["log_scale"], math.log(10.0), rtol=1e-6)
    assert out["bias"].shape == () and float(out["bias"]) == -10.0
    assert _count(params) == _count(variables) + 1


def test_clip_vit_b16_parameter_count():
    """OpenAI CLIP ViT-B/16 has 149,620,737 parameters, and so does this default CLIP.

    The total matches although two layouts differ, by one 768-wide vector each way: OpenAI's
    position table has 197 rows (class token included) and its patch convolution has no
    bias; here (ViT's big_vision layout) the table covers the 196 patches, the class token
    is a free vector (OpenAI's class_embedding + positional_embedding[0]), and the patch
    convolution has a bias (zero when converting). The text tower, projections and
    logit scale match one to one.
    """
    model = clip.CLIP()
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.ones((1, 224, 224, 3)), jnp.ones((1, 77), jnp.int32)
    )
    params = nn.meta.unbox(shapes)["params"]
    assert _count(params) == 149_620_737
    assert _count(params["text_tower"]) == 63_165_952
    assert _count(params["image_tower"]) == 85_799_424
    assert params["image_tower"]["pos_embedding"]["pos_embedding"].shape == (1, 196, 768)
    assert params["text_tower"]["pos_embedding"].shape == (77, 512)
