"""Convolutional classifiers: ResNet v1.5 (He et al., 2016) and AlexNet (Krizhevsky et al., 2012).

Both take float images [b, H, W, 3] (already normalised) and return float32 logits
[b, num_classes]. Convolutions pad symmetrically, as torch does: Flax's "SAME" pads a strided
convolution asymmetrically (more at the end), which would shift every strided feature map by
a pixel against a converted torch checkpoint. Kernels are HWIO ([kh, kw, in, out]).

BatchNorm statistics: a plain `nn.BatchNorm` without `axis_name` reduces over the array it
is given. Under `jax.jit` that is the global batch even when the batch is sharded over
devices (XLA inserts the all-reduce), so training on 8 devices equals training on 1;
`axis_name` is only for `pmap`/`shard_map`. Flax's momentum 0.9 is torch's momentum 0.1. One
difference from torch remains: Flax updates the running variance with the biased batch
variance, torch with the unbiased one (a factor n/(n-1), n = examples x pixels).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.models import layers

# depth -> (block kind, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}  # block output channels / stage width

CONV_AXES = (None, None, "conv_in", "conv_out")
# He normal over fan-out, as torchvision initialises ResNet convolutions.
RESNET_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# He normal over fan-in for AlexNet's ReLU layers (the paper's N(0, 0.01) needs its
# hand-tuned learning rate schedule to get going).
HE_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _pad(kernel: int, padding: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric spatial padding; torch's `padding=kernel // 2` unless given."""
    p = kernel // 2 if padding is None else padding
    return ((p, p), (p, p))


def _resnet_conv(
    features: int, kernel: int, strides: int, dtype: layers.Dtype, name: str
) -> nn.Conv:
    # No bias: a BatchNorm follows every ResNet convolution.
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=_pad(kernel),
        use_bias=False,
        dtype=dtype,
        kernel_init=layers.partitioned(RESNET_CONV_INIT, CONV_AXES),
        name=name,
    )


