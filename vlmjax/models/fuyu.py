"""Fuyu (Bavishi et al., 2023): a causal decoder that reads image patches as tokens.

No vision encoder: each image patch (p x p x 3 pixels, flattened) goes through one linear
projection into the token embedding space, rows of patches are closed by a learned
image-newline token, and the text follows. The decoder is Persimmon's: pre-LN blocks with
rotary position embeddings on part of each head (`rotary_fraction`), optional LayerNorm
on queries and keys (`qk_norm`), and a configurable MLP nonlinearity (relu^2 for Fuyu).

Inputs, one row per packed sequence (`vlmjax/data/fuyu_layout.py` builds them):

    tokens       [b, L] int32   token ids; image positions hold a placeholder id (ignored)
    patches      [b, L, p*p*c]  normalised pixels of the patch at each image position
                                (zeros elsewhere): aligned with the tokens, so projecting
                                them is one dense matmul and shards like any activation
    image_mask   [b, L] bool    True where the input is a patch
    segment_ids  [b, L] int32   1, 2, ... per packed example, 0 for padding; attention
                                never crosses segments (mask = causal AND same segment)
    positions    [b, L] int32   rotary position within the segment (0 at its first token)

Output: logits [b, L, vocab] float32; position i predicts token i + 1.

Decoding keeps an explicit KV cache (`init_cache`): a dict of arrays passed in and
returned by `__call__`, not a Flax `cache` collection, so a decode step is a pure function
`(params, cache, inputs) -> (logits, cache)` that jits and shards like anything else:

    {"index": int32 [],                 next slot to write (shared by all rows)
     "segment_ids": int32 [b, S],       segment of each written slot; 0 = empty or padding
     "key", "value": [depth, b, S, heads, head_dim] in the compute dtype}

A call with a cache writes its L keys/values at slots index..index+L-1 and attends to all S
slots under the same mask rule (slot <= query slot AND same segment), so a left-padded
prompt (padding has segment 0) and one-token steps need no special cases.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers, vit

# The batch keys `__call__` reads, in its argument order (fuyu_layout builds all of them).
INPUT_KEYS = ("tokens", "patches", "image_mask", "segment_ids", "positions")

# name -> (width, depth, mlp_dim, num_heads)
SIZES = {
    "mu": (64, 2, 128, 4),  # tiny, for tests
    "S": (512, 8, 2048, 8),
    "8b": (4096, 36, 16384, 64),  # adept/fuyu-8b (and Persimmon-8B)
}


class Attention(nn.Module):
    """Causal self-attention with rotary positions, optional qk-norm and a KV cache.

    x [b, l, d], positions [b, l], mask [b, 1, l, S] (True = attend); kv_cache (key, value)
    each [b, S, heads, head_dim] or None (then S = l). Returns ([b, l, d], new kv_cache).
    """

    num_heads: int
    dtype: layers.Dtype = jnp.float32
    implementation: str = "xla"
    qk_norm: bool = False
    eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0

    def _norm(self, name: str) -> nn.LayerNorm:
        # One LayerNorm over head_dim shared by all heads, as in Persimmon.
        return nn.LayerNorm(
            epsilon=self.eps,
            dtype=self.dtype,
            scale_init=layers.partitioned(nn.initializers.ones, ("kv",)),
            bias_init=layers.partitioned(nn.initializers.zeros, ("kv",)),
            name=name,
        )

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache=None, index=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        q, k, v = (
            layers.HeadsProjection(self.num_heads, head_dim, dtype=self.dtype, name=n)(x)
            for n in ("query", "key", "value")
        )  # [b, l, h, dh] each
        if self.qk_norm:
            q, k = self._norm("q_norm")(q), self._norm("k_norm")(k)
        rope = dict(theta=self.rope_theta, fraction=self.rotary_fraction)
        q = layers.rotary_embedding(q, positions, **rope)
        k = layers.rotary_embedding(k, positions, **rope)
        if kv_cache is not None:
            cached_k, cached_v = kv_cache  # [b, S, h, dh] each
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, index, 0, 0))
            kv_cache = (k, v)
        q, k, v = (
            nn.with_logical_constraint(t, ("batch", "length", "act_heads", "act_kv"))
            for t in (q, k, v)
        )
        out = layers.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, implementation=self.implementation
        )  # [b, l, h, dh]
        out = layers.HeadsMerge(width, dtype=self.dtype, name="out")(out)  # [b, l, d]
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed")), kv_cache


class DecoderBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)). [b, l, d] -> [b, l, d].

    Returns (x, new kv_cache) so that the same block runs under nn.scan, the cache being
    the scanned per-layer input and output.
    """

    num_heads: int
    mlp_dim: int
    dtype: layers.Dtype = jnp.float32
    attention: str = "xla"
    activation: str = "relu2"
    qk_norm: bool = True
    eps: float = 1e-5
    rope_theta: float = 25000.0
    rotary_fraction: float = 0.5
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, positions, mask, index, kv_cache, deterministic: bool = True):
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        y = layers.layer_norm(self.dtype, name="norm1", epsilon=self.eps)(x)
        y, kv_cache = Attention(
            self.num_heads,
            dtype=self.dtype,
            implementation=self.attention,
            qk_norm=self.qk_norm,
            eps=self.eps,
            rope_theta=self.rope_theta,
            rotary_fraction=self.rotary_fraction,
            name="attn",
        )(y, positions, mask, kv_cache, index)
        x = x + nn.Dropout(self.dropout)(y, deterministic=deterministic)
        x = layers.residual_mlp(
            x,
            self.mlp_dim,
            dtype=self.dtype,
            activation=self.activation,
            eps=self.eps,
            dropout=self.dropout,
            deterministic=deterministic,
        )
        return x, kv_cache


