"""Analytic FLOPs (vlmjax/flops.py) against XLA's cost analysis and a published figure.

XLA's `cost_analysis()["flops"]` counts products at 2 FLOPs per multiply-add, as we do, plus
the elementwise work we leave out (norms, softmax, activations, adds). So on the small
models below XLA is a little above the analytic count, never below:

  forward          1.00 <= XLA / analytic <= 1.03 for transformers (quick_gelu: exact GELU's
                   erf alone adds ~5% at these widths), <= 1.05 for convnets (BatchNorm);
  value_and_grad   the same bounds against 3x forward minus the first layer's forward (the
                   input gradient nobody asks for is never computed).

Convolutions are compared with `count_padding=False`, as XLA counts only the window taps
inside the image. Models are unscanned: XLA counts a while loop's body once.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from vlmjax import config as config_lib
from vlmjax import flops, losses, mfu
from vlmjax.models import clip, convnets, fuyu, text, vit

TRANSFORMER_TOLERANCE = 0.03
CONVNET_TOLERANCE = 0.05


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]  # a list before jax 0.4.36


def forward_and_train_flops(model, inputs, loss=None, mutable=()):
    """XLA's (forward, value_and_grad) FLOPs per example of `model` on abstract `inputs`."""
    variables = nn.meta.unbox(
        jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), *inputs)
    )
    params = variables["params"]
    others = {k: v for k, v in variables.items() if k != "params"}

    def forward(params, others, *x):
        kwargs = dict(train=True, mutable=list(mutable)) if mutable else {}
        out = model.apply({"params": params, **others}, *x, **kwargs)
        return out[0] if mutable else out

    def loss_fn(params, others, *x):
        out = forward(params, others, *x)
        return loss(out) if loss else jnp.sum(jnp.square(out))

    batch = inputs[0].shape[0]
    fwd = xla_flops(forward, params, others, *inputs) / batch
    train = xla_flops(jax.value_and_grad(loss_fn), params, others, *inputs) / batch
    return fwd, train


def assert_close(xla: float, analytic: float, tolerance: float) -> None:
    assert 1.0 <= xla / analytic <= 1.0 + tolerance, (xla, analytic, xla / analytic)


IMAGES = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
TOKENS = jax.ShapeDtypeStruct((2, 32), jnp.int32)
SMALL = dict(width=128, depth=1, mlp_dim=512, num_heads=4)


def test_vit_matches_xla():
    model = vit.ViT(num_classes=10, patch_size=4, activation="quick_gelu", **{**SMALL, "depth": 2})
    fwd, train = forward_and_train_flops(model, (IMAGES,))
    analytic = flops.vit_forward(model, 32)
    # By hand: 64 patches of 4x4x3 + cls = 65 tokens; per layer q, k, v, out, scores, values
    # and the MLP; the 10-class head.
    patch_embed = 2 * 64 * 48 * 128
    layer = 4 * 2 * 65 * 128 * 128 + 2 * 2 * 65 * 65 * 128 + 2 * 2 * 65 * 128 * 512
    assert analytic == patch_embed + 2 * layer + 2 * 128 * 10 == 56_233_472
    assert_close(fwd, analytic, TRANSFORMER_TOLERANCE)
    assert_close(train, 3 * analytic - patch_embed, TRANSFORMER_TOLERANCE)


def test_text_tower_matches_xla():
    model = text.TextTransformer(vocab_size=100, context_length=32, **SMALL)
    fwd, train = forward_and_train_flops(model, (TOKENS,))
    analytic = flops.text_forward(model)
    assert_close(fwd, analytic, TRANSFORMER_TOLERANCE)
    assert_close(train, 3 * analytic, TRANSFORMER_TOLERANCE)  # a gather comes first


def test_clip_matches_xla_with_its_loss():
    vision = dict(variant=None, patch_size=4, **SMALL)
    model = clip.CLIP(
        embed_dim=64, vision=vision, text=dict(vocab_size=100, context_length=32, **SMALL)
    )

    def loss(out):
        value, _ = losses.contrastive_loss_reference(
            out["zimg"], out["ztxt"], out["log_scale"], kind="softmax"
        )
        return value

    fwd, train = forward_and_train_flops(model, (IMAGES, TOKENS), loss=loss)
    analytic = flops.clip_forward(model, 32, global_batch=2)
    assert_close(fwd, analytic, TRANSFORMER_TOLERANCE)
    assert_close(train, 3 * analytic - flops.dense(64, 48, 128), TRANSFORMER_TOLERANCE)


