"""Contrastive losses: reference vs numpy, sharded impls vs reference, chunked and tiled memory."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vlmjax import losses
from vlmjax import mesh as mesh_lib

LOG_SCALE = float(np.log(10.0))


def _embeddings(batch, dim, seed=0, dtype=jnp.float32):
    """Normalised pairs whose texts are noisy copies of the images, so that in-batch
    retrieval accuracy lands strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(batch, dim))
    txt = img + 1.2 * rng.normal(size=(batch, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return jnp.asarray(img, dtype), jnp.asarray(txt, dtype)


def _numpy_clip(zimg, ztxt, log_scale):
    """CLIP's loss as written in the paper's pseudo-code, in float64 numpy."""
    logits = np.exp(log_scale) * np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T

    def xent_diag(m):  # rows of m are logits, targets on the diagonal
        m = m - m.max(axis=1, keepdims=True)
        logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return 0.5 * (xent_diag(logits) + xent_diag(logits.T))


def test_softmax_reference_matches_numpy():
    zimg, ztxt = _embeddings(32, 16)
    loss, metrics = losses.contrastive_loss_reference(
        zimg, ztxt, jnp.float32(LOG_SCALE), kind="softmax"
    )
    np.testing.assert_allclose(loss, _numpy_clip(zimg, ztxt, LOG_SCALE), rtol=1e-6)
    assert metrics["loss"] == loss
    logits = np.asarray(zimg) @ np.asarray(ztxt).T
    np.testing.assert_allclose(metrics["i2t_accuracy"], np.mean(logits.argmax(1) == np.arange(32)))
    np.testing.assert_allclose(metrics["t2i_accuracy"], np.mean(logits.argmax(0) == np.arange(32)))


def test_sigmoid_reference_matches_numpy():
    zimg, ztxt = _embeddings(32, 16)
    loss, _ = losses.contrastive_loss_reference(
        zimg, ztxt, jnp.float32(LOG_SCALE), jnp.float32(-3.0), kind="sigmoid"
    )
    logits = np.exp(LOG_SCALE) * np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T - 3.0
    labels = 2 * np.eye(32) - 1
    expected = np.sum(np.log1p(np.exp(-labels * logits))) / 32
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def _loss_and_grads(fn, *args):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))(*args)


@pytest.mark.parametrize("shape,batch", [((8, 1), 32), ((2, 4), 56)], ids=["data8", "data2fsdp4"])
@pytest.mark.parametrize("kind", losses.KINDS)
@pytest.mark.parametrize("impl", losses.IMPLS)
def test_sharded_matches_reference(shape, batch, kind, impl):
    mesh = mesh_lib.make_mesh(*shape)
    zimg, ztxt = _embeddings(batch, 16, seed=batch)
    log_scale, bias = jnp.float32(LOG_SCALE), jnp.float32(-2.0)

    def reference(*a):
        return losses.contrastive_loss_reference(*a, kind=kind)

    def sharded(*a):
        return losses.contrastive_loss(*a, kind=kind, impl=impl, mesh=mesh)

    (ref_loss, ref_metrics), ref_grads = _loss_and_grads(reference, zimg, ztxt, log_scale, bias)
    with jax.set_mesh(mesh):
        batch_sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
        zimg_s, ztxt_s = jax.device_put((zimg, ztxt), batch_sharding)
        (loss, metrics), grads = _loss_and_grads(sharded, zimg_s, ztxt_s, log_scale, bias)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert set(metrics) == set(ref_metrics)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
    if kind == "softmax":
        assert 0.0 < ref_metrics["i2t_accuracy"] < 1.0  # the comparison is not trivial
    for name, g, ref in zip(("zimg", "ztxt", "log_scale", "bias"), grads, ref_grads, strict=True):
        assert g.shape == ref.shape and g.dtype == ref.dtype, name
        # float32 sums over the B x B pairs, in another order than the reference: a few ulp
        scale = max(float(jnp.max(jnp.abs(ref))), 1.0)
        np.testing.assert_allclose(g, ref, rtol=0, atol=3e-6 * scale, err_msg=name)
    if kind == "softmax":  # a scalar bias cancels in the softmax
        assert abs(float(grads[3])) < 1e-6


