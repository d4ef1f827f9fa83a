"""Which processes are still running (from /proc, Linux): for the tests that check that no
data worker outlives its trainer."""

import os
import time


def _stat(pid) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pids) -> list[int]:
    """Those of `pids` still running (not exited, not zombies)."""
    return [pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] != "Z"]


def wait_gone(pids, seconds: float = 15.0) -> list[int]:
    """Waits up to `seconds` for `pids` to end; returns those still running."""
    deadline = time.time() + seconds
    while alive(pids) and time.time() < deadline:
        time.sleep(0.2)
    return alive(pids)


def descendants(pid: int) -> list[int]:
    """The running processes below `pid`: children, their children, ..."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(entry)
        if fields is not None and fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        found += sorted(frontier)
    return found
