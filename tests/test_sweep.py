"""Sweeps: building points, naming runs, checking configs, and running them locally / on SLURM."""

import argparse
import csv
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from vlmjax import config as config_lib
from vlmjax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = os.path.join(ROOT, "experiments", "shapes_vit.py")

# A few steps of a smaller tiny ViT: each point is a child process that imports JAX and
# compiles (~10 s on a 2-core CPU), so the model and the eval are cut down as well.
FAST = [
    "--config.total_steps=4",
    "--config.eval_every=4",
    "--config.log_every=2",
    "--config.checkpoint_every=4",
    "--config.optimizer.warmup_steps=0",
    "--config.batch_size=16",
    "--config.eval_batch_size=64",
    "--config.evals.heldout.max_examples=64",
    "--config.model.width=32",
    "--config.model.mlp_dim=32",
    "--config.model.depth=1",
    "--config.data.num_threads=1",
    "--config.data.prefetch=1",
    "--config.data.augment=none",
]


def _experiment(tmp_path, sweep_expr: str) -> str:
    """An experiment file: shapes_vit's get_config, and get_sweep returning `sweep_expr`."""
    path = tmp_path / "exp.py"
    path.write_text(
        "import importlib.util\n"
        "from vlmjax import sweep\n"
        f"_spec = importlib.util.spec_from_file_location('exp_base', {VIT!r})\n"
        "_base = importlib.util.module_from_spec(_spec)\n"
        "_spec.loader.exec_module(_base)\n"
        "get_config = _base.get_config\n\n"
        "def get_sweep(arg=None):\n"
        f"    return {sweep_expr}\n"
    )
    return str(path)


def _main(argv: list[str]) -> int:
    """`vlmjax sweep ...` as cli.py runs it: split the overrides, parse, call sweep.main."""
    rest, overrides = config_lib.split_overrides(argv)
    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    parser = sweep.add_parser(commands)
    return sweep.main(parser.parse_args(rest), overrides)


@pytest.fixture
def no_runs(monkeypatch):
    """Fails the test if the sweep starts any child process."""

    def fail(command):
        raise AssertionError(f"the sweep started {command}")

    monkeypatch.setattr(sweep, "_execute", fail)


