"""`vlmjax bench train | compile | peak`: train-step throughput, FLOPs and MFU; compile time
of a ViT-B/16 step with and without `nn.scan`; a device's bf16 matmul peak."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax import defaults, mfu, tasks, train
from vlmjax import mesh as mesh_lib
from vlmjax.bench.common import GIB, markdown_table
from vlmjax.data import pipeline, sources

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
