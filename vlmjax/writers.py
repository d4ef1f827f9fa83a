"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, and the terminal.

Only process 0 writes; other processes get a writer that does nothing, so callers never
branch on the process index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

log = logging.getLogger("vlmjax")


def _scalar(value: Any) -> float | int:
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, int) else float(value)


class MetricWriter:
    """Appends `{"step": s, key: value, ...}` lines to metrics.jsonl and TensorBoard scalars."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the record
            log.warning("tensorboardX is not installed: writing metrics.jsonl only")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        record = {"step": int(step)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                # TensorBoard tag names allow no "@" (recall@1); it would rename and log.
                self._tb.add_scalar(key.replace("@", "_at_"), value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


class Progress:
    """A progress bar with ETA on a terminal; plain log lines (every `log_every`) otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self._bar = None
        self._start, self._start_step = time.time(), initial
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, step: int, metrics: dict[str, Any] | None = None) -> None:
        """Call after `step` (1-based count of steps done); `metrics` when there are new ones."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if metrics:
                self._bar.set_postfix(
                    {
                        k.split("/", 1)[-1]: f"{_scalar(v):.4g}"
                        for k, v in metrics.items()
                        if k in ("train/loss", "train/accuracy")
                        or (k.startswith("eval/") and k.endswith(("/accuracy", "/exact_match")))
                    }
                )
        elif metrics:
            done = step - self._start_step
            elapsed = time.time() - self._start
            eta = elapsed / done * (self.total - step) if done else float("nan")
            shown = ", ".join(f"{k}={_scalar(v):.4g}" for k, v in sorted(metrics.items()))
            log.info("step %d/%d (eta %.0fs): %s", step, self.total, eta, shown)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