def _batch_norm(
    train: bool,
    momentum: float,
    eps: float,
    dtype: layers.Dtype,
    name: str,
    zero_scale: bool = False,
) -> nn.BatchNorm:
    """Params `scale`, `bias`; batch_stats `mean`, `var`. Batch statistics in train mode,
    running averages in eval mode."""
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=eps,
        dtype=dtype,
        scale_init=layers.partitioned(scale_init, ("conv_out",)),
        bias_init=layers.partitioned(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


class ResidualBlock(nn.Module):
    """[b, h, w, c] -> [b, h/strides, w/strides, features * EXPANSION[kind]].

    "basic": conv1 3x3 (strides), conv2 3x3. "bottleneck": conv1 1x1, conv2 3x3 (strides:
    v1.5 strides here, v1 on conv1), conv3 1x1 to 4x channels. Each conv is followed by its
    bn; a 1x1 `proj_conv` + `proj_bn` shortcut when the shape changes.
    """

    features: int
    strides: int = 1
    kind: str = "bottleneck"
    zero_init_last_bn: bool = True
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        f, s = self.features, self.strides
        if self.kind == "bottleneck":
            convs = [(f, 1, 1), (f, 3, s), (4 * f, 1, 1)]  # (features, kernel, strides)
        elif self.kind == "basic":
            convs = [(f, 3, s), (f, 3, 1)]
        else:
            raise ValueError(f"block kind {self.kind!r} must be 'basic' or 'bottleneck'")

        def norm(name: str, zero_scale: bool = False) -> nn.BatchNorm:
            return _batch_norm(train, self.bn_momentum, self.bn_eps, self.dtype, name, zero_scale)

        y = x
        for i, (features, kernel, strides) in enumerate(convs, 1):
            y = _resnet_conv(features, kernel, strides, self.dtype, f"conv{i}")(y)
            last = i == len(convs)
            # A zero last scale makes the block start as the identity on its shortcut
            # (Goyal et al., 2017), which helps large-batch training.
            y = norm(f"bn{i}", zero_scale=last and self.zero_init_last_bn)(y)
            if not last:
                y = nn.relu(y)
        out_features = convs[-1][0]
        shortcut = x
        if x.shape[-1] != out_features or s != 1:
            shortcut = _resnet_conv(out_features, 1, s, self.dtype, "proj_conv")(x)
            shortcut = norm("proj_bn")(shortcut)
        return nn.relu(shortcut + y)


class ResNet(nn.Module):
    """ResNet v1.5: images [b, H, W, 3] -> logits [b, num_classes] float32.

    Stem `conv_init` (stem_kernel, stem_stride) + `bn_init` + ReLU (+ 3x3/2 max-pool), then
    stages `stage{i}_block{j}` of width `width * 2**(i-1)` (stride 2 in the first block of
    every stage after the first), global average pool and Dense `head`. `depth` picks
    (block, stage_sizes) from DEPTHS; `block`/`stage_sizes` override it (tiny variants).
    With `num_classes=0` it returns the pooled features [b, width * 2**(stages-1) * expansion].
    """

    num_classes: int = 1000
    depth: int = 50
    width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True
    zero_init_last_bn: bool = True
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: str = "float32"
    stage_sizes: tuple[int, ...] | None = None
    block: str | None = None
    head_zero_init: bool = False

    def architecture(self) -> tuple[str, tuple[int, ...]]:
        """(block kind, blocks per stage) after applying the overrides."""
        if self.depth not in DEPTHS and (self.block is None or self.stage_sizes is None):
            raise ValueError(
                f"depth={self.depth} is not one of {sorted(DEPTHS)}; "
                f"choose one or set both block and stage_sizes"
            )
        kind, stage_sizes = DEPTHS.get(self.depth, (None, None))
        kind = self.block or kind
        if kind not in EXPANSION:
            raise ValueError(f"block={kind!r} must be one of {sorted(EXPANSION)}")
        return kind, tuple(self.stage_sizes or stage_sizes)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"ResNet expects images [batch, height, width, 3], got {images.shape}")
        kind, stage_sizes = self.architecture()
        dtype = jnp.dtype(self.dtype)
        x = _resnet_conv(self.width, self.stem_kernel, self.stem_stride, dtype, "conv_init")(
            images.astype(dtype)
        )  # [b, H/s, W/s, width]
        x = _batch_norm(train, self.bn_momentum, self.bn_eps, dtype, "bn_init")(x)
        x = nn.relu(x)
        if self.stem_pool:
            # As torch's MaxPool2d(3, 2, padding=1): reduce_window pads with -inf.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        for i, num_blocks in enumerate(stage_sizes, 1):
            for j in range(1, num_blocks + 1):
                x = ResidualBlock(
                    self.width * 2 ** (i - 1),
                    strides=2 if i > 1 and j == 1 else 1,
                    kind=kind,
                    zero_init_last_bn=self.zero_init_last_bn,
                    bn_momentum=self.bn_momentum,
                    bn_eps=self.bn_eps,
                    dtype=dtype,
                    name=f"stage{i}_block{j}",
                )(x, train)
                # Keep activations split over the batch between blocks (data parallel).
                x = nn.with_logical_constraint(x, ("batch", None, None, None))
        pooled = x.astype(jnp.float32).mean(axis=(1, 2))  # [b, c]
        if not self.num_classes:
            return pooled
        head_init = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
        logits = layers.classifier_head(self.num_classes, dtype, head_init)(pooled)
        return logits.astype(jnp.float32)  # [b, num_classes]


