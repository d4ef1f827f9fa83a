"""ResNet and AlexNet: shapes, parameter counts, BatchNorm behaviour, LRN, and a sharded step."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlmjax import config as config_lib
from vlmjax import mesh as mesh_lib
from vlmjax import tasks, train
from vlmjax.data import pipeline
from vlmjax.models import convnets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A ResNet-18-style net small enough for 32x32 images and CPU tests.
TINY_RESNET = dict(
    depth=18, stage_sizes=(1, 1), width=8, stem_kernel=3, stem_stride=1, stem_pool=False
)
TINY_ALEXNET = dict(
    channels=(8, 16, 16, 16, 8),
    kernel_sizes=(3,) * 5,
    strides=(1,) * 5,
    paddings=(1,) * 5,
    hidden=32,
    adaptive_pool=3,
)


def _images(batch=4, size=32, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _num_params(model, size=224):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, size, size, 3)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def _init(model, x):
    """Variables (unboxed) of `model` for input `x`.

    With an "rbg" key: XLA compiles threefry slowly on CPU (8.4 s against 1.4 s measured for
    the tiny ResNet's init), and these tests need some random weights, not particular ones.
    """
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), x))


# Each net is initialised once per module: compiling init dominates these tests on CPU.
@pytest.fixture(scope="module")
def resnet():
    model = convnets.ResNet(num_classes=6, **TINY_RESNET)
    return model, _init(model, _images(1))


@pytest.fixture(scope="module")
def bottleneck():
    """Bottleneck blocks behind the full stem (7x7/2 conv, 3x3/2 pool); 64x64 inputs."""
    model = convnets.ResNet(num_classes=3, depth=50, stage_sizes=(1, 1), width=4)
    return model, _init(model, _images(1, 64))


@pytest.fixture(scope="module")
def alexnet():
    model = convnets.AlexNet(num_classes=6, **TINY_ALEXNET)
    return model, _init(model, _images(1))


@pytest.mark.parametrize(
    "model, count",
    [
        (convnets.ResNet(depth=50), 25_557_032),
        (convnets.ResNet(depth=18), 11_689_512),
        (convnets.AlexNet(), 61_100_840),
    ],
    ids=["resnet50", "resnet18", "alexnet"],
)
def test_parameter_counts_match_torchvision(model, count):
    """224x224, 1000 classes: the counts torchvision reports for these architectures."""
    assert _num_params(model) == count


def test_shapes_and_names(resnet, bottleneck, alexnet):
    x = _images(2)
    model, variables = resnet
    logits = model.apply(variables, x)
    assert logits.shape == (2, 6) and logits.dtype == jnp.float32
    params = variables["params"]
    assert sorted(params) == ["bn_init", "conv_init", "head", "stage1_block1", "stage2_block1"]
    assert sorted(params["stage2_block1"]) == [
        "bn1",
        "bn2",
        "conv1",
        "conv2",
        "proj_bn",
        "proj_conv",
    ]
    assert params["stage2_block1"]["conv1"]["kernel"].shape == (3, 3, 8, 16)
    assert sorted(variables["batch_stats"]["bn_init"]) == ["mean", "var"]
    assert "bias" not in params["conv_init"]
    assert convnets.ResNet(num_classes=0, **TINY_RESNET).apply(variables, x).shape == (2, 16)

    model, variables = bottleneck
    assert model.apply(variables, _images(1, 64)).shape == (1, 3)
    block = variables["params"]["stage2_block1"]
    assert sorted(block) == ["bn1", "bn2", "bn3", "conv1", "conv2", "conv3", "proj_bn", "proj_conv"]
    assert block["conv3"]["kernel"].shape == (1, 1, 8, 32)  # 4x expansion

    model, variables = alexnet
    assert model.apply(variables, x).shape == (2, 6)
    assert variables["params"]["fc1"]["kernel"].shape == (3 * 3 * 8, 32)  # 32 -> 15 -> 7 -> 3
    assert sorted(variables["params"]) == [
        "conv1",
        "conv2",
        "conv3",
        "conv4",
        "conv5",
        "fc1",
        "fc2",
        "head",
    ]
    # LRN only when asked for; dropout only in training (and then it needs its rng).
    eval_logits = model.apply(variables, x)
    lrn = convnets.AlexNet(num_classes=6, lrn=True, **TINY_ALEXNET).apply(variables, x)
    assert np.abs(lrn - eval_logits).max() > 0
    dropped = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert np.abs(dropped - eval_logits).max() > 0
    with pytest.raises(ValueError, match="smaller than pool_window"):
        jax.eval_shape(convnets.AlexNet(num_classes=6).init, jax.random.key(0), x)


def test_logical_axis_names():
    model = convnets.ResNet(num_classes=6, **TINY_RESNET)
    boxed = jax.eval_shape(model.init, jax.random.key(0), _images(1))
    specs = nn.get_partition_spec(boxed)
    p = specs["params"]
    assert p["conv_init"]["kernel"] == jax.sharding.PartitionSpec(*convnets.CONV_AXES)
    assert p["bn_init"]["scale"] == jax.sharding.PartitionSpec("conv_out")
    assert p["head"]["kernel"] == jax.sharding.PartitionSpec("embed", "classes")
    assert specs["batch_stats"]["bn_init"]["mean"] == jax.sharding.PartitionSpec()


def test_batch_norm_train_and_eval(resnet):
    model, variables = resnet
    x = _images(4)
    _, state = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    # Stem statistics: momentum 0.9 from the initial (mean 0, var 1), biased batch variance.
    h = np.asarray(state["intermediates"]["conv_init"]["__call__"][0], np.float64)
    stats = state["batch_stats"]["bn_init"]
    np.testing.assert_allclose(stats["mean"], 0.1 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var((0, 1, 2)), rtol=1e-4)
    assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])

    # Eval: running averages, so an example's logits do not depend on the rest of the batch
    # (they do in train mode), and they move when the statistics move.
    trained = {"params": variables["params"], "batch_stats": state["batch_stats"]}
    full = model.apply(trained, x)
    np.testing.assert_allclose(model.apply(trained, x[:1]), full[:1], atol=1e-5)
    train_full = model.apply(trained, x, train=True, mutable=["batch_stats"])[0]
    train_one = model.apply(trained, x[:1], train=True, mutable=["batch_stats"])[0]
    assert np.abs(train_full[:1] - train_one).max() > 1e-3
    assert np.abs(model.apply(variables, x) - full).max() > 1e-3


@pytest.mark.parametrize("net", ["resnet", "bottleneck"])
def test_zero_init_last_bn_makes_blocks_identity(net, request):
    """At init each block returns relu(shortcut): its input, or its projection (1x1 conv
    with stride s == every s-th pixel times a matrix; eval BN with mean 0, var 1)."""
    model, variables = request.getfixturevalue(net)
    x = _images(2, 64 if net == "bottleneck" else 32)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    acts = state["intermediates"]
    stem = jax.nn.relu(acts["bn_init"]["__call__"][0])
    if model.stem_pool:
        stem = nn.max_pool(stem, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    inputs = {"stage1_block1": stem, "stage2_block1": acts["stage1_block1"]["__call__"][0]}
    projected = 0
    for name, block_in in inputs.items():
        params = variables["params"][name]
        last = "bn3" if "bn3" in params else "bn2"
        assert not np.any(params[last]["scale"])
        shortcut = block_in
        if "proj_conv" in params:
            s = 2 if name == "stage2_block1" else 1
            kernel = params["proj_conv"]["kernel"][0, 0]  # [c_in, c_out]
            shortcut = block_in[:, ::s, ::s] @ kernel / np.sqrt(1 + 1e-5)
            shortcut = shortcut * params["proj_bn"]["scale"] + params["proj_bn"]["bias"]
            projected += 1
        out = acts[name]["__call__"][0]
        assert np.abs(out).max() > 0
        np.testing.assert_allclose(out, jax.nn.relu(shortcut), atol=1e-5)
    assert projected == (2 if net == "bottleneck" else 1)


def test_zero_init_last_bn_can_be_turned_off():
    block = convnets.ResidualBlock(8, kind="basic", zero_init_last_bn=False)
    assert np.all(_init(block, jnp.ones((1, 4, 4, 8)))["params"]["bn2"]["scale"] == 1)


@pytest.mark.parametrize(
    "size, alpha, beta, k",
    [(5, 1e-4, 0.75, 2.0), (5, 0.5, 0.75, 1.0), (4, 0.5, 1.0, 1.0)],
    ids=["paper", "strong", "even-size"],
)
def test_local_response_norm_matches_numpy(size, alpha, beta, k):
    """The paper's constants barely move x; the strong ones make a wrong window obvious."""
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 3, 3, 7))) * 10
    expected = np.empty_like(x)
    for i in range(x.shape[-1]):
        # channels i - size//2 .. i + (size-1)//2, clipped to [0, c)
        window = x[..., max(0, i - size // 2) : i + (size - 1) // 2 + 1]
        expected[..., i] = x[..., i] / (k + alpha * (window**2).sum(-1)) ** beta
    got = convnets.local_response_norm(x, size=size, alpha=alpha, beta=beta, k=k)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("n, size", [(6, 6), (13, 6), (12, 6), (3, 6), (7, 1)])
def test_adaptive_avg_pool_matches_torch_windows(n, size):
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, n, n + 1, 4)))
    expected = np.empty((2, size, size, 4), np.float32)
    for i in range(size):
        for j in range(size):
            h0, h1 = (i * n) // size, -(-((i + 1) * n) // size)
            w0, w1 = (j * (n + 1)) // size, -(-((j + 1) * (n + 1)) // size)
            expected[:, i, j] = x[:, h0:h1, w0:w1].mean((1, 2))
    np.testing.assert_allclose(convnets.adaptive_avg_pool(x, size), expected, atol=1e-6)


