"""`vlmjax bench ...`: what this code costs on this machine. Each command prints a markdown
table (and returns the rows, for tests and for `--json`).

    vlmjax bench loss    [--batch_sizes 16384 65536] [--embed_dim 512] [--tile 512]
                         [--accum_batch 1024] [--accum_steps 1 2 4]
                         contrastive losses, then a CLIP step with full-batch accumulation
    vlmjax bench train   --config X.py[:arg] [--batch_size N ...] [--steps N] [--measure_peak]
    vlmjax bench compile [--depths 12 24]          ViT-B/16 train-step compile time, scan or not
    vlmjax bench data    --config X.py[:arg]       input pipeline throughput
    vlmjax bench flops   [--config X.py[:arg]]     analytic FLOPs (vlmjax/flops.py)
    vlmjax bench peak    [--peak_size 8192]        bf16 matmul TFLOP/s of device 0

Timings are wall-clock, after a warm-up, with every result blocked on before the clock
stops: `loss` takes the median run, `train` the mean step of a run of steps, `compile` the
fastest of several compiles. Single-process only. Figures for a GPU must be measured on a
GPU (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vlmjax import config as config_lib
from vlmjax import contrastive_accum, defaults, flops, losses, mfu, tasks, train
from vlmjax import mesh as mesh_lib
from vlmjax.data import pipeline, sources
from vlmjax.models import clip

GIB = 2**30
LOSS_DEVICES = 8  # `bench loss` runs on this many simulated CPU devices


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def timed_runs(fn: Callable[[], Any], repeats: int, max_seconds: float) -> tuple[float, int]:
    """(median seconds, runs) of `fn()` (which must block) after one warm-up call.

    The warm-up's duration caps the runs at what fits in `max_seconds` (at least one), so a
    slow configuration is timed once instead of stalling the whole table.
    """
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    runs = max(1, min(repeats, int(max_seconds / max(warm, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), runs


def available_ram() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def simulate_cpu_devices(n: int = LOSS_DEVICES) -> None:
    """Asks XLA for `n` host devices unless XLA_FLAGS already says how many. Only works
    before the CPU backend starts (the first device query, array or jit)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# --- contrastive loss: memory and time of the implementations ---------------------------------


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


# --- device peak -------------------------------------------------------------------------------


def measure_peak_tflops(
    size: int = 8192, iters: int = 10, device: jax.Device | None = None
) -> float:
    """TFLOP/s of a bf16 [size, size] @ [size, size] product on `device` (default: the first),
    mean of `iters` products after 3 warm-ups, on random data (zeros run faster on GPUs)."""
    device = device or jax.devices()[0]
    keys = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.bfloat16), device) for k in keys)
    matmul = jax.jit(jnp.matmul)
    for _ in range(3):
        jax.block_until_ready(matmul(a, b))
    start = time.perf_counter()
    for _ in range(iters):
        out = matmul(a, b)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / iters
    return 2.0 * size**3 / seconds / 1e12


# --- training step -----------------------------------------------------------------------------