@pytest.mark.parametrize("impl", losses.IMPLS)
def test_bfloat16_inputs_and_no_bias(impl):
    mesh = mesh_lib.make_mesh(8)
    zimg, ztxt = _embeddings(32, 16, dtype=jnp.bfloat16)
    for kind in losses.KINDS:
        ref, _ = losses.contrastive_loss_reference(zimg, ztxt, jnp.float32(LOG_SCALE), kind=kind)
        with jax.set_mesh(mesh):
            fn = jax.jit(
                lambda a, b, k=kind: losses.contrastive_loss(
                    a, b, LOG_SCALE, kind=k, impl=impl, mesh=mesh
                )
            )
            loss, _ = fn(zimg, ztxt)
        assert loss.dtype == jnp.float32
        np.testing.assert_allclose(loss, ref, rtol=1e-5, err_msg=kind)


def test_errors():
    mesh = mesh_lib.make_mesh(2, 4)
    zimg, ztxt = _embeddings(12, 4)
    with pytest.raises(ValueError, match=r"kind='clip'.*softmax.*sigmoid"):
        losses.contrastive_loss_reference(zimg, ztxt, 0.0, kind="clip")
    with pytest.raises(ValueError, match=r"impl='ring'.*all_gather.*chunked"):
        losses.contrastive_loss(zimg, ztxt, 0.0, kind="softmax", impl="ring", mesh=mesh)
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by the 8 devices"):
        losses.contrastive_loss(zimg, ztxt, 0.0, kind="sigmoid", impl="chunked", mesh=mesh)
    # Fine along one axis: 12 rows over data=2 only.
    with jax.set_mesh(mesh):
        loss, _ = jax.jit(
            lambda a, b: losses.contrastive_loss(
                a, b, 0.0, kind="softmax", impl="chunked", mesh=mesh, axes=("data",)
            )
        )(zimg, ztxt)
    ref, _ = losses.contrastive_loss_reference(zimg, ztxt, jnp.float32(0.0), kind="softmax")
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_chunked_uses_less_memory(kind):
    """Per-device temporaries of loss + gradients at B=4096, d=64 on 8 devices (b=512):
    all_gather builds [b, B] logits, chunked only [b, b] blocks."""
    mesh = mesh_lib.make_mesh(8)
    batch, dim = 4096, 64
    rows = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
    temp = {}
    with jax.set_mesh(mesh):
        for impl in losses.IMPLS:

            def fn(*a, impl=impl):
                return losses.contrastive_loss(*a, kind=kind, impl=impl, mesh=mesh)

            grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))
            compiled = grad_fn.lower(emb, emb, scalar, scalar).compile()
            temp[impl] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = (batch // 8) * batch * 4  # one [b, B] float32 matrix
    msg = f"{kind} temp bytes: {temp}, one [b, B] float32 logits matrix = {logits_bytes}"
    assert temp["all_gather"] >= logits_bytes, msg
    assert temp["chunked"] * 4 < temp["all_gather"], msg
    assert temp["chunked"] < logits_bytes / 2, msg


@pytest.mark.parametrize("kind", losses.KINDS)
def test_ring_is_unrolled_on_cpu(kind, monkeypatch):
    """XLA:CPU lets a while loop's collectives overlap the program's other collectives
    (a hang or abort under load), so on CPU the compiled chunked loss + gradients hold no
    loop. The rolled ring (GPU/TPU) gives the same loss; only the sigmoid forward pass is
    run rolled here, since its single loop feeds its only psum and so cannot overlap."""
    mesh = mesh_lib.make_mesh(8)
    rows = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    zimg, ztxt = (jax.device_put(z, rows) for z in _embeddings(64, 8, seed=3))
    scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-3.0)

    def fn(*a, kind=kind):
        return losses.contrastive_loss(*a, kind=kind, impl="chunked", mesh=mesh)[0]

    assert losses._ring_unrolled(mesh)
    hlo = (
        jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
        .lower(zimg, ztxt, scale, bias)
        .compile()
        .as_text()
    )
    assert " while(" not in hlo and "collective-permute" in hlo
    if kind == "sigmoid":
        unrolled = jax.jit(fn)(zimg, ztxt, scale, bias)
        monkeypatch.setattr(losses, "_ring_unrolled", lambda mesh: False)
        rolled_fn = jax.jit(lambda *a: fn(*a))
        assert " while(" in rolled_fn.lower(zimg, ztxt, scale, bias).compile().as_text()
        np.testing.assert_allclose(rolled_fn(zimg, ztxt, scale, bias), unrolled, rtol=1e-6)


