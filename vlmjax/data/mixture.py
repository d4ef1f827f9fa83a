"""Several random-access sources mixed with weights, as one random-access source.

    data.source = "/a/{00000..00099}.tar::/b/train.tsv";  data.source_weights = "1::3"

(open_clip's "::"-joined `--train-data` and `--train-data-upsampling-factors`.) Position j of
the mixture maps to (source s, record) by a fixed pattern of `PERIOD` slots in which source
s holds round(PERIOD * w_s / sum(w)) slots, spread evenly (largest remainder first): a pure
function of j (the pattern is cut to its shortest period: 1::3 gives 4 slots), so the
pipeline's shuffle, resume and per-process split work unchanged. The
mixture's length (one epoch of the shuffled stream) is the smallest that shows every record
of every source at least once: max_s len_s / share_s; a source with more weight than
records repeats its records (each equally often, +-1). Memory: the pattern (2 bytes a slot)
and one count per source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

SEPARATOR = "::"
PERIOD = 1000


def split(source: str) -> list[str]:
    """'a::b' -> ['a', 'b']; a single source -> [source]."""
    return [s.strip() for s in source.split(SEPARATOR) if s.strip()]


def weights(spec: str, count: int) -> list[float]:
    """`data.source_weights` ("1::3", "" = equal) -> `count` positive weights."""
    if not spec:
        return [1.0] * count
    parts = split(spec)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(
            f"data.source_weights={spec!r} must be {count} positive numbers joined by '::', "
            f"one per source of data.source"
        )
    return values


def pattern(shares: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """int16 [period]: the source of each slot; source s gets ~period * shares[s] slots,
    interleaved (each slot goes to the source furthest behind its share)."""
    shares = np.asarray(shares, np.float64) / np.sum(shares)
    counts = np.floor(shares * period).astype(np.int64)
    for s in np.argsort(-(shares * period - counts), kind="stable")[: period - counts.sum()]:
        counts[s] += 1
    if np.any(counts == 0):
        raise ValueError(
            f"data.source_weights: a source's share is below 1/{period}; raise its weight"
        )
    counts //= math.gcd(*counts.tolist())  # the shortest period: 1::3 -> 4 slots
    period = int(counts.sum())
    out = np.zeros(period, np.int16)
    given = np.zeros(len(counts), np.int64)
    for t in range(period):
        s = int(np.argmax(counts * (t + 1) / period - given))
        out[t] = s
        given[s] += 1
    return out


class Mixture:
    """Random-access mixture of `sources` with `shares` (see the module doc)."""

    def __init__(self, sources: Sequence[Any], shares: Sequence[float]):
        self.sources = list(sources)
        self.pattern = pattern(shares)
        self.per_period = np.bincount(self.pattern, minlength=len(self.sources))  # [S]
        # prefix[t, s]: slots of s before slot t of a period.
        onehot = np.eye(len(self.sources), dtype=np.int64)[self.pattern]
        self.prefix = np.concatenate([np.zeros((1, len(self.sources)), np.int64),
                                      np.cumsum(onehot, axis=0)])  # fmt: skip
        sizes = np.asarray([len(s) for s in self.sources], np.int64)
        # Periods needed to read every record of every source once, at least.
        periods = int(np.max(-(-sizes // self.per_period)))
        self._length = periods * len(self.pattern)
        self._sizes = sizes

    def __len__(self) -> int:
        return self._length

    def locate(self, index: int) -> tuple[int, int]:
        """(source, record) of mixture position `index`."""
        q, r = divmod(int(index), len(self.pattern))
        s = int(self.pattern[r])
        k = q * int(self.per_period[s]) + int(self.prefix[r, s])
        return s, k % int(self._sizes[s])

    def __getitem__(self, index: int) -> Any:
        s, k = self.locate(index)
        return self.sources[s][k]

    def caption(self, index: int) -> str:
        """Position `index`'s caption alone, from a source that reads it without the image."""
        s, k = self.locate(index)
        return self.sources[s].caption(k)

    def __repr__(self) -> str:
        return f"Mixture({self.sources!r}, {len(self)} positions)"
