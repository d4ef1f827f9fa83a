"""What the `vlmjax bench` commands share: markdown tables, timing, memory and simulated
CPU devices."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

GIB = 2**30
LOSS_DEVICES = 8  # `bench loss` runs on this many simulated CPU devices


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def timed_runs(fn: Callable[[], Any], repeats: int, max_seconds: float) -> tuple[float, int]:
    """(median seconds, runs) of `fn()` (which must block) after one warm-up call.

    The warm-up's duration caps the runs at what fits in `max_seconds` (at least one), so a
    slow configuration is timed once instead of stalling the whole table.
    """
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    runs = max(1, min(repeats, int(max_seconds / max(warm, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), runs


def available_ram() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def simulate_cpu_devices(n: int = LOSS_DEVICES) -> None:
    """Asks XLA for `n` host devices unless XLA_FLAGS already says how many. Only works
    before the CPU backend starts (the first device query, array or jit)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
