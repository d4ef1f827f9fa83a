"""Faults injected as they happen in life (issue 12): a run that diverges between two log
steps, two runs on one workdir, kill -9 then a damaged newest step, and a full disk."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from vlmjax import checkpoint, cli, finite, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny"


def _args(workdir, data_dir, **overrides):
    args = ["train", "--config", TINY, "--workdir", workdir, f"--config.data.data_dir={data_dir}"]
    overrides = {"optimizer.warmup_steps": 1, **overrides}
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def _records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _train_steps(workdir):
    return [r["step"] for r in _records(workdir) if "train/loss" in r]


def _kept(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_nonfinite_state_is_never_saved_and_the_good_step_survives(tmp_path, tiny_config):
    """A good run resumed with a learning rate that overflows the parameters at once, with
    a checkpoint every step, keep_checkpoints=1 and no log step before the end: the loss is
    checked on device every step, so step 2 survives and the error names it."""
    workdir = str(tmp_path / "run")
    base = {"total_steps": 6, "log_every": 50, "eval_every": 0, "checkpoint_every": 1}
    base.update({"keep_checkpoints": 1, "optimizer.warmup_steps": 0})
    train.train(tiny_config(base), workdir, stop_at=2)
    bad = {**base, "optimizer.learning_rate": 1e38}
    with pytest.raises(
        finite.NonFiniteError,
        match=r"first became non-finite at step 3 .*newest finite checkpoint is step 2",
    ):
        train.train(tiny_config(bad), workdir)
    assert _kept(workdir) == ["2"]
    assert checkpoint.verify(os.path.join(workdir, "checkpoints", "2")) is None

    # optimizer.skip_nonfinite: the same run goes on; every overflowing update is dropped
    # and counted, and the saved states stay finite (the final evaluation runs on them).
    metrics = train.train(tiny_config({**bad, "optimizer.skip_nonfinite": True}), workdir)
    assert all(v == v for v in metrics.values())
    last = _records(workdir)[-2]  # the final eval record follows the last train record
    assert last["step"] == 6 and last["train/skipped_steps"] == 4
    assert _kept(workdir) == ["6"]


def test_second_run_refused_then_kill9_and_damaged_step_resume_each_step_once(
    tmp_path, data_dir, caplog, capsys
):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "vlmjax.cli"]
    cmd += _args(workdir, data_dir, total_steps=100000, log_every=1, checkpoint_every=2)
    cmd += ["--config.eval_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while len(_train_steps(workdir)) < 7:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.2)
        # A second run on the live run's workdir fails at once, naming the holder.
        start = time.time()
        assert cli.main(_args(workdir, data_dir, total_steps=10)) == 2
        err = capsys.readouterr().err
        assert time.time() - start < 20
        assert "is in use by another run" in err
        assert f"host {socket.gethostname()}, pid {proc.pid}, started 20" in err
        proc.send_signal(signal.SIGKILL)  # at a random moment, often during an async save
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdout.close()

    # The newest step is damaged (same size, other bytes), and an empty step directory is
    # newer still: both are moved aside and the run resumes from the step before.
    root = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in _kept(workdir) if d.isdigit())
    assert len(steps) >= 2, steps
    newest = os.path.join(root, str(steps[-1]), "state")
    arrays = [os.path.join(r, n) for r, _, names in os.walk(newest) for n in names]
    victim = max((p for p in arrays if f"{os.sep}d{os.sep}" in p), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        f.write(b"\xff" * 64)
    os.makedirs(os.path.join(root, str(steps[-1] + 50)))
    total = max(_train_steps(workdir)) + 2
    caplog.set_level("INFO", logger="vlmjax")
    assert cli.main(_args(workdir, data_dir, total_steps=total, log_every=1, eval_every=0)) == 0
    assert "taking over the lock left by a dead run" in caplog.text
    assert "does not match its checksum" in caplog.text and victim in caplog.text
    assert f"resumed from step {steps[-2]}" in caplog.text
    assert {f"{steps[-1]}.corrupt", f"{steps[-1] + 50}.corrupt"} <= set(_kept(workdir))
    # metrics.jsonl holds every step once, however many the killed run logged past its
    # checkpoint; no lock is left behind.
    assert _train_steps(workdir) == list(range(1, total + 1))
    assert not os.path.exists(os.path.join(workdir, "LOCK"))


def _tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_full_disk_is_one_clean_line_and_keeps_earlier_steps(
    tmp_path, data_dir, monkeypatch, capsys
):
    """A workdir on a 3 MiB tmpfs (a private mount namespace, where permitted): a tiny ViT's
    checkpoint is ~1 MiB, so the third save finds the disk full. Elsewhere the same failure
    is injected as OSError(ENOSPC) in the save's background thread."""
    overrides = dict(total_steps=40, log_every=40, eval_every=0, checkpoint_every=2)
    if _tmpfs_works():
        mnt = str(tmp_path / "small")
        os.makedirs(mnt)
        workdir = os.path.join(mnt, "run")
        run = " ".join([sys.executable, "-m", "vlmjax.cli", *_args(workdir, data_dir, **overrides)])
        script = (
            f"mount -t tmpfs -o size=3m tmpfs {mnt} && {run}; echo exit=$? >&2; "
            f"ls {workdir}/checkpoints"  # the tmpfs goes with the namespace: list it here
        )
        result = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300
        )
        err, kept = result.stderr, result.stdout.split()
        status = int(err.rsplit("exit=", 1)[1].split()[0])
    else:
        workdir = str(tmp_path / "run")
        calls = []
        write_manifest = checkpoint.write_manifest

        def full_after_two(step_dir):
            calls.append(step_dir)
            if len(calls) > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), step_dir)
            write_manifest(step_dir)

        monkeypatch.setattr(checkpoint, "write_manifest", full_after_two)
        status = cli.main(_args(workdir, data_dir, **overrides))
        err, kept = capsys.readouterr().err, _kept(workdir)
    errors = [line for line in err.splitlines() if line.startswith("vlmjax: error:")]
    assert status != 0, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert "checkpoint save of step" in errors[0] and "the disk is full" in errors[0]
    assert "the earlier checkpoints are kept ([" in errors[0]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    assert len([k for k in kept if k.isdigit()]) >= 2, kept  # the earlier steps are kept


def test_killed_process_ends_the_other_within_the_heartbeat_timeout(tmp_path, data_dir):
    """2 processes x 1 CPU device; process 1 is killed mid-run: process 0 must not hang in
    the step's collectives but exit non-zero, naming the cause, within the heartbeat
    timeout (VLMJAX_HEARTBEAT_TIMEOUT, 10 s here; JAX's default is 100 s)."""
    workdir = str(tmp_path / "run")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        VLMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port.getsockname()[1]}",
        VLMJAX_NUM_PROCESSES="2",
        VLMJAX_HEARTBEAT_TIMEOUT="10",
    )
    port.close()
    cmd = [sys.executable, "-m", "vlmjax.cli"]
    cmd += _args(workdir, data_dir, total_steps=100000, log_every=1, checkpoint_every=5)
    cmd += ["--config.eval_every=0"]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "VLMJAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 180
        while len(_train_steps(workdir)) < 3:
            assert all(p.poll() is None for p in procs) and time.time() < deadline
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        output, _ = procs[0].communicate(timeout=60)
        waited = time.time() - killed
    finally:
        for p in procs:
            p.kill()
            p.stdout.close()
    assert procs[0].returncode != 0
    assert waited < 10 + 20, waited  # the timeout, plus the coordination service's polling
    assert "another task died" in output, output[-3000:]
