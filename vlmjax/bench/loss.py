"""`vlmjax bench loss`: memory and time of the contrastive loss implementations, then a CLIP
train step with the full-batch loss accumulated over micro-batches."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vlmjax import contrastive_accum, losses
from vlmjax import mesh as mesh_lib
from vlmjax.bench.common import GIB, available_ram, markdown_table, timed_runs
from vlmjax.models import clip


def loss_case(
    kind: str,
    impl: str,
    global_batch: int,
    embed_dim: int,
    mesh: jax.sharding.Mesh,
    *,
    repeats: int = 3,
    max_seconds: float = 60.0,
    ram_fraction: float = 0.5,
    tile: int = losses.DEFAULT_TILE,
) -> dict[str, Any]:
    """Compiles forward+backward of `losses.contrastive_loss` (`tile`: impl="tiled"'s
    columns per tile) on embeddings float32
    [global_batch, embed_dim] sharded over `mesh`; times it (`repeats` runs, 0 for none)
    unless the estimated total (per-device temp + argument + output bytes, times devices)
    exceeds `ram_fraction` of the available RAM (the simulated devices share this host's).

    Returns kind, impl, batch, temp_bytes (per device), total_bytes (estimate, all devices),
    fits (within the RAM budget), step_s and runs (None and 0 when not timed).
    """
    sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    scalar = NamedSharding(mesh, PartitionSpec())

    def loss(zimg, ztxt, log_scale, bias):
        value, _ = losses.contrastive_loss(
            zimg, ztxt, log_scale, bias, kind=kind, impl=impl, mesh=mesh, tile=tile
        )
        return value

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    z = jax.ShapeDtypeStruct((global_batch, embed_dim), jnp.float32, sharding=sharding)
    s = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)
    compiled = step.lower(z, z, s, s).compile()
    mem = compiled.memory_analysis()
    per_device = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    result = dict(
        kind=kind,
        impl=impl,
        batch=global_batch,
        temp_bytes=int(mem.temp_size_in_bytes),
        total_bytes=int(per_device * mesh.size),
        step_s=None,
        runs=0,
    )
    result["fits"] = result["total_bytes"] <= ram_fraction * available_ram()
    if not result["fits"] or repeats < 1:
        return result
    rng = np.random.default_rng(0)

    def unit_rows():  # L2-normalised rows, as the model produces
        x = rng.standard_normal((global_batch, embed_dim), np.float32)
        return jax.device_put(x / np.linalg.norm(x, axis=1, keepdims=True), sharding)

    args = (unit_rows(), unit_rows(), jnp.float32(np.log(10.0)), jnp.float32(-10.0))
    result["step_s"], result["runs"] = timed_runs(
        lambda: jax.block_until_ready(compiled(*args)), repeats, max_seconds
    )
    return result


def bench_loss(
    batch_sizes: Sequence[int] = (16384, 65536), embed_dim: int = 512, **options
) -> list[dict[str, Any]]:
    """`loss_case(..., **options)` for every kind x impl x batch size on the CPU devices;
    prints the table and, per kind and batch, tiled's memory against all_gather's and its
    time against chunked's."""
    devices = jax.devices("cpu")
    mesh = mesh_lib.make_mesh(devices=devices)
    rows, results = [], []
    for batch in batch_sizes:
        for kind in losses.KINDS:
            for impl in losses.IMPLS:
                r = loss_case(kind, impl, batch, embed_dim, mesh, **options)
                results.append(r)
                if r["step_s"] is not None:
                    timing = f"{1e3 * r['step_s']:.0f} (median of {r['runs']})"
                elif not r["fits"]:
                    timing = f"not timed (would need {r['total_bytes'] / GIB:.1f} GiB)"
                else:
                    timing = "not timed (--repeats 0)"
                rows.append([kind, impl, batch, f"{r['temp_bytes'] / 2**20:.1f}", timing])
                print(f"  {kind} {impl} B={batch}: {timing}", file=sys.stderr, flush=True)
    print(
        f"contrastive loss, forward+backward, embed dim {embed_dim}, float32, "
        f"{len(devices)} {devices[0].platform} devices (jax {jax.__version__})\n"
    )
    headers = ["loss", "impl", "global batch", "temp MiB / device", "step ms"]
    print(markdown_table(headers, rows))
    by = {(r["kind"], r["impl"], r["batch"]): r for r in results}
    for batch in batch_sizes:
        for kind in losses.KINDS:
            tiled = by[kind, "tiled", batch]
            line = f"{kind} B={batch}: tiled temp = 1/"
            line += f"{by[kind, 'all_gather', batch]['temp_bytes'] / tiled['temp_bytes']:.1f}"
            line += " of all_gather's"
            if tiled["step_s"] and by[kind, "chunked", batch]["step_s"]:
                ratio = tiled["step_s"] / by[kind, "chunked", batch]["step_s"]
                line += f", tiled time = {ratio:.2f} x chunked's"
            print(line)
    return results


# --- CLIP train step with full-batch contrastive accumulation ---------------------------------


def small_clip(kind: str = "softmax", vocab_size: int = 64) -> clip.CLIP:
    """shapes_clip's towers: ViT 32 px, patch 8, width 128, 4 layers; text of 16 tokens,
    width 128, 2 layers; embeddings of 128."""
    vision = dict(
        variant=None, width=128, depth=4, mlp_dim=256, num_heads=4, patch_size=8, pool="gap",
        pre_norm=False, activation="gelu", eps=1e-6,
    )  # fmt: skip
    text_cfg = dict(
        vocab_size=vocab_size, context_length=16, width=128, depth=2, mlp_dim=256, num_heads=4,
        eos_id=1, pad_id=0,
    )  # fmt: skip
    bias = dict(sigmoid_bias=-10.0, init_temperature=0.1) if kind == "sigmoid" else {}
    return clip.CLIP(embed_dim=128, vision=vision, text=text_cfg, **bias)


def accum_case(
    ks: Sequence[int] = (1, 2, 4),
    global_batch: int = 1024,
    *,
    kind: str = "softmax",
    impl: str = "chunked",
    tile: int = losses.DEFAULT_TILE,
    steps: int = 3,
    mesh: jax.sharding.Mesh | None = None,
    model: clip.CLIP | None = None,
    image_size: int = 32,
) -> list[dict[str, Any]]:
    """A CLIP train step (`small_clip`, AdamW) at `global_batch` with the full-batch loss
    accumulated over k micro-batches (`contrastive_accum`), for each k in `ks`: temp bytes
    per device (compiled memory analysis), mean step seconds over `steps` (after one
    warm-up; 0: not timed), and grad_diff, the largest |g_k - g_1| over the parameters
    relative to the largest |g_1| (same params and batch). `model` (default `small_clip`)
    takes images of `image_size` and its text tower's context length of tokens, EOS id 1.

    Returns one dict per k: k, batch, temp_bytes, step_s, grad_diff.
    """
    mesh = mesh or mesh_lib.make_mesh()
    model = model or small_clip(kind)
    rows = NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    rng = np.random.default_rng(0)
    length, vocab = model.text["context_length"], model.text["vocab_size"]
    tokens = rng.integers(2, vocab, (global_batch, length)).astype(np.int32)
    tokens[:, -1] = 1  # EOS
    image = rng.standard_normal((global_batch, image_size, image_size, 3)).astype(np.float32)
    host = {"image": image, "tokens": tokens}
    embed_fn, loss_fn = contrastive_accum.two_tower_fns(
        model, kind=kind, impl=impl, mesh=mesh, tile=tile
    )
    tx = optax.adamw(1e-4, weight_decay=0.05)
    results, ref_grads = [], None
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        inputs = (jnp.zeros((1, image_size, image_size, 3)), jnp.zeros((1, length), jnp.int32))
        boxed = jax.eval_shape(lambda r: model.init(r, *inputs)["params"], jax.random.PRNGKey(0))
        shardings = mesh_lib.logical_shardings(boxed, mesh)
        params = jax.jit(
            lambda r: nn.meta.unbox(model.init(r, *inputs)["params"]), out_shardings=shardings
        )(jax.random.PRNGKey(0))
        batch = {k: jax.device_put(v, rows) for k, v in host.items()}
        for k in ks:

            def grads_fn(params, batch, k=k):
                out = contrastive_accum.accumulated_value_and_grad(
                    embed_fn, loss_fn, params, {}, batch, jax.random.PRNGKey(1), k, mesh
                )
                return out[0], out[2]

            def train_step(params, opt_state, batch, grads_fn=grads_fn):
                loss, grads = grads_fn(params, batch)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            _, grads = jax.jit(grads_fn)(params, batch)
            grads = jax.device_get(grads)
            ref_grads = ref_grads or grads
            largest = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
            diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), grads, ref_grads)
            step = jax.jit(train_step, donate_argnums=(0, 1))
            state = (jax.tree.map(jnp.copy, params), jax.jit(tx.init)(params))
            compiled = step.lower(*state, batch).compile()
            r = dict(k=k, batch=global_batch, step_s=None, grad_diff=max(jax.tree.leaves(diffs)))
            r["grad_diff"] /= largest
            r["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            if steps > 0:
                state = compiled(*state, batch)[:2]
                jax.block_until_ready(state)
                start = time.perf_counter()
                for _ in range(steps):
                    *state, loss = compiled(*state, batch)
                jax.block_until_ready(loss)
                r["step_s"] = (time.perf_counter() - start) / steps
            results.append(r)
            print(f"  accumulation k={k}: {r}", file=sys.stderr, flush=True)
    return results


def bench_accum(ks: Sequence[int] = (1, 2, 4), global_batch: int = 1024, **options):
    """`accum_case(ks, global_batch, **options)` on the CPU devices; prints the table."""
    results = accum_case(ks, global_batch, **options)
    base = results[0]["temp_bytes"]
    rows = []
    for r in results:
        timing = "not timed" if r["step_s"] is None else f"{1e3 * r['step_s']:.0f}"
        row = [r["k"], r["batch"], f"{r['temp_bytes'] / 2**20:.1f}"]
        rows.append(row + [f"{r['temp_bytes'] / base:.2f}", timing, f"{r['grad_diff']:.1e}"])
    model = options.get("model") or small_clip()
    v, t = model.vision, model.text
    devices = jax.devices("cpu")
    print(
        f"\nCLIP train step (ViT {options.get('image_size', 32)} px, patch {v['patch_size']}, "
        f"width {v['width']}, {v['depth']} layers; text {t['context_length']} tokens, width "
        f"{t['width']}, {t['depth']} layers; AdamW, float32), the full-batch "
        f"{options.get('kind', 'softmax')} loss ({options.get('impl', 'chunked')}) accumulated "
        f"over k micro-batches, {len(devices)} {devices[0].platform} devices\n"
    )
    headers = ["k", "global batch", "temp MiB / device", f"temp / k={results[0]['k']}"]
    headers += ["step ms", f"max |grad - grad k={results[0]['k']}| / max |grad|"]
    print(markdown_table(headers, rows))
    return results
