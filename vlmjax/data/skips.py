"""Bad records in training: replaced deterministically, counted, and a stop past a limit.

A record that raises `decode.BadRecord` (a corrupt or truncated image, a missing, empty or
non-UTF-8 caption, a bad jsonl line; see `decode.py`) is **replaced**, not dropped: the
example at that position becomes record `replacement(index, 1)`, or, if that one is bad
too, `replacement(index, 2)`, ... (a fixed hash of the index and the attempt). The stream is
then still a pure function of the position: resume by example count stays exact, the
global order does not depend on the process count, and an epoch keeps `len(source)`
positions (a bad record's slot holds a duplicate of another record). big_vision filters bad
examples out in tf.data and open_clip's webdataset handlers drop them; both shift every
later position, so neither can resume mid-epoch on the same examples. Each failed read is
counted where it happens, in the example's `SKIPPED` field (and its reason in `REASONS`),
so the count reaches the loop through any number of threads or worker processes; a bad
record read again in a later epoch is counted again.

`SkipCounter` (the train loop's side) pops those fields from each host batch, logs the first
few reasons, and gives `data/skipped`: the cumulative count over all processes, restored
from the checkpoint on resume. It stops the run with `TooManySkipped` when the skipped
fraction (failed reads / examples trained on) passes `data.max_skip_fraction`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vlmjax.data.decode import BadRecord

log = logging.getLogger("vlmjax")

SKIPPED = "_skipped"  # int32 []: failed reads before this example was found
REASONS = "_skip_reasons"  # str: their reasons, "\n"-joined ("" when none)
MAX_ATTEMPTS = 64
LOGGED = 5  # reasons logged per process (the first ones), then only counts


class TooManySkipped(RuntimeError):
    """The skipped fraction passed `data.max_skip_fraction`."""


def replacement(index: int, attempt: int, size: int) -> int:
    """The record tried instead of `index` on its `attempt`-th failure (1, 2, ...): a fixed
    hash (splitmix64) of both, so a run of bad neighbours (a damaged shard) is jumped over."""
    x = (int(index) * 0x9E3779B97F4A7C15 + int(attempt) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return int((x ^ (x >> 31)) % size)


class Replacing:
    """A random-access source of `features(source[i])`, each bad record replaced (see the
    module doc); every example gains `SKIPPED` and `REASONS`."""

    def __init__(self, source: Any, features: Callable[[Mapping], dict]):
        self.source, self.features = source, features

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        reasons, current = [], int(index)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                example = dict(self.features(self.source[current]))
            except BadRecord as e:
                reasons.append(str(e))
                current = replacement(index, attempt, len(self.source))
                continue
            example[SKIPPED] = np.int32(len(reasons))
            example[REASONS] = np.asarray("\n".join(reasons))
            return example
        raise TooManySkipped(
            f"{MAX_ATTEMPTS} records in a row were bad while replacing example {index} (is "
            f"most of the data unreadable?); the first: {reasons[0]}; the last: {reasons[-1]}"
        )


def carry(example: Mapping) -> dict:
    """The skip fields of `example` (to keep them through a map that rebuilds the dict)."""
    return {k: example[k] for k in (SKIPPED, REASONS) if k in example}


class SkipCounter:
    """The loop's count of skipped records (see the module doc). `restored`: the count
    saved with the checkpoint the run resumed from (all processes)."""

    def __init__(self, max_fraction: float, restored: int = 0):
        self.max_fraction = max_fraction
        self.restored = int(restored)
        self.local = 0  # this process, since this invocation started
        self.logged = 0

    def pop(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Removes the skip fields from a host batch (they are not model inputs), counts
        them and logs the first few reasons; returns the batch."""
        counts = batch.pop(SKIPPED, None)
        reasons = batch.pop(REASONS, None)
        if counts is None:
            return batch
        self.local += int(np.sum(counts))
        if reasons is not None and self.logged < LOGGED:
            for text in np.asarray(reasons).reshape(-1):
                for reason in str(text).split("\n") if text else ():
                    if self.logged < LOGGED:
                        self.logged += 1
                        log.warning("data: skipped a bad record: %s", reason)
                        if self.logged == LOGGED:
                            log.warning("data: further skipped records are only counted")
        return batch

    def total(self) -> int:
        """Skipped records over all processes since the run began (every process must call
        it at the same steps: it gathers across processes)."""
        import jax

        local = self.local
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            local = int(np.sum(multihost_utils.process_allgather(np.int64(self.local))))
        return self.restored + local

    def check(self, total: int, examples: int) -> None:
        """Raises `TooManySkipped` if `total` of `examples` is past the limit."""
        if examples and total / examples > self.max_fraction:
            raise TooManySkipped(
                f"{total} bad records were skipped in {examples} examples "
                f"({100 * total / examples:.2f}%), more than data.max_skip_fraction="
                f"{self.max_fraction}; the log names the first ones (FILE:LINE or SHARD:KEY). "
                "Fix or drop them, or raise data.max_skip_fraction"
            )
