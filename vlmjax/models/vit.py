"""Vision Transformer (Dosovitskiy et al., 2021): patchify, pre-LN encoder, cls, GAP or MAP
pooling, an optional pre-logits layer, a linear head.

Sizes come from a small table; `variant="B/16"` sets width, depth, MLP size, heads and
patch size at once, and explicit fields are used when `variant` is None.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers

# name -> (width, depth, mlp_dim, num_heads)
SIZES = {
    "mu": (64, 2, 256, 2),  # tiny, for tests
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def parse_variant(variant: str) -> dict[str, int]:
    """ "B/16" -> {width: 768, depth: 12, mlp_dim: 3072, num_heads: 12, patch_size: 16}."""
    name, _, patch = variant.partition("/")
    if name not in SIZES or not patch.isdigit():
        raise ValueError(
            f"unknown ViT variant {variant!r}: use NAME/PATCH with NAME in {list(SIZES)}"
        )
    width, depth, mlp_dim, num_heads = SIZES[name]
    return dict(
        width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=int(patch)
    )


class EncoderBlock(nn.Module):
    """Pre-LN block: x + MHA(LN(x)), then x + MLP(LN(x)). [b, l, d] -> [b, l, d].

    `is_causal`, `activation` and `eps` let CLIP's text tower (causal, quick_gelu, eps 1e-5)
    reuse the block.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    attention: str = "xla"
    is_causal: bool = False
    activation: str = "gelu"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True):
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        y = layers.layer_norm(self.dtype, name="norm1", epsilon=self.eps)(x)
        y = layers.MultiHeadAttention(
            self.num_heads,
            dtype=self.dtype,
            implementation=self.attention,
            is_causal=self.is_causal,
            name="attn",
        )(y)
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
        # (carry, per-layer output) so the same block works under nn.scan.
        return x, None


class Encoder(nn.Module):
    """`depth` EncoderBlocks, optionally scanned (one compiled body) and rematerialised."""

    depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    attention: str = "xla"
    scan: bool = False
    remat: str = "none"
    is_causal: bool = False
    activation: str = "gelu"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {list(REMAT_POLICIES)}")
        block = EncoderBlock
        if self.remat != "none":
            # static_argnums counts `self`: argument 2 is `deterministic`.
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], static_argnums=(2,))
        kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            dtype=self.dtype,
            attention=self.attention,
            is_causal=self.is_causal,
            activation=self.activation,
            eps=self.eps,
        )
        if self.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(**kwargs, name="layers")(x, deterministic)
        else:
            for i in range(self.depth):
                x, _ = block(**kwargs, name=f"layer_{i}")(x, deterministic)
        return layers.layer_norm(self.dtype, name="norm", epsilon=self.eps)(x)


class MAPHead(nn.Module):
    """Multihead attention pooling (Lee et al., 2019; SigLIP's and big_vision's MAP head):
    a learned probe token attends to all tokens, then x + MLP(LN(x)). [b, n, d] -> [b, d].

    The attention always takes the XLA path: with one query token a fused kernel gains
    nothing, and cuDNN refuses such lengths (NOTES.md).
    """

    num_heads: int
    mlp_dim: int
    dtype: layers.Dtype = jnp.float32
    activation: str = "gelu"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, d = x.shape
        probe = self.param(
            "probe",
            layers.partitioned(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, d),
        )
        probe = jnp.broadcast_to(probe, (b, 1, d)).astype(self.dtype)  # [b, 1, d]
        y = layers.MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
            probe, inputs_kv=x
        )  # [b, 1, d]
        z = layers.layer_norm(self.dtype, name="norm", epsilon=self.eps)(y)
        mlp = layers.Mlp(self.mlp_dim, dtype=self.dtype, activation=self.activation, name="mlp")
        y = y + mlp(z)
        return y[:, 0]  # [b, d]


POOLS = ("cls", "gap", "map")