@pytest.mark.parametrize("tile", [1, 2, 3, 7, 100], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("kind", losses.KINDS)
def test_tiled_matches_reference(kind, tile):
    """7 rows per device (56 over data=2 x fsdp=4): tiles of 1 and 7 divide them, 2 and 3
    leave a shorter last tile (1 column), 100 is one tile of 7 (the chunked ring)."""
    mesh = mesh_lib.make_mesh(2, 4)
    zimg, ztxt = _embeddings(56, 16, seed=5)
    log_scale, bias = jnp.float32(LOG_SCALE), jnp.float32(-2.0)

    def reference(*a):
        return losses.contrastive_loss_reference(*a, kind=kind)

    def tiled(*a):
        return losses.contrastive_loss(*a, kind=kind, impl="tiled", mesh=mesh, tile=tile)

    (ref_loss, ref_metrics), ref_grads = _loss_and_grads(reference, zimg, ztxt, log_scale, bias)
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
        zimg_s, ztxt_s = jax.device_put((zimg, ztxt), rows)
        (loss, metrics), grads = _loss_and_grads(tiled, zimg_s, ztxt_s, log_scale, bias)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
    for name, g, ref in zip(("zimg", "ztxt", "log_scale", "bias"), grads, ref_grads, strict=True):
        scale = max(float(jnp.max(jnp.abs(ref))), 1.0)
        np.testing.assert_allclose(g, ref, rtol=0, atol=3e-6 * scale, err_msg=name)


def test_tiled_errors():
    mesh = mesh_lib.make_mesh(8)
    zimg, ztxt = _embeddings(16, 4)
    for tile in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"tile=.* must be a positive int"):
            losses.contrastive_loss(
                zimg, ztxt, 0.0, kind="softmax", impl="tiled", mesh=mesh, tile=tile
            )
    # The tile is only read by impl="tiled" (eval_shape: traced, not run).
    jax.eval_shape(
        lambda a, b: losses.contrastive_loss(
            a, b, 0.0, kind="softmax", impl="chunked", mesh=mesh, tile=0
        ),
        zimg,
        ztxt,
    )


def _compiled_loss_and_grads(kind, impl, mesh, batch, dim, **options):
    rows = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)

    def fn(*a):
        return losses.contrastive_loss(*a, kind=kind, impl=impl, mesh=mesh, **options)[0]

    with jax.set_mesh(mesh):
        grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
        return grad_fn.lower(emb, emb, scalar, scalar).compile()


@pytest.mark.parametrize("kind", losses.KINDS)
def test_tiled_holds_no_block(kind):
    """B = 4096, d = 64 on 8 devices (b = 512), tiles of 32: no array of the compiled loss +
    gradients has more elements than [b, max(tile, d)] (the chunked ring's [b, b] blocks
    are gone), temp memory is under half the chunked ring's, and every collective runs in
    the unrolled ring's straight-line code, none inside the tiles' loops (XLA:CPU hazard)."""
    mesh = mesh_lib.make_mesh(8)
    b, dim, tile = 512, 64, 32
    tiled = _compiled_loss_and_grads(kind, "tiled", mesh, 8 * b, dim, tile=tile)
    chunked = _compiled_loss_and_grads(kind, "chunked", mesh, 8 * b, dim)
    hlo = tiled.as_text()
    sizes = [
        math.prod(int(s) for s in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)
    ]
    assert max(sizes) <= b * max(tile, dim), max(sizes)
    assert any(f"f32[{b},{b}]" in line for line in chunked.as_text().splitlines())
    temp = {
        name: c.memory_analysis().temp_size_in_bytes
        for name, c in (("tiled", tiled), ("chunked", chunked))
    }
    assert temp["tiled"] < temp["chunked"] / 2, temp
    assert " while(" in hlo  # the tiles' loops
    computations = hlo.split("\n\n")
    with_collectives = [c for c in computations if "collective-permute" in c or "all-reduce" in c]
    assert with_collectives and all(c.lstrip().startswith("ENTRY") for c in with_collectives)
