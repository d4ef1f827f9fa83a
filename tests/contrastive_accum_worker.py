"""A tiny CLIP and its contrastive-accumulation step, shared by tests/test_contrastive_accum.py
and, as a script, one of the processes of its multi-process test:

    python tests/contrastive_accum_worker.py PORT NUM_PROCESSES PROCESS_ID OUT.npz

(each process with the CPU devices XLA_FLAGS gives it) writes, from process 0, the loss and
gradients of `step` on `fake_batch()` over all processes' devices.
"""

import os
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vlmjax import contrastive_accum
from vlmjax import mesh as mesh_lib
from vlmjax.models import clip

BATCH, IMAGE, LENGTH, VOCAB = 32, 16, 8, 40


def tiny_clip(kind: str) -> clip.CLIP:
    """ViT 16 px, patch 8, width 32, 2 layers; text 8 tokens, 1 layer; embeddings of 16."""
    vision = dict(
        variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, pool="gap",
        pre_norm=False, activation="gelu", eps=1e-6,
    )  # fmt: skip
    text = dict(
        vocab_size=VOCAB, context_length=LENGTH, width=32, depth=1, mlp_dim=64, num_heads=2,
        eos_id=1, pad_id=0,
    )  # fmt: skip
    bias = dict(sigmoid_bias=-3.0, init_temperature=0.3) if kind == "sigmoid" else {}
    return clip.CLIP(embed_dim=16, vision=vision, text=text, **bias)


def fake_batch(batch_size: int = BATCH, seed: int = 0) -> dict[str, np.ndarray]:
    """Normalised float images [B, 16, 16, 3] and token rows [B, 8] ending in EOS (id 1)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, (batch_size, LENGTH)).astype(np.int32)
    tokens[np.arange(batch_size), rng.integers(2, LENGTH, batch_size)] = 1
    image = rng.standard_normal((batch_size, IMAGE, IMAGE, 3)).astype(np.float32)
    return {"image": image, "tokens": tokens}


def init_params(model: nn.Module, mesh):
    """Parameters of `model` (seed 0), sharded by their logical axes (FSDP over `fsdp`)."""
    inputs = (np.zeros((1, IMAGE, IMAGE, 3), np.float32), np.zeros((1, LENGTH), np.int32))

    def init(rng):
        return model.init(rng, *inputs)["params"]

    with nn.logical_axis_rules(mesh_lib.RULES):
        shardings = mesh_lib.logical_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
        return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
            jax.random.PRNGKey(0)
        )


def step(model, mesh, *, kind, impl, k, tile=3):
    """Jitted (params, batch) -> (loss, metrics, grads) of the full-batch loss, k micro-batches."""
    embed_fn, loss_fn = contrastive_accum.two_tower_fns(
        model, kind=kind, impl=impl, mesh=mesh, tile=tile
    )

    def fn(params, batch):
        loss, metrics, grads, _ = contrastive_accum.accumulated_value_and_grad(
            embed_fn, loss_fn, params, {}, batch, jax.random.PRNGKey(1), k, mesh
        )
        return loss, metrics, grads

    return jax.jit(fn)


def main(port: str, processes: str, process_id: str, out: str) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", int(processes), int(process_id))
    mesh = mesh_lib.make_mesh(2, jax.device_count() // 2)  # data=2 x fsdp, across processes
    rows = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    host = fake_batch()
    per_process = BATCH // jax.process_count()
    start = jax.process_index() * per_process
    batch = {
        k: jax.make_array_from_process_local_data(rows, v[start : start + per_process])
        for k, v in host.items()
    }
    results = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        for kind, impl in (("softmax", "chunked"),):
            model = tiny_clip(kind)
            params = init_params(model, mesh)
            loss, _, grads = step(model, mesh, kind=kind, impl=impl, k=2)(params, batch)
            replicated = NamedSharding(mesh, PartitionSpec())
            loss, grads = jax.jit(lambda t: t, out_shardings=replicated)((loss, grads))
            flat = jax.tree_util.tree_flatten_with_path(grads)[0]
            results[f"{kind}/loss"] = np.asarray(loss.addressable_data(0))
            for path, g in flat:
                results[f"{kind}/{jax.tree_util.keystr(path)}"] = np.asarray(g.addressable_data(0))
    if jax.process_index() == 0:
        np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(*sys.argv[1:])
