"""WebDataset tar shards (img2dataset's layout) as a random-access source.

    data.source = "wds:/data/{00000..00127}.tar"     (or any pattern ending in .tar)

A shard `00000.tar` holds `{key}.jpg|jpeg|png|webp`, `{key}.txt` and `{key}.json` members;
as in webdataset, consecutive members whose names agree up to the first dot of the base name
form one sample (`sub/000001.jpg` and `sub/000001.txt` are sample `sub/000001`). The caption
is the `.txt` member, or, with `data.json_caption_key = "NAME"`, that key of the `.json`
member. Patterns: `file_index.expand` (brace ranges, globs, comma lists).

Random access without reading the images: each shard's headers are scanned once into an
index (`file_index.cached`: beside the shard or under `data.index_dir`, rebuilt when the
shard's size or mtime changes, written atomically so hosts building it at once do not race).
A sample's index record is `RECORD`: the data offset and size of its image, text and json
members, **36 bytes per record** on disk, whatever the captions' length; records are read
one at a time with `os.pread`, so a process holds only a path and an integer per shard in
memory. `source[i]` then reads exactly the members of sample i. Opening a source stats every
shard and reads its index header (64 bytes); nothing else.

Open it directly (e.g. for a benchmark):

    from vlmjax.data import webdataset
    src = webdataset.TarSource("/data/{00000..00127}.tar")  # caption from .txt
    len(src); src[0]  # -> {"image": uint8 [h, w, 3], "caption": str}

A sample with a missing, corrupt or undecodable image or a missing, empty or non-UTF-8
caption raises `decode.BadRecord("SHARD:KEY: why")`, which the training pipeline skips and
counts (`vlmjax/data/skips.py`).
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Any

import numpy as np

from vlmjax.data import file_index
from vlmjax.data.decode import BadRecord, decode_caption, decode_image

PREFIX = "wds:"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MEMBERS = ("image", "text", "json")
RECORD = np.dtype(
    [(f"{m}_{f}", "<i8" if f == "offset" else "<i4") for m in MEMBERS for f in ("offset", "size")]
)  # 3 x (int64 offset, int32 size) = 36 bytes; size -1: no such member
assert RECORD.itemsize == 36


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000001.jpg' -> ('dir/000001', 'jpg'): the key ends at the base name's first dot."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, ext.lower()


def build_index(path: str) -> np.ndarray:
    """RECORD [n]: one per sample of the tar at `path`, in tar order (headers only)."""
    rows: list[list[int]] = []
    last_key = None
    with tarfile.open(path, mode="r:") as tar:
        while (member := tar.next()) is not None:
            tar.members = []  # keep no TarInfo list: shards hold ~10k members
            if not member.isfile():
                continue
            key, ext = _split_name(member.name)
            if os.path.basename(key).startswith(("__", ".")):
                continue  # webdataset skips hidden and meta members
            if key != last_key:
                rows.append([-1, -1, -1, -1, -1, -1])
                last_key = key
            slot = {"txt": 1, "json": 2}.get(ext, 0 if ext in IMAGE_EXTENSIONS else None)
            if slot is not None and rows[-1][2 * slot + 1] < 0:  # the first of a kind wins
                rows[-1][2 * slot : 2 * slot + 2] = [member.offset_data, member.size]
    out = np.zeros(len(rows), RECORD)
    if rows:
        table = np.asarray(rows, np.int64)
        for i, name in enumerate(RECORD.names):
            out[name] = table[:, i]
    return out


def parse(source: str) -> str | None:
    """The shard pattern of a WebDataset source ("wds:PATTERN" or a pattern ending in
    .tar), or None for another kind of source."""
    if source.startswith(PREFIX):
        return source[len(PREFIX) :]
    parts = [p.strip() for p in source.split(",") if p.strip()]
    return source if parts and all(p.endswith(".tar") for p in parts) else None


class TarSource:
    """Random-access samples {"image": uint8 [h, w, 3], caption_key: str} of tar shards."""

    def __init__(
        self,
        pattern: str,
        caption_key: str = "caption",
        json_caption_key: str = "",
        index_dir: str = "",
    ):
        self.pattern = pattern
        self.caption_key = caption_key or "caption"
        self.json_caption_key = json_caption_key
        self.shards = file_index.expand(pattern)
        self._index = [file_index.cached(p, RECORD, build_index, index_dir) for p in self.shards]
        counts = np.asarray([len(ix) for ix in self._index], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # int64 [shards + 1]
        if self._starts[-1] == 0:
            raise ValueError(f"data.source: the shards of {pattern!r} hold no samples")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, np.void]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, self._index[shard][index - int(self._starts[shard])]

    def key(self, index: int) -> str:
        """'SHARD:KEY' of sample `index` (read back from the tar header before a member)."""
        shard, rec = self._locate(index)
        path = self.shards[shard]
        for member in MEMBERS:
            if rec[f"{member}_size"] >= 0:
                block = file_index.read_at(path, int(rec[f"{member}_offset"]) - 512, 512)
                try:
                    name = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape").name
                    return f"{path}:{_split_name(name)[0]}"
                except tarfile.TarError:
                    break
        return f"{path}:#{index - int(self._starts[shard])}"

    def _member(self, path: str, rec: np.void, member: str) -> bytes | None:
        size = int(rec[f"{member}_size"])
        return None if size < 0 else file_index.read_at(path, int(rec[f"{member}_offset"]), size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, rec = self._locate(int(index))
        path = self.shards[shard]
        try:
            return self._read(path, rec)
        except BadRecord as e:  # the key is read only for a bad sample: one more pread
            raise BadRecord(f"{self.key(int(index))}{e}") from None
        except OSError as e:  # a shard truncated since it was indexed
            raise BadRecord(f"{path}:#{int(index) - int(self._starts[shard])}: {e}") from None

    def caption(self, index: int) -> str:
        """Sample `index`'s caption alone (no image is read), e.g. to train a tokenizer."""
        shard, rec = self._locate(int(index))
        try:
            return self._caption(self.shards[shard], rec)
        except BadRecord as e:
            raise BadRecord(f"{self.key(int(index))}{e}") from None

    def _caption(self, path: str, rec: np.void) -> str:
        if not self.json_caption_key:
            return decode_caption(self._member(path, rec, "text"), ".txt")
        raw = self._member(path, rec, "json")
        if raw is None:
            raise BadRecord(": no .json member to read the caption from")
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRecord(f".json: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or self.json_caption_key not in meta:
            raise BadRecord(f".json: no '{self.json_caption_key}' key")
        return decode_caption(meta[self.json_caption_key], ".json")

    def _read(self, path: str, rec: np.void) -> dict[str, Any]:
        """The sample of index record `rec`; BadRecord messages start after the location."""
        image = self._member(path, rec, "image")
        if image is None:
            raise BadRecord(f": no image member ({', '.join(IMAGE_EXTENSIONS)})")
        caption = self._caption(path, rec)
        return {"image": decode_image(image, ""), self.caption_key: caption}

    def __repr__(self) -> str:
        return f"TarSource({self.pattern!r}, {len(self.shards)} shards, {len(self)} samples)"