def peak_memory_bytes() -> int | None:
    """Largest `peak_bytes_in_use` over this process's devices since it started (so a later,
    bigger batch reports its own peak); None where devices report no memory (CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def bench_train(
    config: ml_collections.ConfigDict,
    *,
    steps: int = 10,
    warmup: int = 2,
    measured_peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Times `steps` train steps of `config` (after `warmup`) on a fixed synthetic batch
    already on the devices, through `train.setup` (the train loop's own jitted step).

    Returns batch, steps, compile_s, step_s, examples_per_sec, flops_per_example (analytic,
    forward+backward), tflops_per_device, mfu (vs the datasheet peak), mfu_measured (vs
    `measured_peak_tflops`), each None where unknown (a model without a FLOPs formula, a
    device without a peak), peak_memory_bytes (None on CPU), loss, devices, device_kind.
    """
    train.check_config(config)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    mesh_lib.batch_size_per_process(config.batch_size, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        sources.prepare(config.data)  # a model may depend on the data (vocabulary, classes)
        task = tasks.build(config)
        run = train.setup(config, task, mesh)
        state = run.init_fn(jax.random.PRNGKey(config.seed))
        host = task.fake_batch(config.batch_size // jax.process_count())
        batch = pipeline.to_global(host, run.batch_sharding)
        start = time.perf_counter()
        step = run.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, _ = step(state, batch)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        step_s = (time.perf_counter() - start) / steps
    kind = jax.devices()[0].device_kind
    per_example, summary = task.flops_per_example, {}
    if per_example:  # else a model without a FLOPs formula: throughput and memory only
        summary = mfu.train_flops_summary(
            per_example, config.batch_size / step_s, mesh.size, kind, measured_peak_tflops
        )
    return dict(
        batch=config.batch_size,
        steps=steps,
        compile_s=compile_s,
        step_s=step_s,
        examples_per_sec=config.batch_size / step_s,
        flops_per_example=per_example,
        tflops_per_device=summary.get("train/tflops_per_device"),
        mfu=summary.get("train/mfu"),
        mfu_measured=summary.get("train/mfu_measured"),
        peak_memory_bytes=peak_memory_bytes(),
        loss=float(jax.device_get(metrics["train/loss"])),
        devices=mesh.size,
        device_kind=kind,
    )


def train_table(results: Sequence[dict[str, Any]], measured_peak: float | None) -> str:
    """The markdown table of `bench_train` results (one row each)."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    peak = mfu.peak_tflops(results[0]["device_kind"])
    headers = ["batch", "img/s", "step ms", "GFLOP/example", "TFLOP/s/device"]
    headers += [f"MFU (peak {peak or 'unknown'})"]
    headers += [f"MFU (measured {measured_peak:.0f})"] if measured_peak else []
    headers += ["peak memory GiB", "compile s"]
    rows = []
    for r in results:
        row = [r["batch"], f"{r['examples_per_sec']:.1f}", f"{1e3 * r['step_s']:.1f}"]
        per_example = r["flops_per_example"] and r["flops_per_example"] / 1e9
        row += [num(per_example), num(r["tflops_per_device"])]
        row += [pct(r["mfu"])] + ([pct(r["mfu_measured"])] if measured_peak else [])
        mem = r["peak_memory_bytes"]
        row += ["n/a" if mem is None else f"{mem / GIB:.1f}", f"{r['compile_s']:.1f}"]
        rows.append(row)
    return markdown_table(headers, rows)


# --- compile time ------------------------------------------------------------------------------


def vit_b16_config(depth: int, scan: bool, batch_size: int) -> ml_collections.ConfigDict:
    """A ViT-B/16 ImageNet-shaped classification run (224, 1000 classes, AdamW) of `depth`."""
    c = defaults.base_config()
    c.task, c.model_name = "classification", "vit"
    c.batch_size = batch_size
    c.data.image_size = 224
    c.model = ml_collections.ConfigDict(
        dict(width=768, depth=depth, mlp_dim=3072, num_heads=12, patch_size=16, scan=scan)
    )
    c.model.num_classes = 1000
    c.optimizer.name = "adamw"
    return c


def compile_time(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """(trace+lower seconds, compile seconds) of `config`'s train step, on abstract inputs.

    Caches are cleared first, so nothing is reused from an earlier measurement.
    """
    jax.clear_caches()
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config)
        run = train.setup(config, task, mesh)
        host = task.fake_batch(config.batch_size)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
        start = time.perf_counter()
        lowered = run.train_step.lower(run.abstract, batch)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        return lower_s, time.perf_counter() - start


def bench_compile(
    depths: Sequence[int] = (12, 24),
    batch_size: int = 8,
    scans: Sequence[bool] = (True, False),
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Compile time of the ViT-B/16 train step for each depth, with and without `nn.scan`:
    the fastest of `repeats` fresh compiles (the one least disturbed by other processes),
    taken in rounds over all cases so that a busy spell slows every case alike, after one
    unmeasured compile (a process's first compile pays one-time set-up costs)."""
    cases = [(scan, depth) for scan in scans for depth in depths]
    compile_time(vit_b16_config(depths[0], scans[0], batch_size))
    times: dict[tuple[bool, int], list[tuple[float, float]]] = {case: [] for case in cases}
    for round_ in range(repeats):
        for scan, depth in cases:
            times[scan, depth].append(compile_time(vit_b16_config(depth, scan, batch_size)))
            seconds = sum(times[scan, depth][-1])
            print(f"  {round_}: scan={scan} depth={depth}: {seconds:.1f} s", file=sys.stderr)
    results = []
    for scan, depth in cases:
        lower_s, compile_s = min(times[scan, depth], key=sum)
        results.append(dict(scan=scan, depth=depth, lower_s=lower_s, compile_s=compile_s))
    total = {(r["scan"], r["depth"]): r["lower_s"] + r["compile_s"] for r in results}
    rows = []
    for r in results:
        ratio = total[r["scan"], r["depth"]] / total[r["scan"], depths[0]]
        layers = "scan" if r["scan"] else "unrolled"
        rows.append([layers, r["depth"], f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}"])
        rows[-1].append(f"{ratio:.2f}")
    device = jax.devices()[0]
    print(
        f"ViT-B/16 train step (224, AdamW, float32, batch {batch_size}) on {jax.device_count()} "
        f"{device.platform} device(s), jax {jax.__version__}; fastest of {repeats} compiles\n"
    )
    headers = ["layers", "depth", "trace+lower s", "compile s", f"total / depth {depths[0]}"]
    print(markdown_table(headers, rows))
    return results


# --- input pipeline ----------------------------------------------------------------------------


def bench_data(
    config: ml_collections.ConfigDict, batches: int = 100, warmup: int = 2
) -> dict[str, Any]:
    """Examples per second of the task's `train_dataset(0, 1)` (host batches only,
    no device transfer), over `batches` batches after `warmup`. Measure many: the first
    `data.prefetch` batches may already sit in grain's read-ahead buffer."""
    sources.prepare(config.data)
    it = iter(tasks.build(config).train_dataset(0, 1, 0))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    seconds = time.perf_counter() - start
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rate = batches * config.batch_size / seconds
    result = dict(examples_per_sec=rate, per_core=rate / cores, cores=cores)
    result["shapes"] = {k: tuple(v.shape) for k, v in batch.items()}
    headers = ["task", "batch", "img/s", "cores", "img/s per core", "data.num_threads"]
    row = [config.task, config.batch_size, f"{rate:.0f}", cores, f"{rate / cores:.0f}"]
    print(markdown_table(headers, [row + [config.data.num_threads]]))
    return result


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmjax bench",
        description="Benchmarks of this code on this machine (vlmjax/bench.py).",
    )
    commands = parser.add_subparsers(dest="bench", required=True)
    loss = commands.add_parser("loss", help="memory and time of the contrastive losses")
    loss.add_argument("--batch_sizes", type=int, nargs="*", default=[16384, 65536])
    loss.add_argument("--embed_dim", type=int, default=512)
    loss.add_argument("--repeats", type=int, default=3, help="timed runs; 0: memory only")
    loss.add_argument("--max_seconds", type=float, default=60.0, help="timing budget per case")
    loss.add_argument("--ram_fraction", type=float, default=0.5, help="of available RAM")
    loss.add_argument("--tile", type=int, default=losses.DEFAULT_TILE, help="impl=tiled")
    loss.add_argument("--accum_batch", type=int, default=1024, help="CLIP step; 0: skip")
    loss.add_argument("--accum_steps", type=int, nargs="+", default=[1, 2, 4], help="k")
    loss.add_argument("--accum_impl", default="chunked", choices=losses.IMPLS)
    tr = commands.add_parser("train", help="train-step throughput, FLOPs and MFU")
    tr.add_argument("--config", required=True, help="experiments/NAME.py[:arg]")
    tr.add_argument("--batch_size", type=int, nargs="+", help="global batch size(s)")
    tr.add_argument("--steps", type=int, default=10)
    tr.add_argument("--warmup", type=int, default=2)
    tr.add_argument("--measure_peak", action="store_true", help="time a bf16 matmul first")
    tr.add_argument("--peak_size", type=int, default=8192)
    tr.add_argument("--json", help="also write the results here")
    comp = commands.add_parser("compile", help="ViT-B/16 train-step compile time")
    comp.add_argument("--depths", type=int, nargs="+", default=[12, 24])
    comp.add_argument("--batch_size", type=int, default=8)
    comp.add_argument("--no_unrolled", action="store_true", help="only the scanned model")
    comp.add_argument("--repeats", type=int, default=3, help="compiles per case (fastest)")
    data = commands.add_parser("data", help="input-pipeline throughput")
    data.add_argument("--config", required=True)
    data.add_argument("--batches", type=int, default=100)
    fl = commands.add_parser("flops", help="analytic FLOPs per example")
    fl.add_argument("--config")
    peak = commands.add_parser("peak", help="bf16 matmul TFLOP/s of device 0")
    peak.add_argument("--peak_size", type=int, default=8192)
    return parser


def _train_command(args: argparse.Namespace, config: ml_collections.ConfigDict) -> int:
    measured = measure_peak_tflops(args.peak_size) if args.measure_peak else None
    report = dict(config=args.config, jax=jax.__version__, measured_peak_tflops=measured)
    results = report["results"] = []
    for batch_size in args.batch_size or [config.batch_size]:
        config_lib.override(config, "batch_size", str(batch_size))
        try:
            r = bench_train(
                config, steps=args.steps, warmup=args.warmup, measured_peak_tflops=measured
            )
        except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: say so, go on
            print(f"batch {batch_size}: failed: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        results.append(r)
        print(train_table([r], measured), file=sys.stderr, flush=True)
        if args.json:  # after each batch size, so a time limit keeps what finished
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    if not results:
        return 1
    peak = f", measured bf16 peak {measured:.1f} TFLOP/s" if measured else ""
    r = results[0]
    print(f"{args.config} on {r['devices']} x {r['device_kind']}, jax {jax.__version__}{peak}")
    print(train_table(results, measured))
    print(flops.report())
    return 0


def main(argv: Sequence[str], overrides: Sequence[tuple[str, str]] = ()) -> int:
    """Runs `vlmjax bench ARGV` (`overrides`: --config.KEY=VALUE pairs); returns the exit code."""
    args = _parser().parse_args(list(argv))
    if args.bench == "loss":
        simulate_cpu_devices()  # before anything starts the CPU backend
        options = dict(repeats=args.repeats, max_seconds=args.max_seconds, tile=args.tile)
        if args.batch_sizes:
            bench_loss(args.batch_sizes, args.embed_dim, ram_fraction=args.ram_fraction, **options)
        if args.accum_batch:
            steps = 3 if args.repeats else 0
            bench_accum(
                args.accum_steps,
                args.accum_batch,
                impl=args.accum_impl,
                tile=args.tile,
                steps=steps,
            )
        return 0
    if args.bench == "compile":
        scans = (True,) if args.no_unrolled else (True, False)
        bench_compile(args.depths, args.batch_size, scans, args.repeats)
        return 0
    if args.bench == "peak":
        tflops = measure_peak_tflops(args.peak_size)
        print(f"{jax.devices()[0].device_kind}: {tflops:.1f} TFLOP/s bf16 ({args.peak_size}^3)")
        return 0
    try:
        config = config_lib.load_with_overrides(args.config, overrides) if args.config else None
    except config_lib.ConfigError as e:
        print(f"vlmjax bench: config error: {e}", file=sys.stderr)
        return 2
    if args.bench == "flops":
        print(flops.report(config))
    elif args.bench == "data":
        bench_data(config, args.batches)
    else:
        return _train_command(args, config)
    return 0
