"""Shared transformer blocks: attention, MLP, patch and position embeddings.

Parameters carry logical axis names (see `vlmjax/mesh.py` for the rules); activations are
constrained with `act_*` names. Compute runs in `dtype`, parameters stay float32, and
softmax/normalisation statistics are float32 (Flax LayerNorm reduces in float32; the XLA
attention path upcasts logits before the softmax).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype | str

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def relu_squared(x: jax.Array) -> jax.Array:
    """relu(x)**2 (So et al., 2021, "Primer"): Persimmon's and Fuyu's MLP nonlinearity."""
    return jnp.square(jax.nn.relu(x))


# "gelu" is exact (the original ViT, Hugging Face); "gelu_tanh" is flax's default form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "relu2": relu_squared,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """Shorthand for an initialiser annotated with logical axis names."""
    return nn.with_logical_partitioning(init, names)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention; the one place a fused kernel plugs in.

    q: [b, q_len, heads, head_dim]; k, v: [b, kv_len, heads, head_dim]; mask broadcastable
    to [b, heads, q_len, kv_len] (True = attend). `implementation`: "xla" (any backend),
    "cudnn" (fused flash attention on NVIDIA GPUs) or "auto" (cudnn on GPU, else xla).
    Returns [b, q_len, heads, head_dim] in q's dtype.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
    )


def rotary_embedding(
    x: jax.Array, positions: jax.Array, *, theta: float = 10000.0, fraction: float = 1.0
) -> jax.Array:
    """Rotary position embedding (Su et al., 2021) on the first `fraction` of each head.

    x: [b, l, heads, head_dim]; positions: [b, l] (int). Returns x's shape and dtype.
    The rotated part has `rot = int(head_dim * fraction)` dims (even); the rest passes
    through, as in GPT-NeoX and Persimmon (`partial_rotary_factor`). Pairs are (i, i + rot/2),
    the "rotate half" layout of GPT-NeoX and Hugging Face, not RoFormer's interleaved
    (2i, 2i + 1): the two differ by a permutation of q/k features, so checkpoints care.
    Angles are computed in float32: positions reach 16k and bf16 would lose them.
    """
    head_dim = x.shape[-1]
    rot = int(head_dim * fraction)
    if rot % 2 or rot <= 0:
        raise ValueError(
            f"rotary dims int({head_dim} * {fraction}) = {rot} must be a positive even number"
        )
    half = rot // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))  # [rot/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, l, rot/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [b, l, 1, rot/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    x1, x2 = x_rot[..., :half], x_rot[..., half:]  # [b, l, h, rot/2] each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)


class HeadsProjection(nn.Module):
    """[b, l, d] -> [b, l, heads, head_dim] (one of the q/k/v projections).

    Written out rather than nn.DenseGeneral, whose initialiser works on a flattened kernel
    and so breaks 3-D logical sharding annotations.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        kernel = self.param(
            "kernel",
            partitioned(init, ("embed", "heads", "kv")),
            (x.shape[-1], self.num_heads, self.head_dim),
        )
        bias = self.param(
            "bias",
            partitioned(nn.initializers.zeros, ("heads", "kv")),
            (self.num_heads, self.head_dim),
        )
        x, kernel, bias = (t.astype(self.dtype) for t in (x, kernel, bias))
        return jnp.einsum("bld,dhk->blhk", x, kernel) + bias  # [b, l, h, dh]


class HeadsMerge(nn.Module):
    """[b, l, heads, head_dim] -> [b, l, width] (the attention output projection)."""

    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        kernel = self.param(
            "kernel", partitioned(init, ("heads", "kv", "embed")), (*x.shape[-2:], self.width)
        )
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (self.width,))
        x, kernel, bias = (t.astype(self.dtype) for t in (x, kernel, bias))
        return jnp.einsum("blhk,hkd->bld", x, kernel) + bias  # [b, l, d]


