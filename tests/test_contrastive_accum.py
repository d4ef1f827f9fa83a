"""Full-batch contrastive accumulation: k micro-batches give the k=1 loss and gradients."""

import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contrastive_accum_worker import fake_batch, init_params, step, tiny_clip
from jax.sharding import NamedSharding, PartitionSpec

from vlmjax import contrastive_accum, losses
from vlmjax import mesh as mesh_lib

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "contrastive_accum_worker.py")


def _assert_trees_close(got, want, rtol=2e-5, msg=""):
    """Leaf by leaf, to float32 rounding relative to the leaf's largest entry (at least
    1e-3 of the largest gradient: some leaves, e.g. attention key biases, are ~0 in exact
    arithmetic and hold only rounding noise)."""
    flat_got = jax.tree_util.tree_flatten_with_path(jax.device_get(got))[0]
    flat_want = jax.tree.leaves(jax.device_get(want))
    assert len(flat_got) == len(flat_want)
    largest = max(float(np.max(np.abs(w))) for w in flat_want)
    for (path, g), w in zip(flat_got, flat_want, strict=True):
        scale = max(float(np.max(np.abs(w))), 1e-3 * largest)
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, err_msg=f"{msg} {path}")


def _batch(mesh, batch_size=32):
    rows = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    return {k: jax.device_put(v, rows) for k, v in fake_batch(batch_size).items()}


def test_microbatches_keep_rows_on_their_device():
    mesh = mesh_lib.make_mesh(2, 4)
    x = jax.device_put(
        jnp.arange(32.0 * 3).reshape(32, 3), NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    )
    with jax.set_mesh(mesh):
        micro = jax.jit(lambda t: contrastive_accum.split_microbatches(t, 4, mesh))(x)
        back = jax.jit(lambda t: contrastive_accum.merge_microbatches(t, mesh))(micro)
    np.testing.assert_array_equal(micro[1], np.asarray(x)[1::4])
    np.testing.assert_array_equal(back, x)
    # Device d's shard of micro-batch i holds rows of device d's own block.
    for shard in micro.addressable_shards:
        rows = np.asarray(shard.data)[0, :, 0] / 3
        device = (x.sharding.devices_indices_map(x.shape)[shard.device][0].start) // 4
        assert np.all(rows // 4 == device), (rows, device)
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        contrastive_accum.split_microbatches(x, 3)


def _outputs(model, params, batch):
    o = model.apply({"params": params}, batch["image"], batch["tokens"], train=True)
    return o["zimg"], o["ztxt"], o["log_scale"], o["bias"]


@pytest.mark.parametrize(
    "kind, impl, shape, ks",
    # Each loss implementation once, both kinds, three meshes (the losses themselves are
    # checked against the reference for every kind x implementation in test_losses.py).
    [
        ("softmax", "chunked", (2, 4), (2, 4)),
        ("sigmoid", "all_gather", (8, 1), (4,)),
        ("sigmoid", "tiled", (1, 8), (2,)),  # tile 3 of 2 rows per device and micro-batch
    ],
)
def test_accumulated_equals_full_batch(kind, impl, shape, ks):
    """k micro-batches of a ViT + text CLIP on 8 devices (data and fsdp): the same loss,
    metrics and gradients as one full-batch step (the k=1 path, plain value_and_grad)."""
    mesh = mesh_lib.make_mesh(*shape)
    model = tiny_clip(kind)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        params, batch = init_params(model, mesh), _batch(mesh)
        ref_loss, ref_metrics, ref_grads = step(model, mesh, kind=kind, impl=impl, k=1)(
            params, batch
        )
        for k in ks:
            loss, metrics, grads = step(model, mesh, kind=kind, impl=impl, k=k)(params, batch)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=f"k={k}")
            assert set(metrics) == set(ref_metrics)
            for name in metrics:
                np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-6)
            _assert_trees_close(grads, ref_grads, msg=f"k={k}")