def attention_mask(
    segment_ids: jax.Array, key_segment_ids: jax.Array, offset: jax.Array | int = 0
) -> jax.Array:
    """[b, 1, l, S] bool: query i (at slot offset + i) sees key slot j iff j <= offset + i
    and both have the same segment id. segment_ids [b, l]; key_segment_ids [b, S]."""
    _, length = segment_ids.shape
    _, slots = key_segment_ids.shape
    query_slot = offset + jnp.arange(length)  # [l]
    causal = jnp.arange(slots)[None, :] <= query_slot[:, None]  # [l, S]
    same = segment_ids[:, :, None] == key_segment_ids[:, None, :]  # [b, l, S]
    return (causal[None] & same)[:, None]  # [b, 1, l, S]


class FuyuDecoder(nn.Module):
    """(tokens, patches, image_mask, segment_ids, positions) -> logits [b, L, vocab] float32.

    Defaults are adept/fuyu-8b's (with `variant="8b"`, or the explicit fields below when
    `variant` is None). With `cache` (see `init_cache`) it returns (logits, new cache).
    `last_only=True` computes the logits of the last position only ([b, 1, vocab]), which
    is all a decoding step needs (the head is a large matmul for big vocabularies).
    """

    vocab_size: int = 262144
    variant: str | None = None
    width: int = 4096
    depth: int = 36
    mlp_dim: int = 16384
    num_heads: int = 64
    patch_size: int = 30
    channels: int = 3
    activation: str = "relu2"
    qk_norm: bool = True
    rotary_fraction: float = 0.5
    rope_theta: float = 25000.0
    eps: float = 1e-5
    dropout: float = 0.0
    dtype: str = "float32"
    attention: str = "xla"
    scan: bool = False
    remat: str = "none"

    def hparams(self) -> dict[str, int]:
        if self.variant:
            if self.variant not in SIZES:
                raise ValueError(f"unknown Fuyu variant {self.variant!r}: one of {list(SIZES)}")
            width, depth, mlp_dim, num_heads = SIZES[self.variant]
        else:
            width, depth, mlp_dim = self.width, self.depth, self.mlp_dim
            num_heads = self.num_heads
        return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)

    def _blocks(self, hp: dict[str, int], dtype: jnp.dtype):
        if self.remat not in vit.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {list(vit.REMAT_POLICIES)}")
        block = DecoderBlock
        if self.remat != "none":
            # static_argnums counts `self`: argument 6 is `deterministic`.
            block = nn.remat(block, policy=vit.REMAT_POLICIES[self.remat], static_argnums=(6,))
        return block, dict(
            num_heads=hp["num_heads"],
            mlp_dim=hp["mlp_dim"],
            dtype=dtype,
            attention=self.attention,
            activation=self.activation,
            qk_norm=self.qk_norm,
            eps=self.eps,
            rope_theta=self.rope_theta,
            rotary_fraction=self.rotary_fraction,
            dropout=self.dropout,
        )

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        patches: jax.Array,
        image_mask: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        cache: dict[str, jax.Array] | None = None,
        train: bool = False,
        last_only: bool = False,
    ):
        if tokens.ndim != 2:
            raise ValueError(f"FuyuDecoder expects tokens [batch, length], got {tokens.shape}")
        b, length = tokens.shape
        patch_dim = self.patch_size * self.patch_size * self.channels
        if patches.shape != (b, length, patch_dim):
            raise ValueError(
                f"patches {patches.shape} should be [batch, length, patch_size**2 * channels] = "
                f"{(b, length, patch_dim)} (aligned with tokens; see data/fuyu_layout.py)"
            )
        if segment_ids is None:
            segment_ids = jnp.ones((b, length), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        hp = self.hparams()
        dtype = jnp.dtype(self.dtype)

        text = nn.Embed(
            self.vocab_size,
            hp["width"],
            dtype=dtype,
            embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding",
        )(tokens)  # [b, L, d]
        image = nn.Dense(
            hp["width"],
            dtype=dtype,
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("patch", "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
            name="patch_projection",
        )(patches.astype(dtype))  # [b, L, d]
        x = jnp.where(image_mask[..., None], image, text)  # [b, L, d]
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        if cache is None:
            index, kv = 0, None
            mask = attention_mask(segment_ids, segment_ids)  # [b, 1, L, L]
        else:
            index = cache["index"]
            key_segments = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index)
            )  # [b, S]
            kv = (cache["key"], cache["value"])  # [depth, b, S, h, dh] each
            mask = attention_mask(segment_ids, key_segments, index)  # [b, 1, L, S]

        block, kwargs = self._blocks(hp, dtype)
        if self.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=hp["depth"],
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, kv = stack(**kwargs, name="layers")(x, positions, mask, index, kv, not train)
        else:
            new_kv = []
            for i in range(hp["depth"]):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                x, layer_kv = block(**kwargs, name=f"layer_{i}")(
                    x, positions, mask, index, layer_kv, not train
                )
                new_kv.append(layer_kv)
            if kv is not None:
                kv = tuple(jnp.stack([layer[j] for layer in new_kv]) for j in (0, 1))
        x = layers.layer_norm(dtype, name="final_norm", epsilon=self.eps)(x)
        if last_only:
            x = x[:, -1:]
        logits = nn.Dense(
            self.vocab_size,
            use_bias=False,
            dtype=dtype,
            kernel_init=layers.partitioned(nn.initializers.normal(0.02), ("embed", "vocab")),
            name="head",
        )(x).astype(jnp.float32)  # [b, L, vocab]
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        if cache is None:
            return logits
        new_cache = dict(index=index + length, segment_ids=key_segments, key=kv[0], value=kv[1])
        return logits, new_cache


def init_cache(
    model: FuyuDecoder, batch_size: int, max_length: int, dtype: str | None = None
) -> dict[str, jax.Array]:
    """An empty KV cache of `max_length` slots (prompt + generated tokens), in the model's
    compute dtype unless `dtype` is given. See the module docstring for the layout."""
    hp = model.hparams()
    shape = (hp["depth"], batch_size, max_length, hp["num_heads"], hp["width"] // hp["num_heads"])
    dtype = jnp.dtype(dtype or model.dtype)
    return dict(
        index=jnp.zeros((), jnp.int32),
        segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
        key=jnp.zeros(shape, dtype),
        value=jnp.zeros(shape, dtype),
    )


def model_inputs(batch: dict) -> dict:
    """The entries of a fuyu_layout batch that `FuyuDecoder.__call__` takes, by keyword."""
    return {k: batch[k] for k in INPUT_KEYS if k in batch}
