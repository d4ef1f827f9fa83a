"""The launchers on a real scheduler: a one-node SLURM cluster on this machine
(launch/testing/slurm_local.sh) runs launch/slurm.sbatch with 2 tasks x 4 CPU devices,
preempts and requeues it, and runs `vlmjax sweep --launcher slurm` as a job array.

The cluster needs root (it installs Debian packages and starts daemons). Where it cannot
start, these tests skip with the script's reason, except under VLMJAX_REQUIRE_SLURM=1
(.ci/run sets it on machines where it starts the cluster), where that is a failure: a CI
that skipped them would hide a broken launcher.
"""

import csv
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "launch", "testing", "slurm_local.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
TINY = os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny"
# A run long enough to be interrupted between its first steps and its end (~0.2 s a step
# for 2 tasks on 2 cores), with one periodic checkpoint and an evaluation at the end.
RUN = {
    "total_steps": 16,
    "log_every": 1,
    "eval_every": 0,
    "checkpoint_every": 8,
    "optimizer.warmup_steps": 2,
    "model.depth": 1,  # a smaller model compiles faster; each task compiles its own
    "model.width": 32,
    "model.mlp_dim": 32,
    "eval_batch_size": 64,
}
TWO_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
PREEMPTED = 143  # launch/slurm.sbatch's exit status for a run stopped with a checkpoint


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster (started here if need be, and then stopped afterwards);
    gives the environment for its jobs."""
    required = os.environ.get("VLMJAX_REQUIRE_SLURM") == "1"
    give_up = pytest.fail if required else pytest.skip
    if os.geteuid() != 0:
        give_up("the local SLURM cluster needs root (launch/testing/slurm_local.sh)")
    was_running = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    start = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        give_up(f"no local SLURM cluster: {(start.stdout + start.stderr).strip()[-1000:]}")
    # Jobs of one config share compiled programs: most of a tiny job is compiling.
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    yield _env(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if not was_running:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=120)


def _env(**extra: str) -> dict[str, str]:
    """The environment jobs get (sbatch exports it): this Python's bin first on PATH (its
    `vlmjax`), no SLURM_* of an enclosing job and no 8-device XLA_FLAGS of conftest."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("SLURM_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env["JAX_PLATFORMS"] = "cpu"
    return {**env, **extra}


