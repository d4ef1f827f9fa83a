"""Seeing where a run's time goes: `train/data_wait_fraction` and `profile_steps` traces.

`DataWait` times the loop's `next(iterator)` against the wall clock of each log interval.
JAX dispatch is asynchronous: `train_step` returns before the device has run the step, so
the host fetches the next batch while the device computes, and a wait in `next` only costs
time when the device has nothing left to run. Each interval ends at the metrics read at a
log step (`jax.device_get`), a host-device sync, so its wall time holds all of its steps'
device work. Hence

    data_wait_fraction = (seconds blocked in next(iterator)) / (wall seconds of the interval)

is about 0 when input keeps up (batches wait in the prefetch buffer and the host blocks on
the device instead), and approaches the fraction of time the device sat idle when input is
the bottleneck (an upper bound of it: the host may wait on data while the device is still
busy with steps dispatched earlier). Evaluation time is left out (the interval restarts
after it), as it is from `train/examples_per_sec`.

`Profiler` writes a `jax.profiler` trace of the steps of `profile_steps = "A:B"` (steps A to
B - 1, half-open like a Python range) into WORKDIR/profile/ (WORKDIR/profile/process_I/ in a
multi-process run), which TensorBoard's profile plugin and Perfetto (ui.perfetto.dev, the
`.trace.json.gz` file) read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any, TypeVar

log = logging.getLogger("vlmjax")
T = TypeVar("T")

PROFILE_DIR = "profile"  # under the workdir


class DataWait:
    """Seconds blocked in `next(iterator)` over the wall time since the last `fraction()`."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        """Starts a new interval (after an evaluation, whose time is not the loop's)."""
        self._start, self._waited = time.perf_counter(), 0.0

    def next(self, iterator: Iterator[T]) -> T:
        """`next(iterator)`, timed."""
        start = time.perf_counter()
        try:
            return next(iterator)
        finally:
            self._waited += time.perf_counter() - start

    def fraction(self) -> float:
        """The interval's fraction of time spent waiting for input, in [0, 1]; starts the
        next interval. Call it after a host-device sync (see the module doc)."""
        total = time.perf_counter() - self._start
        value = min(1.0, self._waited / total) if total > 0 else 0.0
        self.restart()
        return value


def parse_steps(spec: str) -> tuple[int, int] | None:
    """ "A:B" -> (A, B) with 1 <= A < B (steps A..B-1); "" -> None (no trace)."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        start, stop = (int(p) for p in parts)
        if 1 <= start < stop:
            return start, stop
    raise ValueError(
        f"profile_steps={spec!r} must be 'A:B' with 1 <= A < B (traces steps A to B-1, "
        "e.g. '100:110'), or '' for no trace"
    )


class Profiler:
    """Starts a `jax.profiler` trace before step A and stops it once step B-1 has run on the
    device (`profile_steps`, see the module doc); does nothing when the spec is ""."""

    def __init__(self, spec: str, workdir: str):
        self._steps = parse_steps(spec)
        self.directory = os.path.join(workdir, PROFILE_DIR)
        self._active = False

    def before_step(self, step: int) -> None:
        """Call before fetching step `step`'s batch (input time belongs to the trace)."""
        if self._steps is not None and step == self._steps[0] and not self._active:
            import jax

            if jax.process_count() > 1:  # processes on one host would share a file name
                self.directory = os.path.join(self.directory, f"process_{jax.process_index()}")
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self._active = True
            log.info("profiling steps %d to %d into %s", *self._steps, self.directory)

    def after_step(self, step: int, outputs: Any) -> None:
        """Call after dispatching step `step`; `outputs` (its state) is waited for before the
        trace stops, so the trace holds the last step's device work."""
        if self._active and step == self._steps[1] - 1:
            import jax

            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a trace in progress (the run ended or failed inside the profiled steps)."""
        if self._active:
            import jax

            self._active = False
            jax.profiler.stop_trace()