def test_siglip_shaped_clip_and_a_pre_logits_vit_match_xla():
    """SigLIP's layout: a MAP-pooled image tower with no projection after it, a text tower
    pooled at its final token with a biased projection; and a ViT with a pre-logits layer."""
    model = clip.CLIP(
        embed_dim=128, image_projection="none", text_projection="linear_bias", sigmoid_bias=-10.0,
        vision=dict(variant=None, patch_size=4, pool="map", **SMALL),
        text=dict(vocab_size=100, context_length=32, causal=False, pool="final", **SMALL),
    )  # fmt: skip

    def loss(out):
        return losses.contrastive_loss_reference(
            out["zimg"], out["ztxt"], out["log_scale"], kind="sigmoid", bias=out["bias"]
        )[0]

    fwd, _ = forward_and_train_flops(model, (IMAGES, TOKENS), loss=loss)
    analytic = flops.clip_forward(model, 32, global_batch=2)
    tower, _ = clip.towers(model)
    # The MAP head by hand: the probe's q and out, k and v of 64 tokens, one query's
    # attention over them, the MLP.
    head = 2 * 2 * 128 * 128 + 2 * 2 * 64 * 128 * 128 + 2 * 2 * 64 * 128 + 2 * 2 * 128 * 512
    assert flops.map_head(64, 128, 512) == head
    assert flops.vit_forward(tower, 32) == flops.vit_forward(tower.clone(pool="gap"), 32) + head
    assert_close(fwd, analytic, TRANSFORMER_TOLERANCE)

    pre_logits = vit.ViT(
        num_classes=10, patch_size=4, rep_size=64, activation="quick_gelu", **SMALL
    )
    fwd, _ = forward_and_train_flops(pre_logits, (IMAGES,))
    plain = flops.vit_forward(pre_logits.clone(rep_size=0, num_classes=0), 32)
    assert flops.vit_forward(pre_logits, 32) == plain + 2 * 128 * 64 + 2 * 64 * 10
    assert_close(fwd, flops.vit_forward(pre_logits, 32), TRANSFORMER_TOLERANCE)


def test_clip_with_a_resnet_tower_matches_xla():
    """shapes_clip.py:resnet's tower: the formula counts the ResNet, not a ViT."""
    model = clip.CLIP(
        embed_dim=64, image_model="resnet", vision=dict(SHAPES_RESNET),
        text=dict(vocab_size=100, context_length=32, **SMALL),
    )  # fmt: skip

    def loss(out):
        return losses.contrastive_loss_reference(
            out["zimg"], out["ztxt"], out["log_scale"], kind="softmax"
        )[0]

    fwd, _ = forward_and_train_flops(model, (IMAGES, TOKENS), loss=loss, mutable=("batch_stats",))
    analytic = flops.clip_forward(model, 32, global_batch=2)
    tower = convnets.ResNet(**SHAPES_RESNET, num_classes=0)
    assert analytic > flops.resnet_forward(tower, 32) > 0
    assert flops.resnet_features(tower) == 128
    assert_close(
        fwd,
        flops.clip_forward(model, 32, 2)
        - flops.resnet_forward(tower, 32)
        + flops.resnet_forward(tower, 32, count_padding=False),
        CONVNET_TOLERANCE,
    )


def test_fuyu_decoder_matches_xla():
    model = fuyu.FuyuDecoder(
        vocab_size=64, width=128, depth=2, mlp_dim=512, num_heads=4, patch_size=8
    )
    length = 48
    inputs = (
        jax.ShapeDtypeStruct((2, length), jnp.int32),
        jax.ShapeDtypeStruct((2, length, 8 * 8 * 3), jnp.float32),
        jax.ShapeDtypeStruct((2, length), jnp.bool_),
    )
    fwd, _ = forward_and_train_flops(model, inputs)
    assert_close(fwd, flops.fuyu_forward(model, length), TRANSFORMER_TOLERANCE)


