"""Fuyu decoder: rotary embedding, packing, the KV cache, scan, and an 8-device step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlmjax import losses
from vlmjax import mesh as mesh_lib
from vlmjax.data import fuyu_layout as fl
from vlmjax.models import fuyu, layers

TINY = dict(vocab_size=64, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4)
SPEC = fl.LayoutSpec(patch_size=4, tokens=fl.Tokens(image=4, newline=5, bos=1, eos=2, boa=3))


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _examples():
    """Three examples of different image sizes (one not a multiple of the patch)."""
    return [
        dict(image=_image(7, 10, 1), prompt=[10, 11], target=[20, 21, 22]),
        dict(image=_image(12, 4, 2), prompt=[12], target=[23]),
        dict(image=_image(4, 8, 3), prompt=[13, 14, 15], target=[24, 25]),
    ]


def _init(model, batch):
    inputs = fuyu.model_inputs({k: jnp.asarray(v) for k, v in batch.items()})
    return nn.meta.unbox(model.init(jax.random.key(0), **inputs))


@pytest.fixture(scope="module")
def tiny():
    model = fuyu.FuyuDecoder(**TINY)
    seqs = [fl.layout(e["image"], e["prompt"], e["target"], SPEC) for e in _examples()]
    return model, _init(model, fl.pack(seqs, seq_len=48))


def test_relu2_and_rotary_embedding():
    x = jnp.linspace(-3.0, 3.0, 13)
    np.testing.assert_allclose(layers.activation_fn("relu2")(x), np.maximum(x, 0) ** 2)

    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 7, 100]])
    got = np.asarray(layers.rotary_embedding(q, positions, theta=100.0, fraction=0.5))
    # Reference: dims (i, i + 2) of the first 4 rotate by position * 100**(-2i/4); the
    # other 4 pass through.
    expected = q.copy()
    for i in range(2):
        angle = positions[0][:, None] * 100.0 ** (-2 * i / 4)  # [l, 1]
        a, b = q[0, :, :, i], q[0, :, :, i + 2]
        expected[0, :, :, i] = a * np.cos(angle) - b * np.sin(angle)
        expected[0, :, :, i + 2] = b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Attention scores depend on relative positions only.
    k = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)

    def score(shift):
        p = positions + shift
        rq = layers.rotary_embedding(q, p, fraction=0.5)
        rk = layers.rotary_embedding(k, p, fraction=0.5)
        return np.einsum("blhd,bmhd->bhlm", rq, rk)

    np.testing.assert_allclose(score(0), score(37), atol=1e-4)
    with pytest.raises(ValueError, match="positive even"):
        layers.rotary_embedding(q, positions, fraction=0.2)  # 1 dim


def test_attention_mask():
    segments = jnp.array([[1, 1, 2, 2, 0]])
    mask = np.asarray(fuyu.attention_mask(segments, segments))[0, 0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],  # padding sees only itself: no row is empty (no NaN)
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)
    # A decode step at slot 3 of a cache whose slot 0 is left padding.
    keys = jnp.array([[0, 1, 1, 1, 0, 0]])
    step = np.asarray(fuyu.attention_mask(jnp.array([[1]]), keys, offset=3))[0, 0]
    np.testing.assert_array_equal(step, [[0, 1, 1, 1, 0, 0]])


def test_shapes_and_parameter_names(tiny):
    model, variables = tiny
    params = variables["params"]
    assert set(params) == {
        "token_embedding",
        "patch_projection",
        "layer_0",
        "layer_1",
        "final_norm",
        "head",
    }
    attn = params["layer_0"]["attn"]
    assert attn["query"]["kernel"].shape == (32, 4, 8)
    assert attn["q_norm"]["scale"].shape == (8,)
    assert params["patch_projection"]["kernel"].shape == (48, 32)
    assert params["head"]["kernel"].shape == (32, 64) and "bias" not in params["head"]
    with pytest.raises(ValueError, match="patches"):
        model.apply(variables, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3, 12)), None)


def _segment_losses(model, variables, batch):
    """{(row, segment): summed target NLL} of a packed batch."""
    logits = jax.jit(model.apply)(variables, **fuyu.model_inputs(batch))
    nll = np.asarray(losses.token_nll(logits, batch["targets"])) * batch["loss_mask"]
    return {
        (r, s): float(nll[r][batch["segment_ids"][r] == s].sum())
        for r in range(nll.shape[0])
        for s in range(1, batch["segment_ids"][r].max() + 1)
    }, np.asarray(logits)


def test_packed_equals_one_at_a_time(tiny):
    model, variables = tiny
    seqs = [fl.layout(e["image"], e["prompt"], e["target"], SPEC) for e in _examples()]
    packed = fl.pack(seqs, seq_len=48, num_rows=1)  # 16 + 11 + 11 real tokens, then padding
    assert fl.efficiency(packed) == pytest.approx(38 / 48)
    packed_losses, packed_logits = _segment_losses(model, variables, packed)
    for i, seq in enumerate(seqs):
        alone = fl.pack([seq], seq_len=48)  # the same shape: one compilation for all
        single_losses, single_logits = _segment_losses(model, variables, alone)
        assert packed_losses[(0, i + 1)] == pytest.approx(single_losses[(0, 1)], rel=1e-5)
        segment = packed["segment_ids"][0] == i + 1
        alone_segment = alone["segment_ids"][0] == 1
        np.testing.assert_allclose(
            packed_logits[0][segment], single_logits[0][alone_segment], atol=1e-5
        )
    assert all(v > 1.0 for v in packed_losses.values())  # real losses, not empty masks
    # The mean loss weights every target token once, wherever it was packed.
    loss, metrics = losses.next_token_loss(
        logits=jnp.asarray(packed_logits),
        targets=jnp.asarray(packed["targets"]),
        loss_mask=jnp.asarray(packed["loss_mask"]),
    )
    assert float(metrics["tokens"]) == 4 + 2 + 3  # targets + their EOS
    assert float(loss) == pytest.approx(sum(packed_losses.values()) / 9, rel=1e-5)


def _as_scanned(variables: dict) -> dict:
    """The unrolled model's variables in nn.scan's layout (layers stacked on axis 0)."""
    params = dict(variables["params"])
    layer_trees = [params.pop(f"layer_{i}") for i in range(TINY["depth"])]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_trees)
    return {"params": params}


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_kv_cache_chunks_equal_full_pass(tiny, scan):
    """Prefill a left-padded prompt, then feed the rest in chunks of 3 and 1 tokens: the
    logits equal one pass over the whole sequence."""
    model = fuyu.FuyuDecoder(**TINY, scan=scan)
    variables = _as_scanned(tiny[1]) if scan else tiny[1]
    full = fl.prompt_batch(_examples()[:2], SPEC)  # [2, P], row 1 padded on the left
    prompt_len = full["tokens"].shape[1]
    extra_tokens = np.array([[20, 21, 22, 2], [23, 30, 31, 32]], np.int32)  # [2, n] after it
    n = extra_tokens.shape[1]
    extra_positions = full["positions"][:, -1:] + 1 + np.arange(n)
    whole = dict(
        tokens=np.concatenate([full["tokens"], extra_tokens], 1),
        patches=np.concatenate([full["patches"], np.zeros((2, n, 48), np.float32)], 1),
        image_mask=np.concatenate([full["image_mask"], np.zeros((2, n), bool)], 1),
        segment_ids=np.concatenate([full["segment_ids"], np.ones((2, n), np.int32)], 1),
        positions=np.concatenate([full["positions"], extra_positions], 1),
    )
    expected = np.asarray(jax.jit(model.apply)(variables, **whole))  # [2, P + n, vocab]

    apply = jax.jit(model.apply)
    cache = fuyu.init_cache(model, 2, prompt_len + n + 2)
    got = []
    bounds = [0, prompt_len, prompt_len + 3, prompt_len + n]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = {k: v[:, start:stop] for k, v in whole.items()}
        logits, cache = apply(variables, **chunk, cache=cache)
        got.append(np.asarray(logits))
    assert int(cache["index"]) == prompt_len + n
    got = np.concatenate(got, 1)
    real = whole["segment_ids"] > 0
    np.testing.assert_allclose(got[real], expected[real], atol=2e-5)


def test_scan_and_remat_equal_loop(tiny):
    model, variables = tiny
    scanned = fuyu.FuyuDecoder(**TINY, scan=True, remat="full")
    params = _as_scanned(variables)["params"]
    seqs = [fl.layout(e["image"], e["prompt"], e["target"], SPEC) for e in _examples()]
    batch = fl.pack(seqs, seq_len=48)
    inputs = fuyu.model_inputs(batch)

    def loss(model, params):
        logits = model.apply({"params": params}, **inputs)
        return losses.next_token_loss(
            logits=logits, targets=batch["targets"], loss_mask=batch["loss_mask"]
        )[0]

    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    ref_loss, ref_grads = grad(model, variables["params"])
    got_loss, got_grads = grad(scanned, params)
    assert float(got_loss) == pytest.approx(float(ref_loss), rel=1e-6)
    ref_grads = _as_scanned({"params": ref_grads})["params"]
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The scanned tree is what the model itself initialises.
    init = jax.eval_shape(lambda: scanned.init(jax.random.key(0), **inputs))
    shapes = jax.tree.map(np.shape, mesh_lib.strip_boxes(init)["params"])
    assert shapes == jax.tree.map(np.shape, params)


def _batch(rows):
    """Six examples first-fit into 4 rows of 24: 16 | 11 + 11 | 16 | 11 + 11 tokens."""
    examples = _examples() * 2
    seqs = [fl.layout(e["image"], e["prompt"], e["target"], SPEC) for e in examples]
    return fl.pack(seqs, seq_len=24, num_rows=rows)


def _train(mesh, batch, host_params, steps=2):
    """Params placed by their logical shardings on `mesh`, then jitted SGD steps;
    returns (losses, params)."""
    model = fuyu.FuyuDecoder(**TINY)
    tx = optax.sgd(0.5, momentum=0.9)
    inputs = fuyu.model_inputs({k: jnp.asarray(v[:1]) for k, v in batch.items()})

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, **fuyu.model_inputs(batch))
        return losses.next_token_loss(
            logits=logits, targets=batch["targets"], loss_mask=batch["loss_mask"]
        )[0]

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
        shardings = mesh_lib.logical_shardings(abstract, mesh)["params"]
        # Placed rather than initialised under jit: the same values on every mesh, and a
        # jitted init of ~40 random tensors takes ~10 s to compile on a busy 2-core CPU.
        params = jax.device_put(jax.tree.map(np.asarray, host_params), shardings)
        opt_state = tx.init(params)
        device_batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
        step = jax.jit(step, donate_argnums=(0, 1))
        curve = []
        for _ in range(steps):
            params, opt_state, loss = step(params, opt_state, device_batch)
            curve.append(float(loss))
    return curve, params


@pytest.fixture(scope="module")
def single_device_run(tiny):
    one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return _train(one, _batch(rows=4), tiny[1]["params"])


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)], ids=["d2-f2-t2", "f2-t4"])
def test_sharded_step_equals_single_device(shape, tiny, single_device_run):
    ref_losses, ref_params = single_device_run
    curve, params = _train(mesh_lib.make_mesh(*shape), _batch(rows=4), tiny[1]["params"])
    np.testing.assert_allclose(curve, ref_losses, rtol=1e-5)
    assert ref_losses[1] < ref_losses[0]  # the step moved the parameters somewhere useful
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # The sharding is real: tensor parallel over heads, MLP and vocab, fsdp over embed.
    P = jax.sharding.PartitionSpec
    layer = params["layer_0"]
    assert layer["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert layer["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert layer["attn"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert params["head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert params["token_embedding"]["embedding"].sharding.spec == P("tensor", "fsdp")
