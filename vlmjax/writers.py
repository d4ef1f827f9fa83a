"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, Weights & Biases, and
the terminal.

`writers` (config) names the sinks, comma-separated: "jsonl" (always: metrics.jsonl is the
run's record, which resume trims and sweeps read), "tensorboard" (WORKDIR/tensorboard/),
"wandb" (an optional extra: `pip install vlmjax[wandb]`; the `wandb` config holds its
project, run name and mode; files go to WORKDIR/wandb/, and WORKDIR/wandb_run_id makes a
resumed run continue the same W&B run). With `wandb.mode = "offline"` (or WANDB_MODE=offline)
nothing touches the network; `wandb sync WORKDIR/wandb/offline-run-*` uploads later.

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
import uuid
from typing import Any

log = logging.getLogger("vlmjax")

SINKS = ("jsonl", "tensorboard", "wandb")
WANDB_RUN_ID = "wandb_run_id"  # under the workdir: the W&B run a resumed run continues


def parse_sinks(spec: str) -> tuple[str, ...]:
    """ "jsonl,tensorboard" -> ("jsonl", "tensorboard"); errors name the valid sinks."""
    sinks = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [s for s in sinks if s not in SINKS]
    if unknown:
        raise ValueError(f"writers={spec!r}: unknown {unknown}; choose from {list(SINKS)}")
    if "jsonl" not in sinks:
        raise ValueError(
            f"writers={spec!r} must include 'jsonl' (metrics.jsonl is the run's record: "
            "resume trims it, sweeps read it), e.g. 'jsonl,tensorboard,wandb'"
        )
    return sinks


def _scalar(value: Any) -> float | int:
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, int) else float(value)


def drop_after(path: str, step: int) -> int:
    """Rewrites the metrics.jsonl at `path` without records after `step` (and without a line
    cut short by a kill); returns how many were dropped. Atomic: a temp file is renamed over."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class MetricWriter:
    """Appends `{"step": s, key: value, ...}` lines to metrics.jsonl and TensorBoard scalars.

    `resume_step` is the step training restarts from (0 for a fresh start): records written
    after it by an earlier, interrupted invocation are dropped from metrics.jsonl, and
    TensorBoard is told to purge its events from `resume_step + 1` on, so after any number
    of kills and resumes every step appears once.
    """

    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        resume_step: int | None = None,
        sinks: str = "jsonl,tensorboard",
        wandb_config: dict[str, Any] | None = None,
        run_config: Any = None,
    ):
        """`sinks`: the `writers` config; `wandb_config`: the `wandb` config (project, name,
        mode, entity); `run_config`: the run's ConfigDict, recorded in the W&B run."""
        self.enabled = enabled
        self._tb = self._wandb = None
        kinds = parse_sinks(sinks)
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            dropped = drop_after(path, resume_step)
            if dropped:
                log.info("metrics.jsonl: dropped %d records after step %d", dropped, resume_step)
        self._file = open(path, "a")  # noqa: SIM115
        if "tensorboard" in kinds:
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
            except ImportError:  # TensorBoard files are a convenience; metrics.jsonl the record
                log.warning("tensorboardX is not installed: writing metrics.jsonl only")
        if "wandb" in kinds:
            self._wandb = _start_wandb(workdir, wandb_config or {}, run_config)

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
        if self._wandb is not None:
            self._wandb.log({"step": int(step), **values})

    def close(self) -> None:
        if not self.enabled or self._file.closed:
            return
        tb, self._tb = self._tb, None
        run, self._wandb = self._wandb, None
        try:
            self._file.close()
        finally:
            if tb is not None:
                _close_tensorboard(tb)
            if run is not None:
                run.finish()


def _start_wandb(workdir: str, cfg: dict[str, Any], run_config: Any):
    """A W&B run logging into WORKDIR/wandb/, continuing the one WORKDIR/wandb_run_id names.

    Every record carries its "step" as a metric, and charts use it as their x axis
    (`define_metric`): W&B's own step must only grow, and a resumed run logs again the
    steps after its checkpoint, which W&B would drop. W&B keeps both copies of those steps
    (it cannot purge them as TensorBoard does); metrics.jsonl keeps each step once."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "writers includes 'wandb' but the wandb package is not installed: "
            "`pip install vlmjax[wandb]`, or drop 'wandb' from writers"
        ) from e
    id_path = os.path.join(workdir, WANDB_RUN_ID)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]  # W&B run ids: lower-case letters and digits
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    recorded = None
    if run_config is not None and hasattr(run_config, "to_json_best_effort"):
        recorded = json.loads(run_config.to_json_best_effort())
    run = wandb.init(
        project=cfg.get("project") or "vlmjax",
        entity=cfg.get("entity") or None,
        name=cfg.get("name") or os.path.basename(os.path.abspath(workdir)),
        mode=cfg.get("mode") or None,  # None: WANDB_MODE, else wandb's default (online)
        dir=workdir,
        id=run_id,
        resume="allow",
        config=recorded,
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _close_tensorboard(tb) -> None:
    """Closes a tensorboardX SummaryWriter; on a failed final flush (a full disk) it warns
    instead. tensorboardX then leaves its event writer half open, and its worker thread and
    atexit hook print tracebacks at exit: both are stopped here (tensorboardX 2.6 internals,
    hence the getattrs)."""
    events = getattr(getattr(tb, "file_writer", None), "event_writer", None)
    try:
        tb.close()
    except OSError as e:  # metrics.jsonl is the record; TensorBoard files a convenience
        log.warning("tensorboard events not flushed: %s", e)
        if events is not None and not getattr(events, "_closed", True):
            worker = getattr(events, "_worker", None)
            if worker is not None and worker.is_alive():
                worker.stop()
            events._closed = True


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