class MultiHeadAttention(nn.Module):
    """Multi-head attention over [b, l, d] inputs: self-attention, or with `inputs_kv`
    [b, m, d] cross-attention (queries from x, keys and values from inputs_kv)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"
    is_causal: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, inputs_kv: jax.Array | None = None
    ) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        kv = x if inputs_kv is None else inputs_kv
        q, k, v = (
            HeadsProjection(self.num_heads, head_dim, dtype=self.dtype, name=n)(source)
            for n, source in (("query", x), ("key", kv), ("value", kv))
        )  # [b, l, h, dh], [b, m, h, dh] x 2
        q, k, v = (
            nn.with_logical_constraint(t, ("batch", "length", "act_heads", "act_kv"))
            for t in (q, k, v)
        )
        out = dot_product_attention(
            q, k, v, mask=mask, is_causal=self.is_causal, implementation=self.implementation
        )
        out = HeadsMerge(width, dtype=self.dtype, name="out")(out)  # [b, l, d]
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))


class Mlp(nn.Module):
    """Transformer feed-forward block: Dense(mlp_dim) -> GELU -> Dense(width).

    `activation` (a name in ACTIVATIONS), when set, replaces the GELU chosen by
    `approximate_gelu`.
    """

    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout: float = 0.0
    # Exact GELU as in the original ViT and Hugging Face; flax's default is the tanh form.
    approximate_gelu: bool = False
    activation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=partitioned(nn.initializers.normal(1e-6), ("mlp",)),
            name="fc1",
        )(x)  # [b, l, mlp]
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        if self.activation is None:
            h = nn.gelu(h, approximate=self.approximate_gelu)
        else:
            h = activation_fn(self.activation)(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        out = nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.normal(1e-6), ("embed",)),
            name="fc2",
        )(h)  # [b, l, d]
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))


def layer_norm(dtype: Dtype, name: str | None = None, epsilon: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm with logical axes; eps 1e-6 is flax's default (HF ViT: 1e-12, CLIP: 1e-5)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        scale_init=partitioned(nn.initializers.ones, ("embed",)),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def residual_mlp(
    x: jax.Array,
    mlp_dim: int,
    *,
    dtype: Dtype,
    activation: str,
    eps: float,
    dropout: float,
    deterministic: bool,
) -> jax.Array:
    """x + Dropout(MLP(LN(x))), the second half of a pre-LN transformer block; [b, l, d].

    Call it inside a block's compact `__call__`: its "norm2" and "mlp" submodules are the
    caller's, so parameter names are those of a block that spells it out."""
    y = layer_norm(dtype, name="norm2", epsilon=eps)(x)
    y = Mlp(mlp_dim, dtype=dtype, dropout=dropout, activation=activation, name="mlp")(
        y, deterministic
    )
    return x + nn.Dropout(dropout)(y, deterministic=deterministic)


def classifier_head(num_classes: int, dtype: Dtype, kernel_init: Callable) -> nn.Dense:
    """The final Dense "head" of a classifier: [b, d] -> logits [b, num_classes] in `dtype`
    (callers cast to float32), with a zero bias and (embed, classes) logical axes."""
    return nn.Dense(
        num_classes,
        dtype=dtype,
        kernel_init=partitioned(kernel_init, ("embed", "classes")),
        bias_init=partitioned(nn.initializers.zeros, ("classes",)),
        name="head",
    )


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly projected: [b, H, W, c] -> [b, H/p * W/p, width]."""

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        _, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not divisible by patch_size {p}; "
                f"resize the images or choose a patch size that divides both"
            )
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), ("patch", None, None, "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="proj",
        )(images)  # [b, H/p, W/p, width]
        b, gh, gw, d = x.shape
        return x.reshape(b, gh * gw, d)


class LearnedPosEmbed(nn.Module):
    """Adds a learned [1, length, width] position table to [b, length, width] tokens."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, length, width = x.shape
        table = self.param(
            "pos_embedding",
            partitioned(nn.initializers.normal(0.02), (None, "length", "embed")),
            (1, length, width),
        )
        return x + table.astype(x.dtype)
