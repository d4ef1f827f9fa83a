"""data.num_workers: batches made in worker processes equal those made in the trainer, a
resumed stream starts on the right batch, and no worker outlives its trainer: closed here,
SIGKILLed here (nothing in the trainer runs, so the workers must notice on their own); a
SIGTERM to a training run's whole process group is in tests/test_preemption.py, and a run
that fails closes its iterator as a finished one does (train.py, close_after_error)."""

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
from processes import alive, wait_gone

from vlmjax import defaults
from vlmjax.data import pipeline, shapes, workers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(image_size=32, num_train=4096, num_heldout=256)  # conftest's prepared data


def _dataset(data_dir, num_workers, start_example=0):
    source = shapes.data_source("train", data_dir=data_dir, **TINY)
    # resize=False: random_resized_crop makes the 24-pixel images itself.
    features = pipeline.classification_features(defaults.base_config().data, resize=False)
    return pipeline.train_dataset(
        source, features, batch_size=8, seed=3, augment="random_resized_crop,flip",
        image_size=24, process_index=1, process_count=2, start_example=start_example,
        num_workers=num_workers,
    )  # fmt: skip


def test_workers_make_the_same_batches_and_resume_exactly(data_dir):
    reference = iter(_dataset(data_dir, 0))
    expected = [next(reference) for _ in range(4)]
    # Process 1 of 2, resumed after one global batch (16 examples), made by 2 workers.
    it = iter(_dataset(data_dir, 2, start_example=16))
    got = [next(it) for _ in range(3)]
    pids = [p.pid for p in multiprocessing.active_children()]
    assert len(pids) == 2
    for want, have in zip(expected[1:], got, strict=True):
        assert sorted(want) == sorted(have)
        for key in want:
            np.testing.assert_array_equal(want[key], have[key])
    assert got[0]["image"].shape == (8, 24, 24, 3)
    it.close()
    assert wait_gone(pids, 10) == []


def test_resolve_auto():
    assert workers.resolve(3, "shapes") == 3 and workers.resolve(0, "jsonl:x") == 0
    assert workers.resolve(-1, "shapes") == 0  # pre-rendered arrays: workers never pay
    cores = workers.available_cores()
    assert workers.resolve(-1, "/d/{0..9}.tar") == max(0, min(cores - 1, 16))


_TRAINER = """
import json, multiprocessing, sys, time
from vlmjax import defaults
from vlmjax.data import pipeline, shapes

if __name__ == "__main__":
    source = shapes.data_source("train", data_dir=sys.argv[1], **TINY)
    features = pipeline.classification_features(defaults.base_config().data)
    it = iter(pipeline.train_dataset(source, features, batch_size=8, seed=0, num_workers=1))
    next(it)
    print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
    time.sleep(600)
"""


def test_no_orphan_workers_after_sigkill(data_dir):
    script = textwrap.dedent(_TRAINER).replace("**TINY", f"**{json.dumps(TINY)}")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, data_dir],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("["), line + proc.stderr.read()
        pids = json.loads(line)
        assert len(pids) == 1 and alive(pids) == pids
        proc.kill()  # nothing runs in the trainer: the worker must notice on its own
        proc.wait(timeout=60)
        assert wait_gone(pids) == []
    finally:
        proc.kill()
        proc.communicate()
