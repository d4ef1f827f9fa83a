"""`vlmjax <command>`: the command-line entry point.

vlmjax train --config experiments/NAME.py[:arg] --workdir DIR [--config.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from vlmjax import config as config_lib

log = logging.getLogger("vlmjax")


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
    return parser


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # absl/orbax log every checkpoint file operation at INFO.
    for name in ("absl", "orbax", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = config_lib.split_overrides(argv)
    except config_lib.ConfigError as e:
        print(f"vlmjax: error: {e}", file=sys.stderr)
        return 2
    args = _parser().parse_args(rest)
    _setup_logging()
    try:
        config = config_lib.load_with_overrides(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"vlmjax: config error: {e}", file=sys.stderr)
        return 2

    if args.command == "train":
        from vlmjax import train  # imports JAX: keep `vlmjax --help` fast

        try:
            metrics = train.train(config, args.workdir)
        except config_lib.ConfigError as e:
            print(f"vlmjax: config error: {e}", file=sys.stderr)
            return 2
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(f"final ({config.data.eval_split}): {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
