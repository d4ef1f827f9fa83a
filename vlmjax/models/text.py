"""CLIP's text tower (Radford et al., 2021): token + learned position embeddings, a causal
pre-LN transformer, a final LayerNorm, and one pooled token. With `causal=False` and
`pool="final"` it is SigLIP's text tower.

Tokens [b, L] (int, L <= context_length) -> pooled [b, width] in float32. The blocks are
ViT's (`vit.Encoder` with `is_causal=causal`), so scan and remat work the same way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers, vit

POOLS = ("eos", "last", "final")


def pool_index(
    tokens: jax.Array, pool: str = "eos", eos_id: int | None = None, pad_id: int = 0
) -> jax.Array:
    """The position [b] whose output represents each sequence of `tokens` [b, L].

    "eos": the first `eos_id`; with `eos_id=None`, the argmax of the token ids, as OpenAI
    CLIP does (its EOS, 49407, is the largest id). A row without `eos_id` (truncated text)
    uses its last position. "last": the last position that is not `pad_id` (0 if all are).
    "final": position L - 1 whatever it holds (SigLIP pads every text to the same length and
    pools there, padding or not).
    """
    _, length = tokens.shape
    if pool == "eos":
        if eos_id is None:
            return jnp.argmax(tokens, axis=-1)
        is_eos = tokens == eos_id  # [b, L]
        return jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1), length - 1)
    if pool == "last":
        positions = jnp.where(tokens != pad_id, jnp.arange(length), 0)  # [b, L]
        return positions.max(axis=-1)
    if pool == "final":
        return jnp.full(tokens.shape[:1], length - 1)
    raise ValueError(f"pool={pool!r} is not one of {POOLS}")


class TextTransformer(nn.Module):
    """Tokens [b, L] -> pooled [b, width] float32 (and the sequence [b, L, width] on request).

    Defaults are OpenAI CLIP's text tower (ViT-B/16 and B/32 models). SigLIP's text tower
    is `causal=False, pool="final", activation="gelu_tanh", eps=1e-6`.
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    activation: str = "quick_gelu"
    eps: float = 1e-5
    pool: str = "eos"
    eos_id: int | None = None
    pad_id: int = 0
    dropout: float = 0.0
    dtype: str = "float32"
    attention: str = "xla"
    scan: bool = False
    remat: str = "none"
    # CLIP masks attention causally; SigLIP's text tower attends both ways.
    causal: bool = True

    @nn.compact
    def __call__(
        self, tokens: jax.Array, train: bool = False, return_sequence: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Returns pooled [b, width], or (pooled, sequence [b, L, width]) with
        `return_sequence=True`; both float32, after the final LayerNorm."""
        if tokens.ndim != 2:
            raise ValueError(f"TextTransformer expects tokens [batch, length], got {tokens.shape}")
        b, length = tokens.shape
        if length > self.context_length:
            raise ValueError(
                f"{length} tokens exceed context_length={self.context_length}; "
                f"truncate the text or raise context_length"
            )
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not one of {POOLS}")
        dtype = jnp.dtype(self.dtype)
        x = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=dtype,
            embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding",
        )(tokens)  # [b, L, d]
        # One row per context position; shorter inputs use the first L rows.
        pos = self.param(
            "pos_embedding",
            layers.partitioned(nn.initializers.normal(0.01), ("length", "embed")),
            (self.context_length, self.width),
        )
        x = x + pos[:length].astype(dtype)  # [b, L, d]
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = vit.Encoder(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            dtype=dtype,
            attention=self.attention,
            scan=self.scan,
            remat=self.remat,
            is_causal=self.causal,
            activation=self.activation,
            eps=self.eps,
            name="encoder",
        )(x, not train)  # [b, L, d], final LayerNorm included
        x = x.astype(jnp.float32)
        idx = pool_index(tokens, self.pool, self.eos_id, self.pad_id)  # [b]
        pooled = x[jnp.arange(b), idx]  # [b, d]
        if return_sequence:
            return pooled, x
        return pooled