# experiments/shapes_resnet.py's network: basic blocks, 3x3 stride-1 stem, no max-pool.
SHAPES_RESNET = dict(
    block="basic", stage_sizes=(1, 1, 1, 1), width=16, stem_kernel=3, stem_stride=1,
    stem_pool=False,
)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,size",
    [
        (SHAPES_RESNET, 32),
        (dict(depth=18, width=16), 64),  # 7x7/2 stem, max-pool, projection shortcuts
        # bottleneck blocks (narrower ones drown in BatchNorm's elementwise FLOPs)
        (dict(block="bottleneck", stage_sizes=(1, 1, 1, 1), width=64), 32),
    ],
)
def test_resnet_matches_xla(kwargs, size):
    model = convnets.ResNet(num_classes=10, **kwargs)
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    fwd, train = forward_and_train_flops(model, (images,), mutable=("batch_stats",))
    analytic = flops.resnet_forward(model, size, count_padding=False)
    k, s = model.stem_kernel, model.stem_stride
    stem, _ = flops.conv(size, k, s, k // 2, 3, model.width, count_padding=False)
    assert_close(fwd, analytic, CONVNET_TOLERANCE)
    assert_close(train, 3 * analytic - stem, CONVNET_TOLERANCE)
    # The usual convention (padding taps counted) is larger, never smaller.
    assert flops.resnet_forward(model, size) > analytic


def test_alexnet_matches_xla():
    model = convnets.AlexNet(
        num_classes=10, channels=(32, 64, 96, 64, 64), kernel_sizes=(5, 3, 3, 3, 3),
        strides=(1,) * 5, paddings=(2, 1, 1, 1, 1), adaptive_pool=3, hidden=256, dropout=0.0,
    )  # fmt: skip
    fwd, train = forward_and_train_flops(model, (IMAGES,))
    analytic = flops.alexnet_forward(model, 32, count_padding=False)
    conv1, _ = flops.conv(32, 5, 1, 2, 3, 32, count_padding=False)
    assert_close(fwd, analytic, CONVNET_TOLERANCE)
    assert_close(train, 3 * analytic - conv1, CONVNET_TOLERANCE)


def test_alexnet_224_counts_the_usual_figure():
    # torchvision's AlexNet: 0.71 GMACs (its model card) = 1.43 GFLOP forward.
    assert flops.alexnet_forward(convnets.AlexNet(num_classes=1000), 224) == pytest.approx(
        1.43e9, rel=0.01
    )


def test_clip_b16_against_torch_flop_counter():
    config = flops.clip_b16_reference()
    ours = flops.per_example(config)
    assert ours == pytest.approx(123.26e9, rel=1e-4)
    # ViT-B/16 alone: 17.56 GMACs forward, the figure usually quoted (~17.6).
    image_tower, _ = clip.towers(flops.model_from_config(config))
    assert flops.vit_forward(image_tower, 224) == pytest.approx(2 * 17.56e9, rel=1e-3)
    # Counted as torch does, ours lands on torch's 123.8 GFLOP.
    torch_like = ours + flops.torch_counter_delta(flops.model_from_config(config), 224)
    assert torch_like / 1e9 == pytest.approx(flops.TORCH_CLIP_B16_GFLOP, rel=5e-4)


def test_clip_logits_grow_with_the_global_batch():
    config = flops.clip_b16_reference()
    small = flops.per_example(config)
    with config.unlocked():
        config.batch_size = 512
    # 3 x (2 * B * E) per example: 256 more columns of 512-dim dot products.
    assert flops.per_example(config) - small == pytest.approx(3 * 2 * 256 * 512)


def test_per_example_from_an_experiment_config():
    config = config_lib.load("experiments/shapes_vit.py:tiny")
    model = vit.ViT(**config.model.to_dict(), num_classes=6)
    head = flops.dense(1, 64, 6)
    no_head = flops.per_example(config)  # num_classes comes from the data: no head counted
    assert flops.per_example(config, model) == pytest.approx(no_head + 3 * head)
    # 16 patches of 8x8x3, 2 layers of width 64, MLP 128, GAP (16 tokens).
    layer = 2 * 16 * (4 * 64 * 64 + 2 * 64 * 128) + 4 * 16 * 16 * 64
    assert no_head == pytest.approx(3 * (2 * 16 * 192 * 64 + 2 * layer))


def test_train_flops_summary_and_peaks():
    summary = mfu.train_flops_summary(1e11, 2000.0, 2, "NVIDIA H100 80GB HBM3", 800.0)
    assert summary["train/tflops_per_device"] == pytest.approx(100.0)
    assert summary["train/mfu"] == pytest.approx(100.0 / 989.0)
    assert summary["train/mfu_measured"] == pytest.approx(0.125)
    assert set(mfu.train_flops_summary(1e11, 2000.0, 2, "cpu")) == {"train/tflops_per_device"}
    assert mfu.peak_tflops("NVIDIA H200") == 989.0
    assert mfu.peak_tflops("TPU v5 lite") == 197.0
    assert mfu.peak_tflops("cpu") is None
    assert all(v > 0 for v in mfu.PEAK_BF16_TFLOPS.values())


def test_conv_padding_taps():
    # 3x3, stride 1, pad 1 on 4x4: per axis 2 + 3 + 3 + 2 = 10 taps inside of 12.
    full, out = flops.conv(4, 3, 1, 1, 1, 1)
    inside, _ = flops.conv(4, 3, 1, 1, 1, 1, count_padding=False)
    assert out == 4 and full == 2 * 12 * 12 and inside == 2 * 10 * 10
    assert math.isclose(flops.conv(8, 1, 2, 0, 4, 8)[0], 2 * 16 * 4 * 8)
