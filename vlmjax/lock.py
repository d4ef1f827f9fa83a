"""One live `vlmjax train` per workdir: WORKDIR/LOCK.

Two runs on one workdir interleave two curves in metrics.jsonl, rewrite config.json and
delete each other's checkpoints (issue 12), so `train` holds an exclusive `flock` on
WORKDIR/LOCK for its whole life, and writes its holder there as JSON ({"host", "pid",
"start_time", "argv"}) so the refusal can name it. The kernel drops an flock when its process
dies, `kill -9` included, so a lock left by a dead process is taken, with a warning naming
the dead holder. Where flock does not reach (some network file systems), the record still
tells: a holder on this host is alive while its pid exists; one on another host while its
record was refreshed within `STALE_AFTER` seconds (a daemon thread refreshes it).

Multi-process runs take the lock once, on process 0 (`train.train` broadcasts the outcome);
`vlmjax eval` reads a workdir without it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time

log = logging.getLogger("vlmjax")

NAME = "LOCK"
STALE_AFTER = 300.0  # seconds without a refresh after which another host's record is stale
REFRESH_EVERY = 60.0


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"started {holder.get('start_time', '?')}"
    )


class WorkdirLock:
    """Context manager holding WORKDIR/LOCK; raises `WorkdirLocked` naming a live holder."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), NAME)
        self._fd: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise WorkdirLocked(self._refusal(holder)) from None
            # The holder may have unlinked the file between our open and flock: then we
            # locked a file nobody else will see; start again on the current one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = self._read(fd)
        if holder:
            if holder.get("host") == socket.gethostname():
                # Where flock is a no-op (some network file systems) the pid still tells.
                alive = holder.get("pid") != os.getpid() and _alive(int(holder.get("pid", -1)))
            else:  # flock may not reach across hosts: trust a recently refreshed record
                alive = time.time() - os.fstat(fd).st_mtime < STALE_AFTER
            if alive:
                os.close(fd)
                raise WorkdirLocked(self._refusal(holder))
            log.warning(
                "%s: taking over the lock left by a dead run (%s)", self.path, _describe(holder)
            )
        self._fd = fd
        self._write()
        threading.Thread(target=self._refresh, daemon=True, name="vlmjax-lock").start()

    def _refusal(self, holder: dict) -> str:
        return (
            f"workdir {os.path.dirname(self.path)} is in use by another run "
            f"({_describe(holder) if holder else 'holder unknown'}; lock {self.path}). "
            "Wait for it to end, or give this run another --workdir."
        )

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 65536).decode()
            holder = json.loads(text) if text.strip() else {}
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self) -> None:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                os.utime(self._fd)
            except OSError:
                return

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        try:
            os.unlink(self.path)  # before unlocking: a waiter then retries on a new file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