def test_full_batch_is_the_reference_loss_not_an_average_of_smaller_ones():
    """The k=1 step is the single-device reference loss and gradients; averaging the losses
    of two halves (what plain accumulation optimises) is another number."""
    mesh = mesh_lib.make_mesh(2, 4)
    model = tiny_clip("softmax")
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        params, batch = init_params(model, mesh), _batch(mesh)
        loss, _, grads = step(model, mesh, kind="softmax", impl="all_gather", k=2)(params, batch)
    params, host = jax.device_get(params), fake_batch()

    def reference(p, b):
        return losses.contrastive_loss_reference(*_outputs(model, p, b), kind="softmax")[0]

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params, host)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _assert_trees_close(grads, ref_grads, rtol=1e-4)
    halves = [jax.jit(reference)(params, {k: v[i::2] for k, v in host.items()}) for i in (0, 1)]
    assert abs(float(np.mean(halves)) - float(ref_loss)) > 0.05, (halves, ref_loss)


def test_resnet_tower_sees_microbatches():
    """BatchNorm normalises each micro-batch by its own statistics (documented): the k=2
    loss is the full-batch loss of embeddings computed micro-batch by micro-batch, and the
    running statistics are updated once per micro-batch. Here with mesh=None (the enclosing
    jax.set_mesh's), as a task built before the mesh would call it."""
    resnet = dict(
        stage_sizes=(1, 1), width=8, block="basic", stem_kernel=3, stem_stride=1,
        stem_pool=False,
    )  # fmt: skip
    model = tiny_clip("softmax").clone(image_model="resnet", vision=resnet)
    host = fake_batch()
    mesh = mesh_lib.make_mesh(8)
    inputs = (np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 8), np.int32))
    variables = model.init(jax.random.PRNGKey(0), *inputs)
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    embed_fn, loss_fn = contrastive_accum.two_tower_fns(model, kind="softmax", impl="chunked")

    def accumulated(params, state, batch):
        out = contrastive_accum.accumulated_value_and_grad(
            embed_fn, loss_fn, params, state, batch, jax.random.PRNGKey(1), 2
        )
        return out[0], out[3]

    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        loss, new_state = jax.jit(accumulated)(params, state, _batch(mesh))

    @jax.jit
    def half(rows, state):
        variables = {"params": params, **state}
        return model.apply(variables, *rows, train=True, mutable=["batch_stats"])

    first, state1 = half((host["image"][0::2], host["tokens"][0::2]), state)
    second, state2 = half((host["image"][1::2], host["tokens"][1::2]), state1)
    zimg = np.stack([first["zimg"], second["zimg"]], 1).reshape(32, -1)  # rows 0, 1, 2, ...
    ztxt = np.stack([first["ztxt"], second["ztxt"]], 1).reshape(32, -1)
    ref, _ = losses.contrastive_loss_reference(zimg, ztxt, first["log_scale"], kind="softmax")
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    _assert_trees_close(new_state, state2, rtol=1e-5)


def test_accumulation_memory_follows_the_microbatch():
    """Temp memory of a step at B = 256 (32 rows per device): the activations of B/k."""
    mesh = mesh_lib.make_mesh(8)
    model = tiny_clip("softmax")
    temp = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        params, batch = init_params(model, mesh), _batch(mesh, 256)
        for k in (1, 4):
            compiled = (
                step(model, mesh, kind="softmax", impl="chunked", k=k)
                .lower(params, batch)
                .compile()
            )
            temp[k] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[4] < 0.4 * temp[1], temp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """2 processes x 4 CPU devices (gloo), k = 2, softmax chunked: the loss and gradients of
    the full-batch k = 1 step on 1 process x 8 devices (the same mesh, data=2 x fsdp=4)."""
    out = str(tmp_path / "grads.npz")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, port, "2", str(i), out],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    two = np.load(out)

    mesh = mesh_lib.make_mesh(2, 4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        batch = _batch(mesh)
        for kind, impl in (("softmax", "chunked"),):  # the ring crosses the processes
            model = tiny_clip(kind)
            params = init_params(model, mesh)
            loss, _, grads = step(model, mesh, kind=kind, impl=impl, k=1)(params, batch)
            np.testing.assert_allclose(two[f"{kind}/loss"], loss, rtol=1e-6)
            flat = jax.tree_util.tree_flatten_with_path(jax.device_get(grads))[0]
            assert len(flat) == sum(name.startswith(f"{kind}/[") for name in two.files)
            got = [two[f"{kind}/{jax.tree_util.keystr(path)}"] for path, _ in flat]
            _assert_trees_close(got, [g for _, g in flat], msg=kind)
