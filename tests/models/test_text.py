import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import layers, text

TINY = dict(vocab_size=50, context_length=8, width=32, depth=2, num_heads=4, mlp_dim=64)


def _tokens():
    # Token ids below 40 with an "EOS" of 49 (the largest id, as in OpenAI's tokenizer) at
    # positions 2 and 5, and zeros (padding) after it.
    tokens = np.array([[7, 12, 49, 0, 0, 0], [3, 4, 5, 6, 8, 49]], np.int32)
    return jnp.asarray(tokens), np.array([2, 5])


@pytest.fixture(scope="module")
def tiny():
    model = text.TextTransformer(**TINY)
    tokens, _ = _tokens()
    return model, nn.meta.unbox(model.init(jax.random.key(0), tokens))


def test_quick_gelu_and_activation_names():
    x = jnp.linspace(-6.0, 6.0, 101)
    np.testing.assert_allclose(layers.quick_gelu(x), x / (1 + np.exp(-1.702 * x)), atol=1e-6)
    assert layers.activation_fn("quick_gelu") is layers.quick_gelu
    np.testing.assert_allclose(layers.activation_fn("gelu")(x), nn.gelu(x, approximate=False))
    np.testing.assert_allclose(layers.activation_fn("gelu_tanh")(x), nn.gelu(x))
    with pytest.raises(ValueError, match="not one of"):
        layers.activation_fn("relu6")


def test_mlp_activation_choice():
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    default = layers.Mlp(16)
    params = nn.meta.unbox(default.init(jax.random.key(0), x))
    h = x @ params["params"]["fc1"]["kernel"] + params["params"]["fc1"]["bias"]
    fc2 = params["params"]["fc2"]

    def expected(act):
        return act(h) @ fc2["kernel"] + fc2["bias"]

    # The default stays exact GELU; `activation` switches the nonlinearity, same params.
    exact = expected(lambda t: nn.gelu(t, approximate=False))
    np.testing.assert_allclose(default.apply(params, x), exact, atol=1e-5)
    quick = layers.Mlp(16, activation="quick_gelu").apply(params, x)
    np.testing.assert_allclose(quick, expected(layers.quick_gelu), atol=1e-5)


def test_pool_index():
    tokens = jnp.array([[5, 9, 2, 9, 0], [1, 2, 3, 0, 0], [4, 4, 4, 4, 4]])
    # eos_id=None: argmax of ids, first occurrence on ties.
    np.testing.assert_array_equal(text.pool_index(tokens), [1, 2, 0])
    # eos_id=9: first 9; a row without one uses the last position.
    np.testing.assert_array_equal(text.pool_index(tokens, eos_id=9), [1, 4, 4])
    np.testing.assert_array_equal(text.pool_index(tokens, "last", pad_id=0), [3, 2, 4])
    with pytest.raises(ValueError, match="not one of"):
        text.pool_index(tokens, "mean")


def test_shapes_dtypes_and_param_layout(tiny):
    model, variables = tiny
    tokens, _ = _tokens()
    pooled, seq = model.apply(variables, tokens, return_sequence=True)
    assert pooled.shape == (2, 32) and pooled.dtype == jnp.float32
    assert seq.shape == (2, 6, 32) and seq.dtype == jnp.float32
    params = variables["params"]
    assert params["token_embedding"]["embedding"].shape == (50, 32)
    # The position table covers the whole context; 6 tokens use its first 6 rows.
    assert params["pos_embedding"].shape == (8, 32)
    spec = nn.get_partition_spec(model.init(jax.random.key(0), tokens))["params"]
    assert tuple(spec["token_embedding"]["embedding"]) == ("vocab", "embed")
    assert tuple(spec["pos_embedding"]) == ("length", "embed")

    bf16 = text.TextTransformer(**TINY, dtype="bfloat16")
    out = bf16.apply(variables, tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, pooled, atol=0.1)
    with pytest.raises(ValueError, match="context_length"):
        model.apply(variables, jnp.zeros((1, 9), jnp.int32))


def test_eos_pooling_picks_the_eos_position(tiny):
    model, variables = tiny
    tokens, eos_at = _tokens()
    pooled, seq = model.apply(variables, tokens, return_sequence=True)
    np.testing.assert_array_equal(pooled, seq[np.arange(2), eos_at])
    # Not the last position for the padded row.
    assert not np.allclose(pooled[0], seq[0, -1])
    # An explicit eos_id finds the same positions; "last" non-pad gives them too here.
    for kwargs in (dict(eos_id=49), dict(pool="last", pad_id=0)):
        other = text.TextTransformer(**TINY, **kwargs).apply(variables, tokens)
        np.testing.assert_array_equal(other, pooled)


def test_causality(tiny):
    model, variables = tiny
    tokens, _ = _tokens()
    _, seq = model.apply(variables, tokens, return_sequence=True)
    changed = tokens.at[:, 4].set(17)
    _, seq2 = model.apply(variables, changed, return_sequence=True)
    np.testing.assert_allclose(seq2[:, :4], seq[:, :4], atol=1e-6)
    assert not np.allclose(seq2[:, 4], seq[:, 4], atol=1e-3)
