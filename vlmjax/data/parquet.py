"""Parquet files with an image-bytes column and a caption column as a random-access source.

    data.source = "parquet:/data/{00000..00127}.parquet"   (or any pattern ending in .parquet)
    data.parquet_image_key = "jpg"; data.parquet_caption_key = "caption"   (img2dataset)
    data.parquet_image_key = "image"; data.parquet_caption_key = "text"     (HF datasets)

The image column holds encoded bytes (img2dataset), or Hugging Face datasets' image struct
{"bytes", "path"} (a path relative to the parquet file's folder when bytes is null).
Needs `pyarrow` (`pip install vlmjax[parquet]`).

Random access: opening reads each file's footer only (its row groups' row counts: no
per-record memory). `source[i]` reads the two columns of i's row group and keeps the last
`CACHED_GROUPS` groups, so reading in file order (evaluation) decodes each group once; a
globally shuffled training stream reads one group per example, which is fast only for
small row groups (img2dataset writes one group per shard of ~10k rows: for training on
those prefer its WebDataset output, or rewrite the files with small row groups). A missing
or undecodable image and a null, empty or non-UTF-8 caption raise
`decode.BadRecord("FILE:#ROW: why")`, which training skips and counts.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

import numpy as np

from vlmjax.data import file_index
from vlmjax.data.decode import BadRecord, decode_caption, decode_image

PREFIX = "parquet:"
CACHED_GROUPS = 4


def parse(source: str) -> str | None:
    """The file pattern of a parquet source ("parquet:PATTERN" or ending in .parquet), or None."""
    if source.startswith(PREFIX):
        return source[len(PREFIX) :]
    parts = [p.strip() for p in source.split(",") if p.strip()]
    return source if parts and all(p.endswith(".parquet") for p in parts) else None


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "parquet sources need pyarrow: pip install 'vlmjax[parquet]' (or pyarrow)"
        ) from None
    return pq


class ParquetSource:
    """Random-access records {"image": uint8 [h, w, 3], caption_key: str} of parquet files."""

    def __init__(
        self,
        pattern: str,
        image_key: str = "jpg",
        caption_key: str = "caption",
        output_caption_key: str = "caption",
    ):
        pq = _pyarrow()
        self.pattern, self.image_key, self.caption_key = pattern, image_key, caption_key
        self.output_caption_key = output_caption_key or "caption"
        self.files = file_index.expand(pattern)
        groups = []  # (file number, row group, rows), in order
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(path)
            columns = meta.schema_arrow.names
            for key, value in (
                ("parquet_image_key", image_key),
                ("parquet_caption_key", caption_key),
            ):
                if value not in columns:
                    raise ValueError(
                        f"data.{key}={value!r} is not a column of {path} (columns: {columns})"
                    )
            for g in range(meta.num_row_groups):
                groups.append((f, g, meta.metadata.row_group(g).num_rows))
        self._groups = np.asarray([g[:2] for g in groups], np.int64).reshape(-1, 2)
        rows = np.asarray([g[2] for g in groups], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(rows)])  # int64 [groups + 1]
        file_start = {}  # the first row of each file (for FILE:#ROW in messages)
        for g, (f, _) in enumerate(self._groups):
            file_start.setdefault(int(f), int(self._starts[g]))
        self._file_row = np.asarray(
            [self._starts[g] - file_start[int(f)] for g, (f, _) in enumerate(self._groups)],
            np.int64,
        )
        if self._starts[-1] == 0:
            raise ValueError(f"data.source: the files of {pattern!r} hold no rows")
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        # Worker processes (data.num_workers) get the source pickled: each starts with its
        # own empty cache and lock.
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = collections.OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _group(self, g: int) -> tuple[list, list]:
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        f, group = (int(x) for x in self._groups[g])
        table = (
            _pyarrow()
            .ParquetFile(self.files[f])
            .read_row_group(group, columns=[self.image_key, self.caption_key])
        )
        columns = (table.column(0).to_pylist(), table.column(1).to_pylist())
        with self._lock:
            self._cache[g] = columns
            while len(self._cache) > CACHED_GROUPS:
                self._cache.popitem(last=False)
        return columns

    def caption(self, index: int) -> str:
        """Row `index`'s caption alone (the row group's columns are read), e.g. to train a
        tokenizer."""
        return self._row(index, False)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._row(index, True)

    def _row(self, index: int, with_image: bool) -> Any:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        g = int(np.searchsorted(self._starts, index, side="right")) - 1
        images, captions = self._group(g)
        row = index - int(self._starts[g])
        path = self.files[int(self._groups[g, 0])]
        where = f"{path}:#{int(self._file_row[g]) + row}"
        if not with_image:
            return decode_caption(captions[row], where)
        image = images[row]
        if isinstance(image, dict):  # HF datasets: {"bytes": ..., "path": ...}
            image = image.get("bytes") or (
                os.path.join(os.path.dirname(os.path.abspath(path)), image["path"])
                if image.get("path")
                else None
            )
        if image is None:
            raise BadRecord(f"{where}: no image")
        return {
            "image": decode_image(image, where),
            self.output_caption_key: decode_caption(captions[row], where),
        }

    def __repr__(self) -> str:
        return f"ParquetSource({self.pattern!r}, {len(self.files)} files, {len(self)} rows)"
