"""Decoding and augmentation in worker processes (`data.num_workers`).

grain's `mp_prefetch` gives each of N spawned processes every N-th element of the batched
`MapDataset` (element = one host batch) and interleaves their outputs in order, so the
batches are the same as with no workers: each is a pure function of its position and the
seed. Resume needs nothing from the workers either: a run restarts its pipeline at the
example it had reached (`pipeline.train_dataset`'s `start_example`).

Shutdown. The workers are daemon processes that grain stops on `iterator.close()` (and at
interpreter exit, through its finalizer, with SIGKILL after a short join). They ignore
SIGINT and SIGTERM: a Ctrl-C or a scheduler's SIGTERM sent to the whole process group then
reaches only the trainer, which stops at a step boundary with a checkpoint (train.py
`Preemption`) and needs its workers until then. A worker whose parent is gone (killed with
SIGKILL, so nothing closed it) notices within a second and exits, so no orphan is left.

Memory: each worker holds up to `data.prefetch` batches read ahead plus one finished batch,
so about N x (prefetch + 1) host batches in all.

Several trainer processes on one host (one per GPU) each start their own workers: the
automatic count reads this process's CPU affinity, so a launcher that binds each process to
its share of the cores (SLURM's --cpus-per-task, taskset) gets a fair split; without one,
set data.num_workers to about cores / processes - 1.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grain
from absl import flags

AUTO = -1  # data.num_workers = -1: chosen from the source and the cores (see `resolve`)
MAX_AUTO_WORKERS = 16  # more rarely pays on one host; set data.num_workers to go beyond
# Sources whose records are decoded arrays already (no image decoding to spread out).
IN_MEMORY_SOURCES = ("shapes",)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: what SLURM or taskset grant)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve(num_workers: int, source: str) -> int:
    """The worker count for `data.num_workers` (>= 0 as given; -1 = auto) and `data.source`.

    Auto: 0 for `shapes`, whose records are pre-rendered uint8 arrays: producing a batch
    costs far less than a worker's start (a spawned interpreter importing numpy, grain and
    jax: seconds on a small machine) and the shared-memory hop of every batch, which never
    pays back on the short runs `shapes` is for. For every source that decodes images
    (jsonl, WebDataset, parquet, CSV, tfds), `min(cores - 1, 16)`: one core stays with the
    trainer, which also feeds the accelerator; 0 on a 1-core machine.
    """
    if num_workers != AUTO:
        return num_workers
    if source in IN_MEMORY_SOURCES:
        return 0
    return max(0, min(available_cores() - 1, MAX_AUTO_WORKERS))


def _exit_when_orphaned(parent: int, period_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(period_s)
    os._exit(0)  # the trainer is gone: nobody will read what this worker makes


def worker_init(index: int, count: int) -> None:
    """Runs first in each worker process (see the module doc: signals and orphans)."""
    del index, count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """`ds` (a `MapDataset.to_iter_dataset(...)`) produced by `num_workers` processes, in the
    same order; `ds` itself when 0. Close the iterator when done (`iterator.close()`)."""
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0 or -1 (auto), got {num_workers}")
    if num_workers == 0:
        return ds
    # grain 0.2.18 reads an absl flag's .value when it starts workers, which fails unless
    # absl parsed the command line (it assumes an absl app): take the flags' defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=1)
    return ds.mp_prefetch(options, worker_init_fn=worker_init)
