"""File patterns and fixed-width record indexes, cached on disk and memory-mapped.

`expand("/data/{00000..00127}.tar,/more/*.tar")` -> sorted-within-pattern paths: top-level
commas separate patterns, `{a..b}` is a numeric range (zero padding kept), `{x,y}` a list,
and `*`, `?`, `[..]` are globs. A pattern that matches no file is an error naming it.

`cached(path, dtype, build, index_dir)` returns the index of one data file, an `IndexFile`
of fixed-width records read one at a time with `os.pread`: built once by `build(path)` (an
np.ndarray of records), stored beside the file (`<file>.vlmjax-idx`), or where that folder
is not writable under `~/.cache/vlmjax/index`, or, when `index_dir` is set, only there
(named by a hash of the file's absolute path). The header records the file's size and
mtime: an index whose file changed is rebuilt. It is written to a temporary file and
renamed into place, so processes on many hosts that build the same index at once never
read a half-written one (the last rename wins; all write the same bytes). Read by offset,
the index costs a process no memory per record (the OS page cache holds the hot parts once
per host); only its 64-byte header is read at open.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import struct
import tempfile
from collections.abc import Callable

import numpy as np

MAGIC = b"VLMJXIDX"
VERSION = 1
HEADER = struct.Struct("<8sIIqqq")  # magic, version, itemsize, file size, mtime_ns, count
HEADER_BYTES = 64
SUFFIX = ".vlmjax-idx"

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Splits at `sep` outside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def braces(pattern: str) -> list[str]:
    """Brace expansion: "a{1..3}b" -> [a1b, a2b, a3b]; "{x,y}.tar" -> [x.tar, y.tar]."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += pattern[end] == "{"
        depth -= pattern[end] == "}"
        if depth == 0:
            break
    else:
        raise ValueError(f"data.source: unbalanced '{{' in {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    match = _RANGE.fullmatch("{" + body + "}")
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        options = [o for part in _split_top(body) for o in braces(part)]
    return [x for option in options for x in braces(head + option + tail)]


def expand(spec: str) -> list[str]:
    """Comma list of brace patterns and globs -> existing file paths, in the order given
    (each glob sorted). Raises FileNotFoundError naming a pattern that matches nothing."""
    paths = []
    for part in _split_top(spec):
        for pattern in braces(os.path.expanduser(part)):
            if glob.has_magic(pattern):
                found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            else:
                found = [pattern] if os.path.isfile(pattern) else []
            if not found:
                raise FileNotFoundError(f"data.source: {pattern!r} matches no file (from {spec!r})")
            paths.extend(found)
    if not paths:
        raise FileNotFoundError(f"data.source: {spec!r} names no file")
    return paths


def _default_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "vlmjax", "index")


def _candidates(path: str, index_dir: str) -> list[str]:
    if index_dir:
        digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
        name = f"{os.path.basename(path)}.{digest}{SUFFIX}"
        return [os.path.join(os.path.expanduser(index_dir), name)]
    beside = path + SUFFIX
    return [beside, *_candidates(path, _default_dir())]


class IndexFile:
    """A cached index: `len()` records of a fixed-width dtype, read one at a time with
    os.pread (`index[j]` -> a numpy record), so a process holds no per-record memory; or,
    where nothing was writable, the records in memory."""

    def __init__(self, dtype: np.dtype, count: int, path: str | None, records=None):
        self.dtype, self.count, self.path, self._records = dtype, count, path, records

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int) -> np.void:
        if self._records is not None:
            return self._records[j]
        raw = read_at(self.path, HEADER_BYTES + int(j) * self.dtype.itemsize, self.dtype.itemsize)
        return np.frombuffer(raw, dtype=self.dtype)[0]

    def read_all(self) -> np.ndarray:
        """Every record (for scans that need them all, e.g. tests)."""
        if self._records is not None:
            return np.asarray(self._records)
        return np.fromfile(self.path, dtype=self.dtype, offset=HEADER_BYTES, count=self.count)


def _load(index_path: str, dtype: np.dtype, size: int, mtime_ns: int) -> IndexFile | None:
    try:
        with open(index_path, "rb") as f:
            header = f.read(HEADER.size)
    except OSError:
        return None
    if len(header) < HEADER.size:
        return None
    magic, version, itemsize, fsize, fmtime, count = HEADER.unpack(header)
    expected = (MAGIC, VERSION, dtype.itemsize, size, mtime_ns)
    if (magic, version, itemsize, fsize, fmtime) != expected:
        return None  # another format, or the data file changed since: rebuild
    if os.path.getsize(index_path) != HEADER_BYTES + count * dtype.itemsize:
        return None
    return IndexFile(dtype, count, index_path)


def _write(index_path: str, records: np.ndarray, size: int, mtime_ns: int) -> bool:
    folder = os.path.dirname(index_path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".idx-", dir=folder)
    except OSError:
        return False  # not writable: try the next place
    try:
        with os.fdopen(fd, "wb") as f:
            itemsize = records.dtype.itemsize
            header = HEADER.pack(MAGIC, VERSION, itemsize, size, mtime_ns, len(records))
            f.write(header.ljust(HEADER_BYTES, b"\0"))
            f.write(np.ascontiguousarray(records).tobytes())
        os.replace(tmp, index_path)  # atomic: readers see the old file or the whole new one
        return True
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        return False


def cached(
    path: str, dtype: np.dtype, build: Callable[[str], np.ndarray], index_dir: str = ""
) -> IndexFile:
    """The index of `path` (records of `dtype`): the cached one if it is current, else
    built by `build(path)` and cached (see the module doc)."""
    dtype = np.dtype(dtype)
    stat = os.stat(path)
    candidates = _candidates(path, index_dir)
    for index_path in candidates:
        found = _load(index_path, dtype, stat.st_size, stat.st_mtime_ns)
        if found is not None:
            return found
    records = np.asarray(build(path), dtype=dtype)
    for index_path in candidates:
        if _write(index_path, records, stat.st_size, stat.st_mtime_ns):
            found = _load(index_path, dtype, stat.st_size, stat.st_mtime_ns)
            if found is not None:
                return found
    return IndexFile(dtype, len(records), None, records)  # nowhere writable: in memory


# A line of a text file: where it starts, its length without the line ending, its number.
LINE = np.dtype([("offset", "<i8"), ("length", "<i4"), ("line", "<i4")])  # 16 bytes


def line_offsets(path: str) -> np.ndarray:
    """`LINE` records of every non-blank line of a text file (read in blocks; no line is
    decoded, so a non-UTF-8 line is found only when it is read)."""
    rows = []
    with open(path, "rb") as f:
        position = 0
        for number, line in enumerate(f, start=1):
            body = line.rstrip(b"\r\n")
            if body.strip():
                rows.append((position, len(body), number))
            position += len(line)
    return np.array(rows, dtype=LINE)


def read_at(path: str, offset: int, size: int) -> bytes:
    """`size` bytes of `path` from `offset` (os.pread: no shared file position, so threads
    can read one file at once)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: read {len(data)} of {size} bytes at offset {offset} (truncated?)")
    return data
