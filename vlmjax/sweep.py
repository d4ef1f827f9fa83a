"""Hyperparameter sweeps: many `vlmjax train` runs of one experiment, one workdir each.

An experiment file may define `get_sweep(arg=None)` (the same `arg` as its `get_config`)
returning a list of override dicts, built with `product` and `zip_`:

    def get_sweep(arg=None):
        return sweep.product(
            {"optimizer.learning_rate": [1e-3, 3e-3]},
            sweep.zip_({"model.depth": [2, 4], "model.width": [128, 256]}),
        )  # 4 runs: 2 learning rates x 2 (depth, width) pairs

    vlmjax sweep --config experiments/NAME.py[:arg] --workdir ROOT [--launcher local|slurm]
        [--dry_run] [--metric eval/heldout/accuracy] [--sbatch_args "..."] [--config.key=value ...]

Point i trains in ROOT/<run_name(point)> with the base config, then the point's overrides,
then the command line's `--config.key=value` (which win). Points whose workdir holds a
final_metrics.json for their total_steps are finished and skipped, so rerunning the same
command resumes a sweep. ROOT/sweep.csv (a row per point) and ROOT/sweep_<metric>.png (the
metric against each swept key) summarise whatever has finished.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import inspect
import itertools
import json
import numbers
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vlmjax import config as config_lib

# Written by train.train when a run finishes (train.FINAL_METRICS; not imported from there,
# because vlmjax.train pulls in the whole training stack and `vlmjax sweep` runs none of it).
FINAL_METRICS = "final_metrics.json"
STATUSES = ("finished", "started", "pending", "failed")
# `vlmjax train`'s exit status after a SIGTERM that it answered with a checkpoint (cli.py).
PREEMPTED = 143

Point = dict[str, Any]  # dotted config key -> value, e.g. {"optimizer.learning_rate": 1e-3}
Part = Mapping[str, Iterable[Any]] | Sequence[Mapping[str, Any]]


# --- building sweeps --------------------------------------------------------------------------


def _expand(part: Part, combine: str) -> list[Point]:
    """A list of points from `part`: a list of points as is, or {key: values} axes."""
    if isinstance(part, Mapping):
        for key, values in part.items():
            if not isinstance(key, str) or isinstance(values, str | bytes | Mapping):
                raise config_lib.ConfigError(
                    f"sweep axis {key!r}: {values!r} must be a list of values, e.g. [1, 2]"
                )
        axes = {key: list(values) for key, values in part.items()}
        if empty := [key for key, values in axes.items() if not values]:
            raise config_lib.ConfigError(f"sweep axes {empty} have no values")
        if combine == "zip":
            return _zip_lists([[{key: v} for v in values] for key, values in axes.items()])
        combos = itertools.product(*axes.values())
        return [dict(zip(axes, values, strict=True)) for values in combos]
    for point in part:
        if not isinstance(point, Mapping) or not all(isinstance(key, str) for key in point):
            raise config_lib.ConfigError(f"sweep point {point!r} must be a dict of str keys")
    return [dict(point) for point in part]


def _merge(points: Iterable[Point]) -> Point:
    merged: Point = {}
    for point in points:
        if shared := merged.keys() & point.keys():
            raise config_lib.ConfigError(f"sweep key(s) {sorted(shared)} set by two factors")
        merged.update(point)
    return merged


def _zip_lists(lists: list[list[Point]]) -> list[Point]:
    lengths = {len(points) for points in lists}
    if len(lengths) > 1:
        raise config_lib.ConfigError(f"zip_ needs equal lengths, got {[len(p) for p in lists]}")
    return [_merge(points) for points in zip(*lists, strict=True)]


def product(*parts: Part) -> list[Point]:
    """Every combination of `parts`: each is {key: [values]} (crossed) or a list of points.

    product({"a": [1, 2], "b": [3, 4]}) -> [{a: 1, b: 3}, {a: 1, b: 4}, {a: 2, b: 3}, ...]
    """
    lists = [_expand(part, "product") for part in parts]
    return [_merge(points) for points in itertools.product(*lists)]


def zip_(*parts: Part) -> list[Point]:
    """Point i takes the i-th value of every part: {key: [values]} or a list of points.

    zip_({"a": [1, 2], "b": [3, 4]}) -> [{a: 1, b: 3}, {a: 2, b: 4}]; lengths must match.
    """
    return _zip_lists([_expand(part, "zip") for part in parts])


# --- naming and values ------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    # NumPy scalars (np.logspace gives np.float64) repr as "np.float64(0.001)": use Python's.
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def value_text(value: Any) -> str:
    """`value` as the text of `--config.key=TEXT` (parsed back by config.override)."""
    value = _plain(value)
    return value if isinstance(value, str) else repr(value)


def _compact(value: Any) -> str:
    """Short text for names and plot labels: 0.001, 3e-5, 2, cls."""
    value = _plain(value)
    if isinstance(value, float):
        short = f"{value:.6g}"
        text = short if float(short) == value else repr(value)
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m[1].replace("+", "") + m[2], text)
    return value_text(value)


def run_name(overrides: Mapping[str, Any]) -> str:
    """A stable, filesystem-safe workdir name: "model.depth=2,optimizer.learning_rate=0.001".

    Keys are sorted. Characters outside [A-Za-z0-9._,=+-] become "_"; when that loses
    information (or the name would be over 200 characters) a hash of the exact point is
    appended, so distinct points never share a name.
    """
    if not overrides:
        return "base"
    raw = ",".join(f"{key}={_compact(overrides[key])}" for key in sorted(overrides))
    name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", raw)
    if name != raw or len(name) > 200:
        exact = json.dumps([[k, value_text(overrides[k])] for k in sorted(overrides)])
        name = name[:190] + "-" + hashlib.sha1(exact.encode()).hexdigest()[:8]
    return name


# --- planning ---------------------------------------------------------------------------------


def load_sweep(spec: str) -> list[Point]:
    """The points of `path.py[:arg]`'s `get_sweep(arg)`; config keys are not checked here."""
    module, path, arg = config_lib.load_module(spec)
    if not hasattr(module, "get_sweep"):
        raise config_lib.ConfigError(
            f"{path} has no get_sweep(arg=None) returning a list of override dicts "
            "(see vlmjax/sweep.py)"
        )
    takes_arg = bool(inspect.signature(module.get_sweep).parameters)
    points = module.get_sweep(arg or None) if takes_arg else module.get_sweep()
    if isinstance(points, Mapping) or not isinstance(points, Sequence) or not points:
        raise config_lib.ConfigError(f"{path}:get_sweep must return a non-empty list of dicts")
    return _expand(points, "product")


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of a sweep, resolved against its config."""

    name: str
    overrides: Point  # the point, as get_sweep gave it
    values: dict[str, Any]  # every swept key's value in this run's final config
    workdir: str
    total_steps: int
    command: list[str]  # argv of this point's `vlmjax train`


def _get(config, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def plan(spec: str, root: str, overrides: Sequence[tuple[str, str]] = ()) -> list[Run]:
    """The runs of `spec`'s sweep in `root`, each config built and checked (nothing runs).

    `overrides` are the command line's (key, text) pairs, applied after each point's.
    """
    config_lib.load_with_overrides(spec, overrides)  # errors of the base or the command line
    points = load_sweep(spec)
    swept = sorted({key for point in points for key in point})
    path, _, arg = spec.partition(":")
    # Absolute paths: slurm tasks need not start in this directory.
    spec = os.path.abspath(path) + (f":{arg}" if arg else "")
    root = os.path.abspath(root)
    runs: list[Run] = []
    names: dict[str, Point] = {}
    for point in points:
        name = run_name(point)
        if name in names:
            raise config_lib.ConfigError(f"sweep points {names[name]} and {point} share {name!r}")
        names[name] = point
        flags = [(key, value_text(value)) for key, value in point.items()] + list(overrides)
        try:
            config = config_lib.load_with_overrides(spec, flags)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"sweep point {name}: {e}") from None
        workdir = os.path.join(root, name)
        command = [sys.executable, "-m", "vlmjax.cli", "train", "--config", spec]
        command += ["--workdir", workdir] + [f"--config.{key}={text}" for key, text in flags]
        values = {key: _get(config, key) for key in swept}
        runs.append(Run(name, point, values, workdir, config.total_steps, command))
    return runs


def final_metrics(run: Run) -> dict[str, float] | None:
    """The run's final metrics if it finished its total_steps, else None."""
    try:
        with open(os.path.join(run.workdir, FINAL_METRICS)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("step") != run.total_steps:
        return None
    return dict(record.get("metrics") or {})


def status(run: Run) -> str:
    """The run's state: finished, pending (no workdir yet) or started (a workdir but not
    finished: running, stopped or failed; running the sweep resumes it)."""
    if final_metrics(run) is not None:
        return "finished"
    return "started" if os.path.isdir(run.workdir) else "pending"


# --- launching --------------------------------------------------------------------------------


def _execute(command: list[str]) -> int:
    """Runs one point's `vlmjax train` in a child process; its output goes to this terminal."""
    return subprocess.run(command, check=False).returncode


def run_local(runs: Sequence[Run]) -> dict[str, int]:
    """Runs the unfinished `runs` one after another; returns {name: exit code}."""
    todo = [run for run in runs if status(run) != "finished"]
    codes = {}
    for i, run in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {run.name}: {shlex.join(run.command)}", flush=True)
        codes[run.name] = _execute(run.command)
        if codes[run.name] == PREEMPTED:
            # The run saved a checkpoint and stopped on SIGTERM: the sweep was preempted
            # (or stopped by the user), so starting the next point would defeat the stop.
            break
    return codes


def write_sbatch(runs: Sequence[Run], root: str) -> str:
    """Writes ROOT/sweep_points.txt (one command per line) and ROOT/sweep.sbatch, a job array
    whose task i runs line i+1; returns the sbatch path."""
    points = os.path.join(root, "sweep_points.txt")
    with open(points, "w") as f:
        f.writelines(shlex.join(run.command) + "\n" for run in runs)
    job = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(root.rstrip("/")) or "sweep")
    script = f"""#!/bin/bash
# {len(runs)} vlmjax sweep points as a SLURM job array, written by `vlmjax sweep --launcher slurm`.
# Task i runs line i+1 of sweep_points.txt. Rerunning the sweep command rewrites both files
# with the points not finished yet.
#SBATCH --job-name=sweep-{job}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --output={root}/slurm-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
# A point stopped by SIGTERM (preemption, or 2 minutes before the time limit) saves a
# checkpoint and exits {PREEMPTED}; its task is then requeued, at most VLMJAX_MAX_RESTARTS
# (default 100) times, and resumes from that checkpoint (as launch/slurm.sbatch does).
set -euo pipefail
cd {shlex.quote(os.getcwd())}
command=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(points)})
echo "$(date) sweep point $SLURM_ARRAY_TASK_ID: $command"
(eval "exec $command") &
pid=$!
forward() {{ interrupted=1; kill -TERM "$pid" 2>/dev/null || true; }}
trap forward TERM
while :; do  # `wait` also returns when the trap runs: then wait again, for the run's status
  interrupted=0 status=0
  wait "$pid" || status=$?
  ((interrupted)) || break
done
if ((status == {PREEMPTED})); then
  task="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
  if ((${{SLURM_RESTART_COUNT:-0}} < ${{VLMJAX_MAX_RESTARTS:-100}})) \\
    && scontrol show job "$task" 2>/dev/null | grep -qw "Requeue=1"; then
    echo "$(date) preempted with a checkpoint: requeueing $task to resume"
    scontrol requeue "$task" || echo "$(date) scontrol requeue failed: run the sweep again" >&2
  else
    echo "$(date) preempted with a checkpoint: run the sweep again to resume"
  fi
fi
exit "$status"
"""
    path = os.path.join(root, "sweep.sbatch")
    with open(path, "w") as f:
        f.write(script)
    return path


