"""SIGTERM (a scheduler's preemption notice) stops training with a checkpoint; rerun resumes."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

from processes import descendants, wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "vlmjax.cli", "train", "--workdir", workdir]
    cmd += ["--config", os.path.join(ROOT, "experiments", "shapes_vit.py") + ":tiny"]
    cmd += [f"--config.data.data_dir={data_dir}", "--config.total_steps=100000"]
    cmd += ["--config.log_every=1", "--config.eval_every=0", "--config.checkpoint_every=100000"]
    # With a data worker and a profile of steps 2-3 (tests/test_profiling.py has the rest).
    cmd += ["--config.data.num_workers=1", "--config.profile_steps=2:4"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while len(_logged_steps(workdir)) < 5:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.5)
        below = descendants(proc.pid)  # the data worker, multiprocessing's resource tracker
        assert below
        # To the whole process group, as a scheduler sends it: the worker ignores it (the
        # trainer stops it once the checkpoint is saved, vlmjax/data/workers.py).
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, output[-2000:]  # preempted, not finished
    assert "preempted: stopped after step" in output
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert len(saved) == 1 and saved[0] >= 5
    assert saved[0] in _logged_steps(workdir)
    assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
    assert wait_gone(below) == []  # nothing left running
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*"))
    kinds = {os.path.basename(t).split(".", 1)[1] for t in traces}
    assert kinds >= {"xplane.pb", "trace.json.gz"}, traces  # TensorBoard's, Perfetto's
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        fractions = [json.loads(line)["train/data_wait_fraction"] for line in f]
    assert len(fractions) >= 5 and all(0 <= x <= 1 for x in fractions)