def _sbatch(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", *args], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _job(job: str) -> dict[str, str]:
    """`scontrol show job`'s fields of `job` (the first array element for an array)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    line = out.stdout.splitlines()[0] if out.stdout.strip() else ""
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def _wait(job: str, timeout: float) -> dict[str, str]:
    """Waits until `job` (every element of an array) has ended; returns its fields."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        states = re.findall(r"JobState=(\S+)", out.stdout)
        if states and all(s in TERMINAL for s in states):
            # Ended for good: a job requeues itself before its script exits, never after.
            return _job(job)
        assert time.time() < deadline, f"job {job} still {states} after {timeout} s"
        time.sleep(0.5)


def _sacct(job: str) -> list[tuple[str, str, str]]:
    """(job id, state, exit code) of each of `job`'s end records: `sacct --completion`
    (the test cluster keeps job completion records, not a slurmdbd database)."""
    out = subprocess.run(
        ["sacct", "--completion", "-n", "-P", "-j", job, "-o", "JobID,State,ExitCode"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return [tuple(line.split("|")) for line in out.stdout.splitlines() if line]


def _wait_for_steps(workdir: str, job: str, steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(_losses(workdir)) < steps:
        assert _job(job).get("JobState") in ("PENDING", "RUNNING"), _job(job)
        assert time.time() < deadline, f"job {job} logged no {steps} steps in {timeout} s"
        time.sleep(0.2)


def _train_job(env, tmp_path, name: str, data_dir: str, sbatch_args=(), **overrides) -> str:
    """Submits `sbatch launch/slurm.sbatch TINY WORKDIR` (2 tasks x 4 CPU devices); its id."""
    workdir = str(tmp_path / name)
    flags = [f"--config.data.data_dir={data_dir}"]
    flags += [f"--config.{k}={v}" for k, v in {**RUN, **overrides}.items()]
    args = [*TWO_TASKS, f"--output={tmp_path}/{name}.out", "--time=10", *sbatch_args]
    return _sbatch([*args, SBATCH, TINY, workdir, *flags], {**env, "VLMJAX_CPU_DEVICES": "4"})


def _losses(workdir: str) -> dict[int, float]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return {}
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _final(workdir: str) -> dict[str, float]:
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        return json.load(f)["metrics"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, data_dir):
    """An uninterrupted 2-task sbatch run of RUN: (workdir, job id, its output)."""
    tmp_path = tmp_path_factory.mktemp("slurm")
    job = _train_job(slurm, tmp_path, "straight", data_dir)
    info = _wait(job, timeout=180)
    output = (tmp_path / "straight.out").read_text()
    assert info["JobState"] == "COMPLETED", output[-3000:]
    return str(tmp_path / "straight"), job, output


def test_sbatch_two_tasks_equal_one_process(uninterrupted, tiny_config, tmp_path):
    workdir, job, output = uninterrupted
    assert _sacct(job) == [(job, "COMPLETED", "0:0")]
    # Both tasks joined one run through SLURM's variables, 4 devices each.
    assert "joining slurm run as process 0 of 2" in output
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1} over 8 devices (2 processes)" in output
    assert f"job {job} restart 0" in output and "finished" in output

    from vlmjax import train  # one process, 8 devices (conftest), the same config and seed

    one = str(tmp_path / "one")
    metrics = train.train(tiny_config(RUN), one)
    two, single = _losses(workdir), _losses(one)
    assert sorted(two) == list(range(1, RUN["total_steps"] + 1))
    np.testing.assert_allclose([two[s] for s in sorted(single)], list(single.values()), rtol=1e-5)
    final = _final(workdir)
    assert final and final.keys() == metrics.keys()
    assert final == pytest.approx(metrics, abs=1e-5)


def test_preempted_job_checkpoints_everywhere_requeues_and_finishes(
    slurm, uninterrupted, tmp_path, data_dir
):
    """SIGTERM to the batch shell only (`sbatch --signal=B:TERM@T` at a time limit): the
    script passes it to the tasks, which stop at one step with a checkpoint; it requeues
    the job (the template has --requeue), which resumes there and ends as the straight run."""
    job = _train_job(slurm, tmp_path, "preempted", data_dir)
    _wait_for_steps(str(tmp_path / "preempted"), job, 3)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True)
    info = _wait(job, timeout=240)
    output = (tmp_path / "preempted.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output[-3000:]

    stopped = re.findall(r"preempted: stopped after step (\d+)", output)
    assert len(stopped) == 2 and len(set(stopped)) == 1, output[-3000:]  # each task, one step
    step = int(stopped[0])
    assert 3 <= step < RUN["total_steps"]
    assert f"requeueing job {job}" in output and f"job {job} restart 1" in output
    assert f"resumed from step {step}" in output
    # The first attempt's record is the requeue (PENDING again), the last the finished run.
    assert _sacct(job)[-1] == (job, "COMPLETED", "0:0") and len(_sacct(job)) == 2

    straight = uninterrupted[0]
    resumed = _losses(str(tmp_path / "preempted"))
    assert sorted(resumed) == list(range(1, RUN["total_steps"] + 1))  # nothing redone
    assert resumed == _losses(straight)  # the same curve, bit for bit
    assert _final(str(tmp_path / "preempted")) == _final(straight)


def test_preempted_job_without_requeue_exits_with_the_preemption_status(slurm, tmp_path, data_dir):
    """`scancel --signal=TERM` (the job's tasks) on a --no-requeue job: checkpoint, exit 143."""
    job = _train_job(slurm, tmp_path, "stopped", data_dir, ["--no-requeue"])
    _wait_for_steps(str(tmp_path / "stopped"), job, 2)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    info = _wait(job, timeout=120)
    output = (tmp_path / "stopped.out").read_text()
    assert info["ExitCode"] == f"{PREEMPTED}:0" and info["Restarts"] == "0", output[-3000:]
    assert _sacct(job) == [(job, "FAILED", f"{PREEMPTED}:0")]
    assert "preempted with a checkpoint (no --requeue)" in output
    [step] = set(re.findall(r"preempted: stopped after step (\d+)", output))
    saved = os.listdir(tmp_path / "stopped" / "checkpoints")
    assert step in saved and not os.path.exists(tmp_path / "stopped" / "final_metrics.json")


def test_task_count_that_does_not_fit_the_mesh_fails_at_once(slurm, tmp_path, data_dir):
    """2 tasks x 4 devices for a mesh of 4: an error naming the config keys, and the log the
    SLURM variables the 2 came from, before anything compiles."""
    job = _train_job(slurm, tmp_path, "bad_mesh", data_dir, **{"mesh.data": 4})
    info = _wait(job, timeout=120)
    output = (tmp_path / "bad_mesh.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", output[-3000:]
    assert "mesh.data=4, mesh.fsdp=1, mesh.tensor=1 needs 4 devices but 8 are available" in output
    assert "from SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=0" in output
    assert "step 1/" not in output


def test_node_list_that_cannot_be_parsed_fails_naming_the_variable(slurm, tmp_path):
    # A real job step whose node list is garbled on its way to vlmjax (srun sets the real one).
    garble = 'SLURM_STEP_NODELIST="vm[0" exec vlmjax train --config "$0" --workdir "$1"'
    command = ["srun", "--ntasks=2", "--gpus-per-node=0", "--time=2", "bash", "-c", garble]
    start = time.time()
    result = subprocess.run(
        [*command, TINY, str(tmp_path / "w")],
        capture_output=True,
        text=True,
        env=slurm,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot parse SLURM_STEP_NODELIST='vm[0'" in result.stderr
    assert time.time() - start < 60 and not os.path.exists(tmp_path / "w")


# Like tests/test_sweep.py's cut-down tiny ViT: each point is one process, seconds long.
FAST = [
    "--config.total_steps=4",
    "--config.eval_every=4",
    "--config.log_every=2",
    "--config.checkpoint_every=4",
    "--config.optimizer.warmup_steps=0",
    "--config.batch_size=16",
    "--config.eval_batch_size=64",
    "--config.model.width=32",
    "--config.model.mlp_dim=32",
    "--config.model.depth=1",
    "--config.data.num_threads=1",
    "--config.data.prefetch=1",
    "--config.data.augment=none",
]


def _sweep(env, spec: str, root, data_dir: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vlmjax.cli", "sweep", "--config", spec, "--workdir"]
    command += [str(root), "--launcher", "slurm", f"--config.data.data_dir={data_dir}", *args]
    result = subprocess.run(
        command + FAST, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_sweep_job_array_runs_every_point_and_a_rerun_skips_them(slurm, tmp_path, data_dir):
    spec = tmp_path / "exp.py"
    spec.write_text(
        f"from vlmjax import sweep\n"
        f"import importlib.util\n"
        f"_spec = importlib.util.spec_from_file_location('base', {TINY.split(':')[0]!r})\n"
        f"_base = importlib.util.module_from_spec(_spec)\n"
        f"_spec.loader.exec_module(_base)\n"
        f"get_config = _base.get_config\n\n"
        f"def get_sweep(arg=None):\n"
        f"    return sweep.product({{'optimizer.learning_rate': [1e-3, 1e-2], 'seed': [0, 1]}})\n"
    )
    root = tmp_path / "sweep"
    first = _sweep(slurm, f"{spec}:tiny", root, data_dir)
    assert "(4 pending)" in first.stdout
    [job] = re.findall(r"Submitted batch job (\d+)", first.stdout)
    _wait(job, timeout=240)
    # The array's elements: task i has its own job id, and its completion record under it.
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    elements = dict(re.findall(r"JobId=(\d+) ArrayJobId=\d+ ArrayTaskId=(\d+)", out.stdout))
    assert sorted(elements.values()) == ["0", "1", "2", "3"], out.stdout
    records = _sacct(",".join(elements))
    assert sorted(r[0] for r in records) == sorted(elements), records
    assert {r[1:] for r in records} == {("COMPLETED", "0:0")}

    # The rerun submits nothing; its report plots a metric every finished point has.
    with open(sorted(root.glob("*/final_metrics.json"))[0]) as f:
        [metric] = [key for key in json.load(f)["metrics"] if key.endswith("accuracy")][:1]
    again = _sweep(slurm, f"{spec}:tiny", root, data_dir, f"--metric={metric}")
    assert "(4 finished)" in again.stdout and "Submitted" not in again.stdout
    with open(root / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["finished"] * 4
    for row in rows:
        assert os.path.exists(root / row["name"] / "final_metrics.json")
        assert 0.0 <= float(row[metric]) <= 1.0
    [plot] = root.glob("sweep_*.png")
    assert plot.stat().st_size > 0 and plot.name == f"sweep_{metric.replace('/', '_')}.png"
    logs = sorted(p.name for p in root.glob("slurm-*.out"))
    assert logs == [f"slurm-{job}_{i}.out" for i in range(4)]


def test_the_cluster_script_is_idempotent(slurm):
    start = time.time()
    result = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "already running" in result.stdout, result.stderr
    assert time.time() - start < 10
    assert subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