def submit(path: str, sbatch_args: str = "") -> int:
    """`sbatch [args] path` if sbatch is on PATH (else prints that command); its exit code."""
    command = ["sbatch", *shlex.split(sbatch_args), path]
    if shutil.which("sbatch") is None:
        print(f"sbatch is not on PATH; submit with:\n  {shlex.join(command)}")
        return 0
    print(shlex.join(command), flush=True)
    return subprocess.run(command, check=False).returncode


# --- reports ----------------------------------------------------------------------------------


def write_csv(runs: Sequence[Run], statuses: Mapping[str, str], path: str) -> None:
    """One row per run: name, each swept key, status, then every final metric."""
    metrics = {run.name: final_metrics(run) or {} for run in runs}
    metric_keys = sorted({key for values in metrics.values() for key in values})
    swept = sorted({key for run in runs for key in run.values})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", *swept, "status", *metric_keys])
        for run in runs:
            row = [run.name, *(_csv_value(run.values[key]) for key in swept), statuses[run.name]]
            writer.writerow(row + [metrics[run.name].get(key, "") for key in metric_keys])


def _csv_value(value: Any) -> Any:
    return value if isinstance(value, int | float | str) else value_text(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plot(runs: Sequence[Run], metric: str, path: str) -> bool:
    """Saves `metric` against each swept key, a subplot per key and a point per finished run.

    A key whose values are all positive and span more than a decade gets a log axis; a
    non-numeric key, one tick per value. Returns False (and writes nothing) if no finished
    run has `metric`.
    """
    done = []  # (run, value) for each finished run with a numeric `metric`
    for run in runs:
        value = (final_metrics(run) or {}).get(metric)
        if _is_number(value):
            done.append((run, value))
    swept = sorted({key for run in runs for key in run.values})
    if not done or not swept:
        return False
    # The object API, not pyplot: no global backend switch, no figure registry to leak into.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(swept), 3.2), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(swept), squeeze=False)[0], swept, strict=True):
        # Distinct values over all runs (not just finished ones), so axes stay put as runs end.
        distinct = {_compact(run.values[key]): _plain(run.values[key]) for run in runs}
        ys = [y for _, y in done]
        if all(_is_number(v) for v in distinct.values()):
            ax.scatter([_plain(run.values[key]) for run, _ in done], ys)
            low, high = min(distinct.values()), max(distinct.values())
            if low > 0 and high / low > 10:
                ax.set_xscale("log")
                ax.minorticks_off()
            if len(distinct) <= 12:
                ax.set_xticks(list(distinct.values()), list(distinct))
        else:  # categories, in sweep order
            index = {label: i for i, label in enumerate(distinct)}
            ax.scatter([index[_compact(run.values[key])] for run, _ in done], ys)
            ax.set_xticks(range(len(index)), list(index))
        ax.margins(x=0.1)  # keep the end points off the frame
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric}: {len(done)} of {len(runs)} runs")
    fig.savefig(path, dpi=100)
    return True


