"""`vlmjax bench ...`: what this code costs on this machine. Each command prints a markdown
table (and returns the rows, for tests and for `--json`).

    vlmjax bench loss    [--batch_sizes 16384 65536] [--embed_dim 512] [--tile 512]
                         [--accum_batch 1024] [--accum_steps 1 2 4]
                         contrastive losses, then a CLIP step with full-batch accumulation
    vlmjax bench train   --config X.py[:arg] [--batch_size N ...] [--steps N] [--measure_peak]
    vlmjax bench compile [--depths 12 24]          ViT-B/16 train-step compile time, scan or not
    vlmjax bench data    --config X.py[:arg] | --wds DIR [--make_shards N] [--num_workers 0 1 2]
                         input pipeline throughput (WebDataset: vlmjax/bench/inputs.py)
    vlmjax bench flops   [--config X.py[:arg]]     analytic FLOPs (vlmjax/flops.py)
    vlmjax bench peak    [--peak_size 8192]        bf16 matmul TFLOP/s of device 0

Timings are wall-clock, after a warm-up, with every result blocked on before the clock
stops: `loss` takes the median run, `train` the mean step of a run of steps, `compile` the
fastest of several compiles. Single-process only. Figures for a GPU must be measured on a
GPU (BENCHMARKS.md).

Each command lives in its own module: `loss.py` (loss, the accumulated CLIP step),
`step.py` (train, compile, peak), `inputs.py` (data), `common.py` (tables and timing).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax
import ml_collections

from vlmjax import config as config_lib
from vlmjax import flops, losses
from vlmjax.bench import inputs, loss, step
from vlmjax.bench.common import simulate_cpu_devices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmjax bench",
        description="Benchmarks of this code on this machine (vlmjax/bench/).",
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
    data.add_argument("--config", help="experiments/NAME.py[:arg] (or --wds)")
    data.add_argument("--wds", help="a folder of WebDataset .tar shards (and tokenizer.json)")
    data.add_argument("--make_shards", type=int, default=0, help="--wds: write N shards first")
    data.add_argument("--samples_per_shard", type=int, default=256)
    data.add_argument("--tokenizer", default="", help="--wds: default DIR/tokenizer.json")
    data.add_argument("--batch_size", type=int, default=64, help="--wds: host batch")
    data.add_argument("--num_threads", type=int, default=1, help="--wds: data.num_threads")
    data.add_argument("--num_workers", type=int, nargs="*", help="data.num_workers values")
    data.add_argument("--batches", type=int, help="timed batches (default 100; --wds 30)")
    fl = commands.add_parser("flops", help="analytic FLOPs per example")
    fl.add_argument("--config")
    peak = commands.add_parser("peak", help="bf16 matmul TFLOP/s of device 0")
    peak.add_argument("--peak_size", type=int, default=8192)
    return parser


def _train_command(args: argparse.Namespace, config: ml_collections.ConfigDict) -> int:
    measured = step.measure_peak_tflops(args.peak_size) if args.measure_peak else None
    report = dict(config=args.config, jax=jax.__version__, measured_peak_tflops=measured)
    results = report["results"] = []
    for batch_size in args.batch_size or [config.batch_size]:
        config_lib.override(config, "batch_size", str(batch_size))
        try:
            r = step.bench_train(
                config, steps=args.steps, warmup=args.warmup, measured_peak_tflops=measured
            )
        except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: say so, go on
            print(f"batch {batch_size}: failed: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        results.append(r)
        print(step.train_table([r], measured), file=sys.stderr, flush=True)
        if args.json:  # after each batch size, so a time limit keeps what finished
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    if not results:
        return 1
    peak = f", measured bf16 peak {measured:.1f} TFLOP/s" if measured else ""
    r = results[0]
    print(f"{args.config} on {r['devices']} x {r['device_kind']}, jax {jax.__version__}{peak}")
    print(step.train_table(results, measured))
    print(flops.report())
    return 0


def main(argv: Sequence[str], overrides: Sequence[tuple[str, str]] = ()) -> int:
    """Runs `vlmjax bench ARGV` (`overrides`: --config.KEY=VALUE pairs); returns the exit code."""
    args = _parser().parse_args(list(argv))
    if args.bench == "loss":
        simulate_cpu_devices()  # before anything starts the CPU backend
        options = dict(repeats=args.repeats, max_seconds=args.max_seconds, tile=args.tile)
        if args.batch_sizes:
            loss.bench_loss(
                args.batch_sizes, args.embed_dim, ram_fraction=args.ram_fraction, **options
            )
        if args.accum_batch:
            steps = 3 if args.repeats else 0
            loss.bench_accum(
                args.accum_steps,
                args.accum_batch,
                impl=args.accum_impl,
                tile=args.tile,
                steps=steps,
            )
        return 0
    if args.bench == "compile":
        scans = (True,) if args.no_unrolled else (True, False)
        step.bench_compile(args.depths, args.batch_size, scans, args.repeats)
        return 0
    if args.bench == "peak":
        tflops = step.measure_peak_tflops(args.peak_size)
        print(f"{jax.devices()[0].device_kind}: {tflops:.1f} TFLOP/s bf16 ({args.peak_size}^3)")
        return 0
    if args.bench == "data" and args.wds:
        inputs.bench_wds(
            args.wds, make_shards=args.make_shards, per_shard=args.samples_per_shard,
            tokenizer=args.tokenizer, num_workers=args.num_workers or (0, 1, 2),
            batch_size=args.batch_size, num_threads=args.num_threads, batches=args.batches or 30,
        )  # fmt: skip
        return 0
    if args.bench == "data" and not args.config:
        print("vlmjax bench data: give --config X.py or --wds DIR", file=sys.stderr)
        return 2
    try:
        config = config_lib.load_with_overrides(args.config, overrides) if args.config else None
    except config_lib.ConfigError as e:
        print(f"vlmjax bench: config error: {e}", file=sys.stderr)
        return 2
    if args.bench == "flops":
        print(flops.report(config))
    elif args.bench == "data":
        inputs.bench_workers(config, args.num_workers or [], args.batches or 100)
    else:
        return _train_command(args, config)
    return 0
