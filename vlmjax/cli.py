"""`vlmjax <command>`: the command-line entry point.

    vlmjax train --config experiments/NAME.py[:arg] --workdir DIR [--config.key=value ...]
    vlmjax eval --workdir DIR [--step N] [--evals FILE.py[:arg]] [--config.key=value ...]
    vlmjax sweep --config experiments/NAME.py[:arg] --workdir ROOT [--launcher slurm] [--dry_run]
    vlmjax bench loss|train|compile|data|flops|peak [...]   (see vlmjax/bench/)
    vlmjax generate --workdir DIR --image PATH --prompt TEXT [--max_new_tokens N]
                    [--temperature T --top_k K] [--step N]   (decoder runs: prints its text)
    vlmjax export --workdir DIR [--step N] --out HF_DIR   (a folder transformers loads)

Multi-process runs add --coordinator_address/--num_processes/--process_id (or the
VLMJAX_* environment variables, or nothing under SLURM and on TPU pods): see distributed.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from vlmjax import config as config_lib
from vlmjax import sweep

log = logging.getLogger("vlmjax")

PREEMPTED = 143  # exit status of a run stopped by SIGTERM with a checkpoint (128 + SIGTERM)
FAILED = 1  # a run that failed (non-finite loss, full disk, a crash): see the one error line
USAGE = 2  # a config, mesh, workdir or checkpoint the user must fix
ERROR_LOG = "error.log"  # WORKDIR/error.log: the full traceback of each failure, appended


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (see vlmjax/distributed.py)")
    group.add_argument("--coordinator_address", help="host:port of process 0")
    group.add_argument("--num_processes", type=int)
    group.add_argument("--process_id", type=int)
    parser.add_argument(
        "--verbose", action="store_true", help="print the full traceback of a failure"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmjax",
        description="Train vision and vision-language models on sharded device meshes.",
        epilog="Override config values with --config.KEY=VALUE, e.g. --config.batch_size=64.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or resume) a run in --workdir")
    train.add_argument("--config", required=True, help="experiments/NAME.py[:arg]")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics and config go here")
    _add_cluster_flags(train)
    evaluate = commands.add_parser("eval", help="evaluate a kept checkpoint of a workdir")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--step", type=int, help="a kept step (default: the latest)")
    evaluate.add_argument(
        "--evals",
        help="FILE.py[:arg] whose get_config(arg) returns evaluators (config.evals) to run "
        "instead of the run's own, e.g. on sets it was not trained with",
    )
    _add_cluster_flags(evaluate)
    sweep.add_parser(commands)
    # Listed for --help only: main() hands `vlmjax bench ...` to vlmjax/bench/'s parser.
    commands.add_parser("bench", help="benchmarks: loss, train, compile, data, flops, peak")
    gen = commands.add_parser("generate", help="a decoder run's text for one image and prompt")
    gen.add_argument("--workdir", required=True)
    gen.add_argument("--image", required=True, help="any image file PIL reads, any size")
    gen.add_argument("--prompt", default="", help="e.g. a question; empty: a caption")
    gen.add_argument("--max_new_tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest; 0: all")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--step", type=int, help="a kept step (default: the latest)")
    export = commands.add_parser(
        "export", help="write a checkpoint as a Hugging Face folder (vlmjax/export.py)"
    )
    export.add_argument("--workdir", required=True)
    export.add_argument("--step", type=int, help="a kept step (default: the latest)")
    export.add_argument("--out", required=True, help="the folder to write")
    _add_cluster_flags(export)
    return parser


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # absl/orbax log every checkpoint file operation at INFO.
    for name in ("absl", "orbax", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _OrbaxErrors(logging.Filter):
    """Drops orbax's own ERROR records (with tracebacks) of a failed background save: the
    failure surfaces as the run's exception, named in its one error line (--verbose keeps
    them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class _UnretrievedDiskFull(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for a write that found the disk
    full: orbax gathers its writes, so the first failure is raised (and named in the run's
    one error line) and the other writes' identical failures are left to the collector."""

    def filter(self, record: logging.LogRecord) -> bool:
        from vlmjax import checkpoint

        value = record.exc_info[1] if record.exc_info else None
        if value is None:  # asyncio passes the exception in the message's context
            value = getattr(record, "exception", None)
        return not (value is not None and checkpoint.is_disk_full(value))


def _quiet_background_noise() -> None:
    """After a failed async save, TensorStore's pending writes complete into orbax's closed
    event loop, and each prints a "RuntimeError: Event loop is closed" traceback through
    sys.excepthook (up to 96 of them in issue 12, burying the cause). Those, and only
    those, are dropped."""
    previous = sys.excepthook
    if getattr(previous, "vlmjax_quiet", False):  # installed by an earlier main() call
        return

    def hook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        previous(kind, value, tb)

    hook.vlmjax_quiet = True
    sys.excepthook = hook
    # TensorStore's C++ threads report a callback that raised through PyErr_WriteUnraisable
    # (with no object, so only the traceback prints): the same noise by another door.
    previous_unraisable = sys.unraisablehook

    def unraisable(args):
        value = args.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous_unraisable(args)

    sys.unraisablehook = unraisable
    logging.getLogger("absl").addFilter(_OrbaxErrors())
    logging.getLogger("asyncio").addFilter(_UnretrievedDiskFull())

    import threading

    from vlmjax import checkpoint

    previous_thread_hook = threading.excepthook

    def thread_hook(args):
        # A full disk also kills background writers (TensorBoard's flush thread): one line.
        if args.exc_value is not None and checkpoint.is_disk_full(args.exc_value):
            name = args.thread.name if args.thread else "?"
            log.warning("background thread %s: %s", name, args.exc_value)
            return
        previous_thread_hook(args)

    threading.excepthook = thread_hook


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = config_lib.split_overrides(argv)
    except config_lib.ConfigError as e:
        print(f"vlmjax: error: {e}", file=sys.stderr)
        return 2
    if rest[:1] == ["bench"]:  # single-process, own arguments; may set XLA_FLAGS before JAX
        from vlmjax import bench

        return bench.main(rest[1:], overrides)
    args = _parser().parse_args(rest)
    if args.command == "sweep":  # runs each point as its own `vlmjax train` process
        return sweep.main(args, overrides)
    if args.command == "generate":  # one process, one device
        return _generate(args, overrides)

    from vlmjax import distributed  # imports JAX: keep `vlmjax --help` fast

    try:
        cluster = distributed.detect(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    except ValueError as e:
        print(f"vlmjax: error: {e}", file=sys.stderr)
        return 2
    _setup_logging(cluster.process_id == 0)
    if not args.verbose:
        _quiet_background_noise()
    try:
        if args.command == "train":
            config = config_lib.load_with_overrides(args.config, overrides)
            config_lib.validate(config)  # ranges and names, before JAX starts
        else:
            config = config_lib.load_workdir(args.workdir)
            if getattr(args, "evals", None):
                config_lib.replace_evals(config, args.evals)
            for key, value in overrides:
                config_lib.override(config, key, value)
    except config_lib.ConfigError as e:
        print(f"vlmjax: config error: {e}", file=sys.stderr)
        return 2
    distributed.initialize(cluster)

    import jax

    from vlmjax import checkpoint, lock, mesh, train

    try:
        # The mesh must fit the processes the scheduler started (names both the mesh.* keys
        # and the SLURM_* values it read) before anything compiles.
        distributed.check_mesh(
            cluster,
            config.mesh.data,
            config.mesh.fsdp,
            config.mesh.tensor,
            jax.local_device_count(),
        )
        if args.command == "train":
            metrics = train.train(config, args.workdir)
            if jax.process_index() == 0 and metrics:
                print(f"final: {_summary(metrics)}")
        elif args.command == "export":
            from vlmjax import export

            step, written = export.export(config, args.workdir, args.out, args.step)
            print(f"step {step} -> {args.out}: " + ", ".join(written))
        else:
            step, metrics = train.evaluate_checkpoint(config, args.workdir, args.step)
            if jax.process_index() == 0:
                print(f"step {step}: {_summary(metrics)}")
                with open(os.path.join(args.workdir, f"eval_{step}.json"), "w") as f:
                    json.dump({"step": step, "metrics": metrics}, f, indent=2)
    except train.Preempted as e:
        print(f"vlmjax: {e}", file=sys.stderr)
        return PREEMPTED
    except (
        config_lib.ConfigError,
        mesh.MeshError,
        checkpoint.CheckpointError,
        lock.WorkdirLocked,
    ) as e:
        return _fail(e, args, USAGE, traceback_too=isinstance(e, checkpoint.DiskFull))
    except KeyboardInterrupt:
        print("vlmjax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for any failure; the traceback is logged
        return _fail(e, args, FAILED, traceback_too=True)
    return 0


def _fail(e: BaseException, args: argparse.Namespace, status: int, traceback_too: bool) -> int:
    """Prints one `vlmjax: error: ...` line with the cause; the traceback goes to
    WORKDIR/error.log (and to stderr with --verbose). Returns `status`."""
    import traceback

    from vlmjax import checkpoint

    message = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, config_lib.ConfigError | RuntimeError | FloatingPointError):
        message = f"{type(e).__name__}: {message}"  # e.g. FileNotFoundError: ...
    if checkpoint.is_disk_full(e) and not isinstance(e, checkpoint.DiskFull):
        message = f"the disk is full: {message}"
    where = ""
    if traceback_too:
        text = "".join(traceback.format_exception(e))
        if args.verbose:
            print(text, file=sys.stderr, end="")
        path = os.path.join(args.workdir, ERROR_LOG)
        try:
            if os.path.isdir(args.workdir):
                with open(path, "a") as f:
                    f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n{text}")
                where = f" (traceback in {path})"
        except OSError:  # e.g. the full disk itself
            pass
    print(f"vlmjax: error: {message}{where}", file=sys.stderr)
    return status


def _generate(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    """`vlmjax generate`: loads the run's config and checkpoint, prints the model's text."""
    _setup_logging(True)
    try:
        config = config_lib.load_workdir(args.workdir)
        for key, value in overrides:
            config_lib.override(config, key, value)
        if config.task != "captioning":
            raise config_lib.ConfigError(f"{args.workdir} is a '{config.task}' run, not a decoder")
    except config_lib.ConfigError as e:
        print(f"vlmjax: config error: {e}", file=sys.stderr)
        return 2
    import numpy as np
    from PIL import Image

    try:
        with Image.open(args.image) as img:
            image = np.asarray(img.convert("RGB"), np.uint8)  # [h, w, 3]
    except OSError as e:
        print(f"vlmjax: error: cannot read image {args.image!r}: {e}", file=sys.stderr)
        return 2

    from vlmjax import checkpoint, predict

    try:
        text = predict.generate_from_workdir(
            config,
            args.workdir,
            image,
            args.prompt,
            step=args.step,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    except (config_lib.ConfigError, checkpoint.CheckpointError, ValueError) as e:
        print(f"vlmjax: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