def write_reports(runs: Sequence[Run], root: str, metric: str, failed: Iterable[str] = ()):
    """ROOT/sweep.csv and ROOT/sweep_<metric>.png from what has finished; prints their paths."""
    os.makedirs(root, exist_ok=True)
    statuses = {run.name: status(run) for run in runs}
    statuses.update({name: "failed" for name in failed if statuses[name] != "finished"})
    csv_path = os.path.join(root, "sweep.csv")
    write_csv(runs, statuses, csv_path)
    png_path = os.path.join(root, f"sweep_{re.sub(r'[^A-Za-z0-9._-]', '_', metric)}.png")
    if plot(runs, metric, png_path):
        print(f"wrote {csv_path} and {png_path}")
    else:
        print(f"wrote {csv_path} (no plot: no finished run has {metric!r} yet)")


# --- command line -----------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `sweep` command to an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "sweep",
        help="run an experiment's get_sweep() points, one workdir each",
        description="Runs (or resumes) every point of the experiment's get_sweep(arg) in "
        "WORKDIR/<name>; --config.KEY=VALUE applies to every point and wins over the sweep.",
    )
    parser.add_argument("--config", required=True, help="experiments/NAME.py[:arg]")
    parser.add_argument("--workdir", required=True, help="holds one workdir per point")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--dry_run", action="store_true", help="list the runs, run nothing")
    parser.add_argument("--metric", default="eval/heldout/accuracy", help="metric to plot")
    parser.add_argument(
        "--sbatch_args", default="", help='extra sbatch options: --sbatch_args="-p gpu --gpus=1"'
    )
    return parser


