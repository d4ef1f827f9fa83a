"""Launchers in launch/: shell syntax, the TPU pod script's dry run, the SLURM template's
command line (with a stand-in srun) and the JobSet manifest's process identity."""

import os
import shlex
import shutil
import subprocess

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
BASH = shutil.which("bash")


def _fake_bin(tmp_path, **scripts: str) -> str:
    """A PATH with executables `name` running `body`, then the system's own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def _bash(args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs
    )


@pytest.mark.parametrize("script", ["slurm.sbatch", "tpu_pod.sh"])
def test_shell_syntax(script):
    assert _bash(["-n", os.path.join(LAUNCH, script)]).returncode == 0


def test_tpu_pod_dry_run_prints_the_gcloud_commands(tmp_path):
    # A gcloud that records being called: --dry_run must never reach it.
    path = _fake_bin(tmp_path, gcloud=f"touch {tmp_path}/gcloud-ran; exit 1")
    script = os.path.join(LAUNCH, "tpu_pod.sh")
    args = ["--dry_run", "name", "zone", "--", "vlmjax", "train", "--config", "x"]
    result = _bash([script, *args, "--workdir", "gs://b/w"], env={"PATH": path})
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(tmp_path / "gcloud-ran")
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line[:1] != "#"]
    scp, setup, train = commands
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[-3:] == ["name:vlmjax.tgz", "--zone=zone", "--worker=all"]
    for ssh in (setup, train):
        assert ssh[:8] == "gcloud compute tpus tpu-vm ssh name --zone=zone --worker=all".split()
        assert ssh[8].startswith("--command=") and len(ssh) == 9
    assert "pip install -q -e . 'jax[tpu]'" in setup[8]
    remote = shlex.split(train[8].removeprefix("--command="))
    assert remote[remote.index("vlmjax") :] == shlex.split(
        "vlmjax train --config x --workdir gs://b/w"
    )

    # --no_sync: only the training command; awkward arguments reach the hosts intact.
    odd = ["--config.data.source=a b", "it's", "$HOME"]
    args = ["--dry_run", "--no_sync", "n", "z", "--", "vlmjax", *odd]
    result = _bash([script, *args], env={"PATH": path})
    [train] = [shlex.split(line) for line in result.stdout.splitlines()]
    remote = shlex.split(train[8].removeprefix("--command="))
    assert remote[-4:] == ["vlmjax", *odd]
    assert not os.path.exists(tmp_path / "gcloud-ran")


def test_tpu_pod_usage(tmp_path):
    script = os.path.join(LAUNCH, "tpu_pod.sh")
    assert _bash([script, "--help"]).returncode == 0
    assert "TPU_NAME ZONE" in _bash([script, "--help"]).stdout
    for bad in ([], ["name", "zone"], ["name", "zone", "--"], ["--bogus", "n", "z", "--", "x"]):
        result = _bash([script, *bad])
        assert result.returncode == 2 and "TPU_NAME ZONE" in result.stderr, bad


def _fake_run(finish: bool) -> str:
    """A stand-in `srun ... vlmjax train ... --workdir W`: prints its environment and
    arguments, and leaves W as a finished (or a preempted) run leaves it."""
    marks = """printf '{"total_steps": 6}' > "$w/config.json"\n"""
    if finish:
        marks += """printf '{"step": 6, "metrics": {}}' > "$w/final_metrics.json"\n"""
    return (
        'echo "XLA_FLAGS=$XLA_FLAGS JAX_PLATFORMS=${JAX_PLATFORMS:-}"; echo srun "$@"\n'
        'while [ "$1" != --workdir ]; do shift; done; w=$2; mkdir -p "$w"\n' + marks
    )


def test_slurm_template_runs_srun_with_config_workdir_and_overrides(tmp_path):
    path = _fake_bin(tmp_path, srun=_fake_run(finish=True))
    script = os.path.join(LAUNCH, "slurm.sbatch")
    workdir = str(tmp_path / "w")
    result = _bash([script, "exp.py:tiny", workdir, "--config.seed=1"], env={"PATH": path})
    assert result.returncode == 0, result.stderr
    [xla] = [line for line in result.stdout.splitlines() if line.startswith("XLA_FLAGS=")]
    [srun] = [line for line in result.stdout.splitlines() if line.startswith("srun ")]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla
    assert srun == (
        f"srun --kill-on-bad-exit=1 vlmjax train --config exp.py:tiny --workdir {workdir} "
        "--config.seed=1"
    )
    assert result.stdout.splitlines()[-1].endswith(" finished")
    # Config and workdir from the environment, overrides still from the command line.
    env = {"PATH": path, "VLMJAX_CONFIG": "e.py", "VLMJAX_WORKDIR": workdir}
    result = _bash([script, "--config.seed=2"], env=env)
    [srun] = [line for line in result.stdout.splitlines() if line.startswith("srun ")]
    assert srun.endswith(f"--config e.py --workdir {workdir} --config.seed=2")
    assert _bash([script], env={"PATH": path}).returncode == 2
    # Simulated CPU devices instead of GPUs.
    result = _bash([script, "e.py", workdir], env={"PATH": path, "VLMJAX_CPU_DEVICES": "4"})
    [xla] = [line for line in result.stdout.splitlines() if line.startswith("XLA_FLAGS=")]
    assert "--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu" in xla
    assert "xla_gpu" not in xla

    header = open(script).read().split("set -euo pipefail")[0]
    options = [line.split()[1] for line in header.splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in options and "--gpus-per-node=8" in options
    assert not any(o.startswith("--gpus-per-task") for o in options)


@pytest.mark.parametrize("requeue", [True, False])
def test_slurm_template_preempted_run_requeues_or_exits_143(tmp_path, requeue):
    """A `vlmjax train` that stopped early with exit 0 (a preemption checkpoint): the script
    requeues a job that allows it, and exits 143 (tests/test_slurm.py: the real thing)."""
    scontrol = f'echo "$@" >> {tmp_path}/scontrol.log; echo "JobId=7 Requeue={int(requeue)}"'
    path = _fake_bin(tmp_path, srun=_fake_run(finish=False), scontrol=scontrol)
    script = os.path.join(LAUNCH, "slurm.sbatch")
    env = {"PATH": path, "SLURM_JOB_ID": "7"}
    result = _bash([script, "exp.py", str(tmp_path / "w")], env=env)
    assert result.returncode == 143, result.stdout + result.stderr
    calls = (tmp_path / "scontrol.log").read_text().splitlines()
    assert calls == (["show job 7", "requeue 7"] if requeue else ["show job 7"])
    assert ("requeueing job 7" in result.stdout) == requeue

    # A failed run keeps its exit code and is not requeued.
    path = _fake_bin(tmp_path, srun="exit 3", scontrol=scontrol)
    result = _bash([script, "exp.py", str(tmp_path / "w")], env={**env, "PATH": path})
    assert result.returncode == 3 and "failed with exit code 3" in result.stderr


def test_jobset_gives_each_pod_its_process_identity():
    with open(os.path.join(LAUNCH, "jobset.yaml")) as f:
        manifest = yaml.safe_load(f)
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    assert manifest["spec"]["network"]["enableDNSHostnames"] is True
    [workers] = manifest["spec"]["replicatedJobs"]
    job = workers["template"]["spec"]
    assert workers["replicas"] == 1 and job["completionMode"] == "Indexed"
    [container] = job["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert int(env["VLMJAX_NUM_PROCESSES"]["value"]) == job["parallelism"] == job["completions"]
    address = env["VLMJAX_COORDINATOR_ADDRESS"]["value"]
    assert address == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME):8476"
    # Kubernetes expands $(VAR) only for variables defined earlier in the list.
    names = list(env)
    assert names.index("JOBSET_NAME") < names.index("VLMJAX_COORDINATOR_ADDRESS")
    assert names.index("REPLICATED_JOB_NAME") < names.index("VLMJAX_COORDINATOR_ADDRESS")
    index = env["VLMJAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["ports"][0]["containerPort"] == 8476
    assert container["command"][:2] == ["vlmjax", "train"]