class ViT(nn.Module):
    """Images [b, H, W, c] (float, already normalised) -> logits [b, num_classes] float32.

    With `num_classes=0` it returns the pooled representation [b, width] instead (used as
    an image tower).

    OpenAI CLIP's image tower is `pool="cls", pre_norm=True, activation="quick_gelu",
    eps=1e-5`: its `ln_pre` is `pre_norm`, and its `ln_post` (on the class token) is the
    encoder's final norm, since LayerNorm acts on each token alone. SigLIP's is
    `pool="map", activation="gelu_tanh", eps=1e-6`; Hugging Face's ViT is `pool="cls",
    cls_position=True, eps=1e-12`.

    `cls_position`: the position table also has a row for the class token ([1, 1 + n, d],
    added after the token is prepended, as in HF CLIP/ViT and timm); by default the table
    covers the patches only ([1, n, d]) and the class token has no position.
    `rep_size` > 0 adds the original ViT's pre-logits layer, Dense(rep_size) + tanh, after
    pooling (HF ViTModel's "pooler").
    """

    num_classes: int = 1000
    variant: str | None = None
    width: int = 192
    depth: int = 12
    mlp_dim: int = 768
    num_heads: int = 3
    patch_size: int = 16
    pool: str = "cls"
    dropout: float = 0.0
    dtype: str = "float32"
    attention: str = "xla"
    scan: bool = False
    remat: str = "none"
    head_zero_init: bool = True
    activation: str = "gelu"
    eps: float = 1e-6
    pre_norm: bool = False
    cls_position: bool = False
    rep_size: int = 0

    def hparams(self) -> dict[str, int]:
        if self.variant:
            return parse_variant(self.variant)
        return dict(
            width=self.width,
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            patch_size=self.patch_size,
        )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not one of {POOLS}")
        if self.cls_position and self.pool != "cls":
            raise ValueError(
                f"cls_position=True needs a class token (pool='cls'), not pool={self.pool!r}"
            )
        if images.ndim != 4:
            raise ValueError(
                f"ViT expects images [batch, height, width, channels], got {images.shape}"
            )
        hp = self.hparams()
        dtype = jnp.dtype(self.dtype)
        x = layers.PatchEmbed(hp["patch_size"], hp["width"], dtype=dtype, name="embedding")(
            images.astype(dtype)
        )  # [b, n, d]
        if not self.cls_position:
            x = layers.LearnedPosEmbed(name="pos_embedding")(x)
        if self.pool == "cls":
            cls = self.param(
                "cls",
                layers.partitioned(nn.initializers.zeros, (None, None, "embed")),
                (1, 1, hp["width"]),
            )
            x = jnp.concatenate(
                [jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])).astype(dtype), x], axis=1
            )  # [b, 1 + n, d]
        if self.cls_position:
            x = layers.LearnedPosEmbed(name="pos_embedding")(x)
        if self.pre_norm:
            x = layers.layer_norm(dtype, name="pre_norm", epsilon=self.eps)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = Encoder(
            depth=hp["depth"],
            num_heads=hp["num_heads"],
            mlp_dim=hp["mlp_dim"],
            dropout=self.dropout,
            dtype=dtype,
            attention=self.attention,
            scan=self.scan,
            remat=self.remat,
            activation=self.activation,
            eps=self.eps,
            name="encoder",
        )(x, not train)  # [b, n(+1), d]
        if self.pool == "map":
            pooled = MAPHead(
                hp["num_heads"],
                hp["mlp_dim"],
                dtype=dtype,
                activation=self.activation,
                eps=self.eps,
                name="map_head",
            )(x)  # [b, d]
        else:
            pooled = x[:, 0] if self.pool == "cls" else x.mean(axis=1)  # [b, d]
        if self.rep_size:
            pooled = nn.Dense(
                self.rep_size,
                dtype=dtype,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
                name="pre_logits",
            )(pooled)
            pooled = jnp.tanh(pooled)  # [b, rep_size]
        if not self.num_classes:
            return pooled
        head_init = (
            nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
        )
        return layers.classifier_head(self.num_classes, dtype, head_init)(pooled).astype(
            jnp.float32
        )