def main(args: argparse.Namespace, overrides: Sequence[tuple[str, str]]) -> int:
    """Runs `vlmjax sweep`: 0 when every point finished (or was submitted), 1 if any point
    failed, 2 for a config error (found before anything runs), 143 when a local point was
    preempted (SIGTERM, checkpoint saved): the sweep stops there and a rerun resumes it."""
    try:
        runs = plan(args.config, args.workdir, overrides)
    except config_lib.ConfigError as e:
        print(f"vlmjax sweep: config error: {e}", file=sys.stderr)
        return 2
    root = os.path.abspath(args.workdir)
    swept = {key for run in runs for key in run.overrides}
    if fixed := sorted(swept & {key for key, _ in overrides}):
        print(f"warning: the command line sets swept key(s) {fixed} for every run", file=sys.stderr)

    statuses = [status(run) for run in runs]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in STATUSES if s in statuses)
    print(f"sweep {args.config}: {len(runs)} runs in {root} ({counts})")
    width = max(len(run.name) for run in runs)
    for run, state in zip(runs, statuses, strict=True):
        flags = " ".join(f"--config.{k}={value_text(v)}" for k, v in run.overrides.items())
        print(f"  {state:<9} {run.name:<{width}}  {flags}")

    todo = [run for run, state in zip(runs, statuses, strict=True) if state != "finished"]
    code, failed = 0, []
    if todo and not args.dry_run and args.launcher == "local":
        codes = run_local(todo)
        if preempted := [name for name, rc in codes.items() if rc == PREEMPTED]:
            print(
                f"{preempted[0]} was preempted and saved a checkpoint; the sweep stopped "
                "there: run the same command again to resume it"
            )
            codes.pop(preempted[0])
            code = PREEMPTED
        if failed := [name for name, rc in codes.items() if rc != 0]:
            print(f"{len(failed)} of {len(todo)} runs failed (rerun the sweep to retry them):")
            for name in failed:
                print(f"  {name}: exit code {codes[name]}")
            code = code or 1  # a preemption's 143 wins: a scheduler requeues on it
    elif todo and not args.dry_run and args.launcher == "slurm":
        os.makedirs(root, exist_ok=True)
        if started := [run.name for run in todo if os.path.isdir(run.workdir)]:
            # A started run may still be running in an earlier job: two jobs, one workdir.
            print(f"note: started runs {started} are submitted again; cancel older jobs of them")
        code = submit(write_sbatch(todo, root), args.sbatch_args)
    write_reports(runs, root, args.metric, failed)
    return code