def _config():
    """experiments/shapes_vit.py:tiny with the tiny ResNet as its model."""
    config = config_lib.load(os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny")
    with config.unlocked():
        config.model_name = "resnet"
        config.model = ml_collections.ConfigDict(TINY_RESNET)
        config.batch_size = 16
        config.optimizer.warmup_steps = 0
    return config


def _run_steps(config, mesh, batches, initial=None):
    """The jitted train step on `mesh` over `batches`, from `initial` (a host TrainState) or
    from init. Returns (host state before, host state after, losses, device state after)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        run = train.setup(config, tasks.build(config), mesh)
        if initial is None:
            state = run.init_fn(jax.random.PRNGKey(config.seed))
            initial = jax.device_get(state)
        else:
            # One init, placed onto each mesh: compiling init costs more than the step here
            # (sharded init itself is covered by tests/test_train.py).
            state = jax.device_put(initial, run.shardings)
        losses = []
        for host_batch in batches:
            state, metrics = run.train_step(
                state, pipeline.to_global(host_batch, run.batch_sharding)
            )
            losses.append(float(metrics["train/loss"]))
        return initial, jax.device_get(state), losses, state


def test_sharded_resnet_step_equals_single_device():
    """8 devices (data=8; data=2, fsdp=2, tensor=2) == 1 device, batch_stats included: the
    BatchNorm statistics are over the global batch (2 examples per device here, so
    per-device statistics would be far off)."""
    config = _config()
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 6, (16,)).astype(np.int32),
        }
        for _ in range(2)
    ]
    one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    initial, ref, ref_losses, _ = _run_steps(config, one, batches)
    assert set(ref.model_state) == {"batch_stats"}
    for shape in [(8, 1, 1), (2, 2, 2)]:
        _, got, losses, state = _run_steps(config, mesh_lib.make_mesh(*shape), batches, initial)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
        for tree in ("params", "model_state"):
            a_leaves, b_leaves = (
                jax.tree.leaves(getattr(got, tree)),
                jax.tree.leaves(getattr(ref, tree)),
            )
            for a, b in zip(a_leaves, b_leaves, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-5)
        # The sharding is real: [3, 3, 16, 16] split over in (fsdp) and out (tensor).
        kernel = state.params["stage2_block1"]["conv2"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")
        assert kernel.addressable_shards[0].data.shape == (3, 3, 16 // shape[1], 16 // shape[2])
    # Training moved the statistics away from their initial (0, 1).
    assert np.abs(ref.model_state["batch_stats"]["bn_init"]["mean"]).max() > 1e-3