def test_product_zip_and_their_combinations():
    assert sweep.product({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    assert sweep.zip_({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    crossed = sweep.product(sweep.zip_({"a": [1, 2], "b": [3, 4]}), {"c": [5, 6]})
    assert crossed == [
        {"a": 1, "b": 3, "c": 5},
        {"a": 1, "b": 3, "c": 6},
        {"a": 2, "b": 4, "c": 5},
        {"a": 2, "b": 4, "c": 6},
    ]
    # zip_ of a product with an explicit list of points; a plain list of dicts is a part too.
    paired = sweep.zip_(sweep.product({"a": [1, 2]}, {"b": [3]}), [{"c": 7}, {"c": 8}])
    assert paired == [{"a": 1, "b": 3, "c": 7}, {"a": 2, "b": 3, "c": 8}]
    assert len(sweep.product({"lr": np.logspace(-4, -2, 3)}, {"depth": range(2, 5)})) == 9

    with pytest.raises(config_lib.ConfigError, match="equal lengths"):
        sweep.zip_({"a": [1, 2], "b": [3]})
    with pytest.raises(config_lib.ConfigError, match="set by two factors"):
        sweep.product({"a": [1]}, {"a": [2]})
    with pytest.raises(config_lib.ConfigError, match="must be a list of values"):
        sweep.product({"model.pool": "cls"})  # would otherwise sweep "c", "l", "s"


def test_run_names_are_stable_unique_and_safe():
    point = {"optimizer.learning_rate": 1e-3, "model.depth": 2}
    assert sweep.run_name(point) == "model.depth=2,optimizer.learning_rate=0.001"
    assert sweep.run_name(dict(reversed(point.items()))) == sweep.run_name(point)
    assert sweep.run_name({"lr": np.float64(3e-5)}) == sweep.run_name({"lr": 3e-5}) == "lr=3e-5"

    points = [
        {"lr": 0.0012345678},
        {"lr": 0.0012345679},  # equal to 6 digits
        {"name": "a/b"},
        {"name": "a_b"},  # what "a/b" sanitises to
        {"name": "a b"},
        {"mesh": (2, 2)},
        {"flag": True},
        {"flag": False},
        {"long": "x" * 300},
        {"long": "x" * 299 + "y"},
        {},
    ]
    names = [sweep.run_name(p) for p in points]
    assert len(set(names)) == len(names), names
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._,=+-]{1,200}", name), name


def test_values_go_through_the_command_line_text(tiny_config):
    config = tiny_config()
    for key, value in [("optimizer.learning_rate", 3e-5), ("model.pool", "cls"), ("seed", 3)]:
        config_lib.override(config, key, sweep.value_text(value))
    config_lib.override(config, "model.scan", sweep.value_text(np.bool_(True)))
    assert config.optimizer.learning_rate == 3e-5 and config.model.pool == "cls"
    assert config.seed == 3 and config.model.scan is True


def test_bad_sweep_key_is_a_config_error_before_anything_runs(tmp_path, capsys, no_runs):
    spec = _experiment(tmp_path, 'sweep.product({"optimizer.learning_rat": [1e-3, 1e-2]})')
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optimizer.learning_rate'"):
        sweep.plan(spec, str(tmp_path / "sweep"))
    assert _main(["--config", spec, "--workdir", str(tmp_path / "sweep")]) == 2
    assert "did you mean 'optimizer.learning_rate'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "sweep")

    bad_value = _experiment(tmp_path, 'sweep.product({"model.depth": ["deep"]})')
    with pytest.raises(config_lib.ConfigError, match="model.depth=deep.*cannot parse"):
        sweep.plan(bad_value, str(tmp_path / "sweep"))


def test_command_line_overrides_win_over_the_sweep(tmp_path, capsys):
    runs = sweep.plan(VIT + ":tiny", str(tmp_path), [("optimizer.learning_rate", "0.5")])
    assert len(runs) == 4 and len({run.name for run in runs}) == 4
    assert {run.values["optimizer.learning_rate"] for run in runs} == {0.5}
    assert all(run.command[-1] == "--config.optimizer.learning_rate=0.5" for run in runs)


def test_dry_run_lists_four_pending_runs(tmp_path, capsys, no_runs):
    root = tmp_path / "sweep"
    assert _main(["--config", VIT + ":tiny", "--workdir", str(root), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "(4 pending)" in out
    listed = [line.split() for line in out.splitlines() if line.startswith("  pending")]
    assert [fields[1] for fields in listed] == [
        "model.depth=2,optimizer.learning_rate=0.001",
        "model.depth=4,optimizer.learning_rate=0.001",
        "model.depth=2,optimizer.learning_rate=0.003",
        "model.depth=4,optimizer.learning_rate=0.003",
    ]
    assert listed[0][2:] == ["--config.optimizer.learning_rate=0.001", "--config.model.depth=2"]
    assert sorted(os.listdir(root)) == ["sweep.csv"]  # no run workdirs


def test_every_experiment_sweep_builds(tmp_path):
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
        if "def get_sweep" in open(path).read():
            assert sweep.plan(path, str(tmp_path)), path


def test_failed_points_are_reported_and_retried(tmp_path, capsys, monkeypatch):
    calls = []

    def execute(command):
        calls.append(command)
        return 1 if "model.depth=4" in " ".join(command) else 0

    monkeypatch.setattr(sweep, "_execute", execute)
    root = tmp_path / "sweep"
    assert _main(["--config", VIT + ":tiny", "--workdir", str(root)]) == 1
    assert len(calls) == 4  # a failure does not stop the others
    out = capsys.readouterr().out
    assert "2 of 4 runs failed" in out
    assert "model.depth=4,optimizer.learning_rate=0.001: exit code 1" in out
    with open(root / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["pending", "failed", "pending", "failed"]


def test_slurm_writes_a_job_array_of_the_unfinished_points(tmp_path, monkeypatch, capsys, no_runs):
    bash = shutil.which("bash")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch
    root = tmp_path / "sweep"
    runs = sweep.plan(VIT + ":tiny", str(root))
    # Mark the second point finished: it leaves the array and shows in the report.
    os.makedirs(runs[1].workdir)
    with open(os.path.join(runs[1].workdir, sweep.FINAL_METRICS), "w") as f:
        json.dump({"step": runs[1].total_steps, "metrics": {"eval/heldout/accuracy": 0.75}}, f)

    argv = ["--config", VIT + ":tiny", "--workdir", str(root), "--launcher", "slurm"]
    assert _main(argv + ["--sbatch_args", "-p gpu --time=1:00:00"]) == 0
    out = capsys.readouterr().out
    assert f"sbatch -p gpu --time=1:00:00 {root}/sweep.sbatch" in out

    script = (root / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2\n" in script
    assert subprocess.run([bash, "-n", str(root / "sweep.sbatch")]).returncode == 0
    lines = (root / "sweep_points.txt").read_text().splitlines()
    assert lines == [shlex.join(run.command) for run in (runs[0], runs[2], runs[3])]

    with open(root / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["pending", "finished", "pending", "pending"]
    assert rows[1]["eval/heldout/accuracy"] == "0.75" and rows[1]["model.depth"] == "4"
    assert (root / "sweep_eval_heldout_accuracy.png").exists()

    # Task i runs line i+1: swap in harmless commands and run the script as task 1 would.
    (root / "sweep_points.txt").write_text("echo point-0\necho 'point 1'\necho point-2\n")
    env = {"SLURM_ARRAY_TASK_ID": "1", "PATH": os.path.dirname(bash) + ":/usr/bin:/bin"}
    task = subprocess.run([bash, str(root / "sweep.sbatch")], env=env, capture_output=True)
    assert task.returncode == 0 and task.stdout.decode().splitlines()[-1] == "point 1"

    # A point that exits 143 (preempted, checkpoint saved) requeues its own array task, up to
    # VLMJAX_MAX_RESTARTS times; `scontrol` here is a stand-in that records its arguments.
    (root / "sweep_points.txt").write_text("echo point-0\nsh -c 'exit 143'\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        f'#!{bash}\necho "$@" >> {tmp_path}/scontrol.log\n'
        '[ "$1" = show ] && echo "JobId=78 ArrayJobId=77 ArrayTaskId=1 Requeue=1"\nexit 0\n'
    )
    (fake / "scontrol").chmod(0o755)
    env.update(SLURM_ARRAY_JOB_ID="77", PATH=f"{fake}:{env['PATH']}")
    task = subprocess.run([bash, str(root / "sweep.sbatch")], env=env, capture_output=True)
    assert task.returncode == 143, task.stderr
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [
        "show job 77_1",
        "requeue 77_1",
    ]
    env.update(SLURM_RESTART_COUNT="3", VLMJAX_MAX_RESTARTS="3")
    task = subprocess.run([bash, str(root / "sweep.sbatch")], env=env, capture_output=True)
    assert task.returncode == 143 and b"run the sweep again to resume" in task.stdout
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1


def test_preempted_point_stops_the_local_sweep(tmp_path, capsys, monkeypatch):
    calls = []

    def execute(command):
        calls.append(command)
        return 143 if len(calls) == 2 else 0

    monkeypatch.setattr(sweep, "_execute", execute)
    root = tmp_path / "sweep"
    assert _main(["--config", VIT + ":tiny", "--workdir", str(root)]) == 143
    assert len(calls) == 2  # the points after the preempted one do not start
    out = capsys.readouterr().out
    assert "model.depth=4,optimizer.learning_rate=0.001 was preempted" in out
    assert "failed" not in out


def test_final_metrics_name_matches_train():
    from vlmjax import train

    assert sweep.FINAL_METRICS == train.FINAL_METRICS


@pytest.mark.slow
def test_local_sweep_runs_reports_and_then_skips(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device per child: faster compiles
    spec = _experiment(
        tmp_path, 'sweep.product({"optimizer.learning_rate": [1e-4, 1e-2], "seed": [3]})'
    )
    root = tmp_path / "sweep"
    argv = ["--config", spec, "--workdir", str(root), f"--config.data.data_dir={data_dir}", *FAST]
    assert _main(argv) == 0
    assert "(2 pending)" in capsys.readouterr().out

    with open(root / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert {(row["optimizer.learning_rate"], row["seed"]) for row in rows} == {
        ("0.0001", "3"),
        ("0.01", "3"),
    }
    for row in rows:
        assert row["status"] == "finished"
        assert 0.0 <= float(row["eval/heldout/accuracy"]) <= 1.0
        assert float(row["eval/heldout/loss"]) > 0.0
        assert os.path.exists(root / row["name"] / "checkpoints")
    with Image.open(root / "sweep_eval_heldout_accuracy.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]
        image.verify()

    # Everything is finished: the same command starts no process and only rewrites reports.
    monkeypatch.setattr(sweep, "_execute", lambda command: pytest.fail(f"ran {command}"))
    start = time.time()
    assert _main(argv) == 0
    assert time.time() - start < 5
    assert "(2 finished)" in capsys.readouterr().out