def local_response_norm(
    x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> jax.Array:
    """Across-channel LRN of the AlexNet paper (section 3.3); [b, h, w, c] -> same shape.

    out[..., i] = x[..., i] / (k + alpha * sum_{j=i-size//2}^{i+(size-1)//2} x[..., j]**2)**beta,
    channels outside [0, c) counting as zero. The paper's alpha multiplies the sum; torch's
    LocalResponseNorm and Caffe divide alpha by `size` (their alpha=5e-4 is this 1e-4).
    """
    squares = jnp.square(x.astype(jnp.float32))
    sums = jax.lax.reduce_window(
        squares,
        0.0,
        jax.lax.add,
        window_dimensions=(1, 1, 1, size),
        window_strides=(1, 1, 1, 1),
        padding=((0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2)),
    )  # [b, h, w, c] windowed sums over channels
    return (x / (k + alpha * sums) ** beta).astype(x.dtype)


def _adaptive_weights(n: int, size: int) -> np.ndarray:
    """[size, n] averaging matrix; row i covers floor(i*n/size) .. ceil((i+1)*n/size) - 1."""
    w = np.zeros((size, n), np.float32)
    for i in range(size):
        lo, hi = (i * n) // size, -(-((i + 1) * n) // size)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch's adaptive_avg_pool2d: [b, H, W, c] -> [b, size, size, c].

    Any H, W: windows overlap when size does not divide H, and cells repeat when H < size.
    """
    if x.shape[1:3] == (size, size):
        return x  # the usual case at 224x224, and exact
    rows = jnp.asarray(_adaptive_weights(x.shape[1], size), x.dtype)  # [size, H]
    cols = jnp.asarray(_adaptive_weights(x.shape[2], size), x.dtype)  # [size, W]
    return jnp.einsum(
        "ih,bhwc,jw->bijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST
    )  # [b, size, size, c]


class AlexNet(nn.Module):
    """AlexNet with torchvision's channel counts: images [b, H, W, 3] -> logits float32.

    conv1..convN (kernel_sizes, strides, symmetric paddings), ReLU each; `lrn` after conv1
    and conv2 (as in the paper); max-pool pool_window/pool_stride after conv1, conv2 and the
    last conv; adaptive average pool to `adaptive_pool` x `adaptive_pool` (0: keep the map);
    flatten; dropout, `fc1` (hidden), ReLU, dropout, `fc2` (hidden), ReLU, `head`.

    At 224x224 the map before the adaptive pool is 6x6. The defaults shrink 32x32 inputs to
    nothing; for them use e.g. kernel_sizes=(3,)*5, strides=(1,)*5, paddings=(1,)*5 (map
    3x3 at the end) and adaptive_pool=1 or 3. The flatten is [h, w, c]-ordered (torch: [c, h,
    w]); a checkpoint converter must permute fc1's input rows.
    """

    num_classes: int = 1000
    channels: tuple[int, ...] = (64, 192, 384, 256, 256)
    kernel_sizes: tuple[int, ...] = (11, 5, 3, 3, 3)
    strides: tuple[int, ...] = (4, 1, 1, 1, 1)
    paddings: tuple[int, ...] = (2, 2, 1, 1, 1)
    pool_window: int = 3
    pool_stride: int = 2
    hidden: int = 4096
    dropout: float = 0.5
    lrn: bool = False
    adaptive_pool: int = 6
    dtype: str = "float32"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        n = len(self.channels)
        if n < 3 or not len(self.kernel_sizes) == len(self.strides) == len(self.paddings) == n:
            raise ValueError(
                f"AlexNet needs >= 3 convs and one kernel size, stride and padding per conv: "
                f"channels={self.channels}, kernel_sizes={self.kernel_sizes}, "
                f"strides={self.strides}, paddings={self.paddings}"
            )
        dtype = jnp.dtype(self.dtype)
        x = images.astype(dtype)
        convs = zip(self.channels, self.kernel_sizes, self.strides, self.paddings, strict=True)
        for i, (features, kernel, strides, padding) in enumerate(convs):
            x = nn.Conv(
                features,
                (kernel, kernel),
                strides=(strides, strides),
                padding=_pad(kernel, padding),
                dtype=dtype,
                kernel_init=layers.partitioned(HE_INIT, CONV_AXES),
                bias_init=layers.partitioned(nn.initializers.zeros, ("conv_out",)),
                name=f"conv{i + 1}",
            )(x)
            x = nn.relu(x)
            if self.lrn and i < 2:
                x = local_response_norm(x)
            if i in (0, 1, n - 1):
                if min(x.shape[1:3]) < self.pool_window:
                    raise ValueError(
                        f"the map after conv{i + 1} is {x.shape[1]}x{x.shape[2]}, smaller than "
                        f"pool_window={self.pool_window}: the input {images.shape[1:3]} is too "
                        f"small for these kernel_sizes/strides (see the AlexNet docstring)"
                    )
                # Overlapping pooling (window 3 > stride 2), section 3.4 of the paper.
                window, stride = (self.pool_window,) * 2, (self.pool_stride,) * 2
                x = nn.max_pool(x, window, strides=stride)
            x = nn.with_logical_constraint(x, ("batch", None, None, None))
        if self.adaptive_pool:
            x = adaptive_avg_pool(x, self.adaptive_pool)
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # [b, h * w * c]
        for name, names in (("fc1", ("embed", "mlp")), ("fc2", ("mlp", "embed"))):
            x = nn.Dropout(self.dropout)(x, deterministic=not train)
            x = nn.Dense(
                self.hidden,
                dtype=dtype,
                kernel_init=layers.partitioned(HE_INIT, names),
                bias_init=layers.partitioned(nn.initializers.zeros, names[1:]),
                name=name,
            )(x)  # [b, hidden]
            x = nn.relu(x)
        logits = layers.classifier_head(self.num_classes, dtype, nn.initializers.lecun_normal())(x)
        return logits.astype(jnp.float32)  # [b, num_classes]
