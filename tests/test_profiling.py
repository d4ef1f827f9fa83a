"""Seeing where time goes: train/data_wait_fraction, profile_steps, the wandb writer
(offline). A training run that logs the fraction and leaves a trace is in
tests/test_preemption.py (with a data worker, stopped by SIGTERM)."""

import glob
import json
import os

import pytest

from vlmjax import config as config_lib
from vlmjax import defaults, profiling, writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_data_wait_fraction(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(profiling.time, "perf_counter", clock)

    def batches():  # each batch takes 3 s to arrive
        while True:
            clock.now += 3.0
            yield {}

    it, wait = batches(), profiling.DataWait()
    for _ in range(2):
        wait.next(it)
        clock.now += 1.0  # the step's own work (dispatch, the sync at the log step)
    assert wait.fraction() == pytest.approx(6 / 8)
    clock.now += 50.0  # an evaluation: not the loop's time
    wait.restart()
    wait.next(it)
    clock.now += 9.0
    assert wait.fraction() == pytest.approx(3 / 12)
    assert wait.fraction() == 0.0  # an empty interval


def test_profile_steps_and_writers_are_checked_with_the_config():
    assert profiling.parse_steps("") is None and profiling.parse_steps("100:110") == (100, 110)
    for bad in ("3", "3:3", "0:2", "a:b", "2:3:4"):
        with pytest.raises(ValueError, match="must be 'A:B' with 1 <= A < B"):
            profiling.parse_steps(bad)
    assert writers.parse_sinks("jsonl, wandb") == ("jsonl", "wandb")
    config = defaults.base_config()
    config.profile_steps, config.writers, config.wandb.mode = "5:2", "jsonl,tensorbord", "off"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    message = str(e.value)
    assert "profile_steps='5:2' must be 'A:B'" in message
    assert "unknown ['tensorbord']; choose from ['jsonl', 'tensorboard', 'wandb']" in message
    assert "wandb.mode='off'" in message
    config.profile_steps, config.writers, config.wandb.mode = "", "tensorboard", ""
    with pytest.raises(config_lib.ConfigError, match="must include 'jsonl'"):
        config_lib.validate(config)


def test_wandb_offline_writer_resumes_its_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path)
    config = defaults.base_config()
    settings = dict(project="test", mode="offline")
    for first, steps in ((0, (1, 2)), (1, (2, 3))):  # the second resumes from step 1
        writer = writers.MetricWriter(
            workdir, resume_step=first, sinks="jsonl,wandb", wandb_config=settings,
            run_config=config,
        )  # fmt: skip
        for step in steps:
            writer.write(step, {"train/loss": 1.0 / step})
        writer.close()
    with open(os.path.join(workdir, writers.WANDB_RUN_ID)) as f:
        run_id = f.read().strip()
    runs = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)  # one W&B run, resumed
    for run in runs:
        assert os.path.getsize(os.path.join(run, f"run-{run_id}.wandb")) > 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
