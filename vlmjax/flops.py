"""Analytic model FLOPs of one training example, and the peak table that MFU divides by.

What is counted: the matrix products, at 2 FLOPs per multiply-add: dense layers, the q/k/v
and output projections, the attention scores (q @ k.T) and values (p @ v) over the full
L x L matrix (causal masking skips none of it in the XLA attention), convolutions, the CLIP
projections and the contrastive logits. A training step is 3x the forward count: the
backward pass does two products per forward product (gradients w.r.t. the input and w.r.t.
the weight, or w.r.t. both operands of q @ k.T and p @ v).

What is ignored: norms, softmaxes, activations, residual adds, pooling, embedding gathers,
position embeddings, the loss's elementwise terms and the optimizer update (each is O(size
of an activation or a parameter), a few percent at most of a transformer's products), and
the input gradient of the first layer, which the backward pass never computes (3x
overcounts the patch embedding by one third of its forward: 0.2% of a ViT-B/16 step).

The contrastive logits are one [B, E] @ [E, B] product per step, 2 * B * E FLOPs per
example, which grows with the global batch B. (The all_gather loss computes both logit
directions, i.e. that product twice, and the chunked one recomputes it in the backward
pass; those are implementation FLOPs, not model FLOPs, and are left out like remat.)

`tests/test_flops.py` checks these counts against XLA's `cost_analysis()` on small models.
torch's `FlopCounterMode` gave 123.8 GFLOP for a CLIP ViT-B/16 pair; we count 123.26. The
difference is convention, not a missing layer: torch counts a recomputation of the scores
in its fused attention's backward and no input gradient for the patch embedding
(`torch_counter_delta`); counted that way we get 123.82.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import ml_collections

from vlmjax.models import clip, convnets, fuyu, text, vit

TRAIN_FACTOR = 3  # forward + backward (two products per forward product)

# --- building blocks: forward FLOPs of one example ---------------------------------------------


def dense(tokens: int, d_in: int, d_out: int) -> float:
    """[tokens, d_in] @ [d_in, d_out]."""
    return 2.0 * tokens * d_in * d_out


def conv(
    size: int, kernel: int, stride: int, pad: int, c_in: int, c_out: int, count_padding: bool = True
) -> tuple[float, int]:
    """(FLOPs, output size) of a square kernel x kernel convolution on a size x size map
    padded by `pad` on each side.

    With `count_padding=False` the window taps that fall on padding are left out, as XLA's
    `cost_analysis()` counts (used by the tests to check the layer walk exactly); the usual
    convention, and torch's FlopCounterMode, count them.
    """
    out = (size + 2 * pad - kernel) // stride + 1
    if count_padding:
        taps = out * kernel
    else:  # taps of output position o: those of o * stride - pad + [0, kernel) inside the map
        starts = [o * stride - pad for o in range(out)]
        taps = sum(max(0, min(kernel, size - s) - max(0, -s)) for s in starts)
    return 2.0 * taps * taps * c_in * c_out, out


def attention(q_len: int, kv_len: int, width: int) -> float:
    """Scores q @ k.T and values p @ v, summed over heads (heads * head_dim = width)."""
    return 2 * 2.0 * q_len * kv_len * width


def transformer_layer(tokens: int, width: int, mlp_dim: int) -> float:
    """One pre-LN block: q, k, v and output projections, attention, two-layer MLP."""
    return (
        4 * dense(tokens, width, width)
        + attention(tokens, tokens, width)
        + dense(tokens, width, mlp_dim)
        + dense(tokens, mlp_dim, width)
    )


def map_head(tokens: int, width: int, mlp_dim: int) -> float:
    """A MAP head (vit.MAPHead): one probe's q and out projections, k and v of every token,
    its attention over them, and the MLP on the pooled token."""
    projections = 2 * dense(1, width, width) + 2 * dense(tokens, width, width)
    mlp = dense(1, width, mlp_dim) + dense(1, mlp_dim, width)
    return projections + attention(1, tokens, width) + mlp


def vit_features(model: vit.ViT) -> int:
    """Width of the pooled representation (what a head or a CLIP projection reads)."""
    return model.rep_size or model.hparams()["width"]


def vit_forward(model: vit.ViT, image_size: int) -> float:
    """Forward FLOPs of `model` on one image_size x image_size x 3 image: the patch
    embedding, the blocks, the MAP head (pool="map"), the pre-logits layer (rep_size) and
    the classifier head (none with num_classes=0)."""
    hp = model.hparams()
    p, width = hp["patch_size"], hp["width"]
    patches = (image_size // p) ** 2
    tokens = patches + (1 if model.pool == "cls" else 0)
    flops = dense(patches, p * p * 3, width)  # the patch embedding (a stride-p conv)
    flops += hp["depth"] * transformer_layer(tokens, width, hp["mlp_dim"])
    if model.pool == "map":
        flops += map_head(tokens, width, hp["mlp_dim"])
    if model.rep_size:
        flops += dense(1, width, model.rep_size)
    return flops + dense(1, vit_features(model), model.num_classes)  # 0 without a head


def text_forward(model: text.TextTransformer, length: int | None = None) -> float:
    """Forward FLOPs of `model` on one sequence of `length` tokens (default: its context
    length, which is what the contrastive task feeds). The token embedding is a gather."""
    length = model.context_length if length is None else length
    return model.depth * transformer_layer(length, model.width, model.mlp_dim)


def clip_forward(model: clip.CLIP, image_size: int, global_batch: int) -> float:
    """Forward FLOPs of one image-text pair: both towers (a ViT or a ResNet image tower),
    their projections (none for `*_projection="none"`, as SigLIP's image side) and this
    pair's share of the [B, B] logits (2 * B * embed_dim)."""
    image_tower, text_tower = clip.towers(model)
    if isinstance(image_tower, convnets.ResNet):
        image_flops = resnet_forward(image_tower, image_size)
        width_img = resnet_features(image_tower)
    else:
        image_flops = vit_forward(image_tower, image_size)
        width_img = vit_features(image_tower)

    def projection(kind: str, width: int) -> float:
        return 0.0 if kind == "none" else dense(1, width, model.embed_dim)

    return (
        image_flops
        + text_forward(text_tower)
        + projection(model.image_projection, width_img)
        + projection(model.text_projection, text_tower.width)
        + dense(1, model.embed_dim, global_batch)
    )


def fuyu_forward(model: fuyu.FuyuDecoder, seq_len: int) -> float:
    """Forward FLOPs of `model` on one row of `seq_len` tokens. The patch projection runs on
    every position (image or not: the decoder selects afterwards), attention covers the
    whole row (packed segments are masked, not skipped), the head gives logits everywhere."""
    hp = model.hparams()
    width, patch_dim = hp["width"], model.patch_size**2 * model.channels
    return (
        dense(seq_len, patch_dim, width)
        + hp["depth"] * transformer_layer(seq_len, width, hp["mlp_dim"])
        + dense(seq_len, width, model.vocab_size)
    )


def torch_counter_delta(model: clip.CLIP, image_size: int) -> float:
    """What torch's FlopCounterMode adds to `per_example` for one CLIP pair: the backward
    of its fused attention recomputes the scores (+ half of every layer's forward attention
    FLOPs), and it never computes the patch embedding's input gradient, which the 3x rule
    assumes (- one forward of the patch embedding)."""
    image_tower, text_tower = clip.towers(model)
    hp = image_tower.hparams()
    p, width = hp["patch_size"], hp["width"]
    patches = (image_size // p) ** 2
    tokens = patches + (1 if image_tower.pool == "cls" else 0)
    length = text_tower.context_length
    attn = hp["depth"] * attention(tokens, tokens, width)
    attn += text_tower.depth * attention(length, length, text_tower.width)
    return 0.5 * attn - dense(patches, p * p * 3, width)


def resnet_forward(model: convnets.ResNet, image_size: int, count_padding: bool = True) -> float:
    """Forward FLOPs of `model` (ResNet v1.5) on one image (`count_padding`: see `conv`)."""
    kind, stage_sizes = model.architecture()

    def layer(size, kernel, stride, c_in, c_out):
        return conv(size, kernel, stride, kernel // 2, c_in, c_out, count_padding)

    flops, size = layer(image_size, model.stem_kernel, model.stem_stride, 3, model.width)
    if model.stem_pool:
        size = (size + 2 - 3) // 2 + 1  # 3x3/2 max-pool, padding 1
    channels = model.width
    for i, num_blocks in enumerate(stage_sizes, 1):
        f = model.width * 2 ** (i - 1)
        for j in range(1, num_blocks + 1):
            stride = 2 if i > 1 and j == 1 else 1
            if kind == "bottleneck":  # 1x1, 3x3 (strided: v1.5), 1x1 to 4f
                convs = [(1, 1, channels, f), (3, stride, f, f), (1, 1, f, 4 * f)]
            else:
                convs = [(3, stride, channels, f), (3, 1, f, f)]
            out_size = size
            for kernel, s, c_in, c_out in convs:
                layer_flops, out_size = layer(out_size, kernel, s, c_in, c_out)
                flops += layer_flops
            out_channels = convs[-1][-1]
            if channels != out_channels or stride != 1:  # projection shortcut
                flops += layer(size, 1, stride, channels, out_channels)[0]
            size, channels = out_size, out_channels
    return flops + dense(1, channels, model.num_classes)


def resnet_features(model: convnets.ResNet) -> int:
    """Channels of the pooled features (what a head or a CLIP projection reads)."""
    kind, stage_sizes = model.architecture()
    last = model.width * 2 ** (len(stage_sizes) - 1)
    return 4 * last if kind == "bottleneck" else last


def alexnet_forward(model: convnets.AlexNet, image_size: int, count_padding: bool = True) -> float:
    """Forward FLOPs of `model` on one image (`count_padding`: see `conv`). The adaptive pool
    is left out: a no-op at 224, and an average, not a learned product, elsewhere."""
    size, channels, flops = image_size, 3, 0.0
    n = len(model.channels)
    layers = zip(model.channels, model.kernel_sizes, model.strides, model.paddings, strict=True)
    for i, (features, kernel, stride, pad) in enumerate(layers):
        layer_flops, size = conv(size, kernel, stride, pad, channels, features, count_padding)
        flops += layer_flops
        channels = features
        if i in (0, 1, n - 1):  # overlapping max-pools, VALID padding
            size = (size - model.pool_window) // model.pool_stride + 1
    if model.adaptive_pool:
        size = model.adaptive_pool
    flops += dense(1, size * size * channels, model.hidden) + dense(1, model.hidden, model.hidden)
    return flops + dense(1, model.hidden, model.num_classes)


# --- entry points ------------------------------------------------------------------------------

MODELS = {
    "vit": vit.ViT,
    "resnet": convnets.ResNet,
    "alexnet": convnets.AlexNet,
    "clip": clip.CLIP,
    "text": text.TextTransformer,
    "fuyu": fuyu.FuyuDecoder,
}


def model_from_config(config: ml_collections.ConfigDict) -> nn.Module:
    """An unbound module of `config.model_name` with `config.model` as its fields.

    A classifier whose config does not give `model.num_classes` (it then comes from the
    data) gets 0, i.e. no head; pass the built model to `forward_per_example` for its head.
    """
    if config.model_name not in MODELS:
        raise ValueError(f"no FLOPs formula for model_name={config.model_name!r}: {list(MODELS)}")
    cls = MODELS[config.model_name]
    kwargs: dict[str, Any] = dict(config.model.to_dict())
    if "num_classes" in {f for f in cls.__dataclass_fields__} and not kwargs.get("num_classes"):
        kwargs["num_classes"] = 0
    return cls(**kwargs)


def forward_per_example(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> float:
    """Forward FLOPs of one example of `config` (image size `config.data.image_size`, global
    batch `config.batch_size` for the contrastive logits). `model` (the module the task
    built) overrides the one read from `config.model`."""
    model = model_from_config(config) if model is None else model
    size = config.data.image_size
    if isinstance(model, clip.CLIP):
        return clip_forward(model, size, config.batch_size)
    if isinstance(model, vit.ViT):
        return vit_forward(model, size)
    if isinstance(model, text.TextTransformer):
        return text_forward(model)
    if isinstance(model, convnets.ResNet):
        return resnet_forward(model, size)
    if isinstance(model, convnets.AlexNet):
        return alexnet_forward(model, size)
    if isinstance(model, fuyu.FuyuDecoder):
        raise ValueError(
            "a decoder's FLOPs depend on its packing: use fuyu_forward(model, seq_len)"
        )
    raise ValueError(f"no FLOPs formula for {type(model).__name__}")


def per_example(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> float:
    """Training FLOPs (forward + backward) of one example: 3x `forward_per_example`."""
    return TRAIN_FACTOR * forward_per_example(config, model)


def clip_b16_reference() -> ml_collections.ConfigDict:
    """CLIP ViT-B/16 at 224 (12-layer width-512 text tower, context 77, embed 512), batch
    256: the configuration of the torch FlopCounterMode reference (123.8 GFLOP per pair)."""
    c = ml_collections.ConfigDict()
    c.model_name = "clip"
    c.batch_size = 256
    c.data = ml_collections.ConfigDict(dict(image_size=224))
    c.model = ml_collections.ConfigDict(dict(embed_dim=512))
    return c


TORCH_CLIP_B16_GFLOP = 123.8  # torch FlopCounterMode, fwd+bwd, both towers, batch 256


def describe(value: float) -> str:
    """1.238e11 -> '123.8 GFLOP'."""
    if value <= 0:
        return "0 FLOP"
    units = ("", "K", "M", "G", "T", "P")
    i = min(int(math.log10(value) // 3), len(units) - 1)
    return f"{value / 10 ** (3 * i):.1f} {units[i]}FLOP"


def report(config: ml_collections.ConfigDict | None = None) -> str:
    """Training FLOPs of `config` (if given), and ours for CLIP ViT-B/16 against torch's."""
    lines = []
    if config is not None:
        lines.append(
            f"{config.model_name}: {describe(per_example(config))} per example "
            f"(forward+backward; forward {describe(forward_per_example(config))})"
        )
    ref = clip_b16_reference()
    ours = per_example(ref)
    torch_like = ours + torch_counter_delta(model_from_config(ref), 224)
    lines.append(
        f"CLIP ViT-B/16 at 224, batch 256: {ours / 1e9:.2f} GFLOP per image-text pair "
        f"(forward+backward); torch FlopCounterMode gave {TORCH_CLIP_B16_GFLOP} "
        f"({100 * (ours / 1e9 / TORCH_CLIP_B16_GFLOP - 1):+.2f}%); counted as torch does "
        f"(attention backward recomputes the scores, no input gradient for the patch "
        f"embedding): {torch_like / 1e9:.2f} GFLOP"
    )
    return "\n".join(lines)
