"""`vlmjax <command>`: the command-line entry point.

    vlmjax train --config experiments/NAME.py[:arg] --workdir DIR [--config.key=value ...]
    vlmjax eval --workdir DIR [--step N] [--config.key=value ...]
    vlmjax sweep --config experiments/NAME.py[:arg] --workdir ROOT [--launcher slurm] [--dry_run]

Multi-process runs add --coordinator_address/--num_processes/--process_id (or the
VLMJAX_* environment variables, or nothing under SLURM and on TPU pods): see distributed.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from vlmjax import config as config_lib
from vlmjax import sweep

log = logging.getLogger("vlmjax")


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (see vlmjax/distributed.py)")
    group.add_argument("--coordinator_address", help="host:port of process 0")
    group.add_argument("--num_processes", type=int)
    group.add_argument("--process_id", type=int)


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
    _add_cluster_flags(evaluate)
    sweep.add_parser(commands)
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


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = config_lib.split_overrides(argv)
    except config_lib.ConfigError as e:
        print(f"vlmjax: error: {e}", file=sys.stderr)
        return 2
    args = _parser().parse_args(rest)
    if args.command == "sweep":  # runs each point as its own `vlmjax train` process
        return sweep.main(args, overrides)

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
    try:
        if args.command == "train":
            config = config_lib.load_with_overrides(args.config, overrides)
        else:
            config = config_lib.load_workdir(args.workdir)
            for key, value in overrides:
                config_lib.override(config, key, value)
    except config_lib.ConfigError as e:
        print(f"vlmjax: config error: {e}", file=sys.stderr)
        return 2
    distributed.initialize(cluster)

    import jax

    from vlmjax import checkpoint, mesh, train

    try:
        if args.command == "train":
            metrics = train.train(config, args.workdir)
            if jax.process_index() == 0 and metrics:
                print(f"final ({config.data.eval_split}): {_summary(metrics)}")
        else:
            step, metrics = train.evaluate_checkpoint(config, args.workdir, args.step)
            if jax.process_index() == 0:
                print(f"step {step} ({config.data.eval_split}): {_summary(metrics)}")
                with open(os.path.join(args.workdir, f"eval_{step}.json"), "w") as f:
                    json.dump({"step": step, "metrics": metrics}, f, indent=2)
    except (config_lib.ConfigError, mesh.MeshError, checkpoint.CheckpointError) as e:
        print(f"vlmjax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
