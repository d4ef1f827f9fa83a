"""CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023) two-tower models.

An image tower (`vit.ViT` or `convnets.ResNet`, pooled, no head) and a text tower
(`text.TextTransformer`), each followed by a bias-free linear projection to `embed_dim`
and L2 normalisation, plus a learnable log temperature and, for the sigmoid loss, a
learnable bias. Losses live elsewhere; this module only produces the embeddings and the two scalars.

Parameters: `image_tower/...`, `text_tower/...`, `image_proj/kernel` [width_img, E],
`text_proj/kernel` [width_txt, E], `log_scale` [], and `bias` [] when `sigmoid_bias` is set.

SigLIP (as Hugging Face's SiglipModel has it) is `image_projection="none"` (the MAP-pooled
image tower's output is the embedding: vision width == embed_dim) and
`text_projection="linear_bias"` (the text tower's `head`, a Dense with bias), with the
towers' SigLIP fields (`vit.ViT`, `text.TextTransformer`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import convnets, layers, text, vit

# OpenAI CLIP ViT-B/16's image tower. A `vision` dict is merged over this; to give sizes
# explicitly, pass `variant=None` with width/depth/mlp_dim/num_heads/patch_size.
VISION_DEFAULTS = dict(variant="B/16", pool="cls", pre_norm=True, activation="quick_gelu", eps=1e-5)

# How a tower's pooled output becomes its embedding: a bias-free Dense to embed_dim (CLIP),
# one with a bias (SigLIP's text head), or none (the pooled output already is embed_dim).
PROJECTIONS = ("linear", "linear_bias", "none")


class CLIP(nn.Module):
    """images [b, H, W, 3] and tokens [b, L] -> unit-norm embeddings [b, embed_dim] float32.

    `image_model` is "vit" (`vision` holds ViT fields, merged over VISION_DEFAULTS) or
    "resnet" (`vision` holds ResNet fields; its BatchNorm statistics are the
    `batch_stats` collection); `num_classes` is forced to 0. `text` holds TextTransformer
    fields (merged over its defaults). A tower without its own
    `dtype` computes in this module's `dtype`. Parameters stay float32.
    """

    embed_dim: int = 512
    image_model: str = "vit"
    vision: dict | None = None
    text: dict | None = None
    init_temperature: float = 0.07
    max_scale: float = 100.0
    sigmoid_bias: float | None = None
    dtype: str = "float32"
    image_projection: str = "linear"
    text_projection: str = "linear"

    def setup(self):
        self.image_tower, self.text_tower = towers(self)

        def projection(kind: str, field: str) -> nn.Dense | None:
            if kind not in PROJECTIONS:
                raise ValueError(f"{field}={kind!r} is not one of {PROJECTIONS}")
            if kind == "none":
                return None
            return nn.Dense(
                self.embed_dim,
                use_bias=kind == "linear_bias",
                dtype=jnp.dtype(self.dtype),
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
            )

        self.image_proj = projection(self.image_projection, "image_projection")
        self.text_proj = projection(self.text_projection, "text_projection")
        self.log_scale = self.param(
            "log_scale",
            nn.initializers.constant(math.log(1.0 / self.init_temperature)),
            (),
        )
        if self.sigmoid_bias is not None:
            self.bias = self.param("bias", nn.initializers.constant(self.sigmoid_bias), ())

    def _embed(self, proj: nn.Dense | None, x: jax.Array) -> jax.Array:
        if proj is None:
            if x.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"a tower without projection gives width {x.shape[-1]}, not "
                    f"embed_dim={self.embed_dim}: set embed_dim to the tower's width"
                )
            z = x.astype(jnp.float32)  # [b, E]
        else:
            z = proj(x.astype(jnp.dtype(self.dtype))).astype(jnp.float32)  # [b, E]
        # Normalise in float32; the epsilon only guards an all-zero row.
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [b, H, W, 3] (normalised floats) -> [b, embed_dim] float32, unit norm."""
        return self._embed(self.image_proj, self.image_tower(images, train=train))

    def encode_text(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """tokens [b, L] int -> [b, embed_dim] float32, unit norm."""
        return self._embed(self.text_proj, self.text_tower(tokens, train=train))

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict:
        """Returns dict(zimg [b, E], ztxt [b, E], log_scale [] clamped to log(max_scale),
        bias [] or None); all float32. The logit scale is exp(log_scale)."""
        return dict(
            zimg=self.encode_image(images, train=train),
            ztxt=self.encode_text(tokens, train=train),
            # The CLIP paper clips the scale at 100; clamping here (not the parameter, as
            # open_clip does after each step) keeps the update step free of model details.
            log_scale=jnp.minimum(self.log_scale, math.log(self.max_scale)),
            bias=self.bias if self.sigmoid_bias is not None else None,
        )


def towers(model: CLIP) -> tuple[nn.Module, text.TextTransformer]:
    """(image tower, text tower) of `model` with every field resolved (defaults merged in).

    Called outside a module they are unbound, for code that reads their hyperparameters
    (the exporters); `CLIP.setup` builds its submodules with it.
    """
    text_cfg = {"dtype": model.dtype, **(model.text or {})}
    if model.image_model == "vit":
        vision_cfg = {"dtype": model.dtype, **VISION_DEFAULTS, **(model.vision or {})}
        image_tower = vit.ViT(**{**vision_cfg, "num_classes": 0})
    elif model.image_model == "resnet":
        vision_cfg = {"dtype": model.dtype, **(model.vision or {})}
        image_tower = convnets.ResNet(**{**vision_cfg, "num_classes": 0})
    else:
        raise ValueError(f"image_model={model.image_model!r} is not 'vit' or 'resnet'")
    return image_tower, text.TextTransformer(**text_cfg)
