"""Image-text data from a JSON Lines file: `data.source = "jsonl:/path/file.jsonl"`.

One JSON object per line. `image` is a path relative to the file's folder (or absolute), any
format PIL reads (PNG, JPEG, ...; every mode decoded as `decode.decode_image` says); the
other fields are kept as they are: `caption` for contrastive training, `prompt`/`target`
for the decoder, an optional integer `label`.

    {"image": "imgs/0001.jpg", "caption": "a dog on a beach"}

Records are read by random access: opening the file indexes the byte offset, length and
number of every non-blank line (`file_index.LINE`, 16 bytes per record, cached beside the
file like a tar shard's index), so a process holds no per-record memory whatever the
captions' length, and the file works with the same shuffled, resumable pipelines as tfds
sources. A line is parsed when it is read; every record-level problem is a
`decode.BadRecord` naming FILE:LINE: not UTF-8, not JSON, not an object, a missing or null
field, an empty text (but for `prompt`), a label that is not a finite integer, a missing, corrupt or
oversized (decompression bomb) image. Training skips and counts those (`skips.py`); an
evaluator or a scan of every caption (`field`) stops on the first, naming it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmjax.data import file_index
from vlmjax.data.decode import BadRecord, decode_image

PREFIX = "jsonl:"
MAY_BE_EMPTY = ("prompt",)  # an empty prompt is a captioning example (the decoder task)


def _check_value(key: str, value: Any, where: str) -> Any:
    """A required field's value, checked: not null, texts not empty, labels integers."""
    if value is None:
        raise BadRecord(f'{where}: "{key}" is null')
    if key == "label":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRecord(f'{where}: "label" is {value!r}, not an integer')
        if not math.isfinite(value) or value != int(value):
            raise BadRecord(f'{where}: "label" is {value!r}, not an integer')
        return int(value)
    if key in MAY_BE_EMPTY:
        return value
    if isinstance(value, str) and not value.strip():
        raise BadRecord(f'{where}: "{key}" is empty')
    if isinstance(value, list):
        if not value or any(v is None or (isinstance(v, str) and not v.strip()) for v in value):
            raise BadRecord(f'{where}: "{key}" is an empty list or holds an empty text')
    return value


class JsonlSource:
    """Random-access records {image: uint8 [h, w, 3], <other fields>} from a .jsonl file."""

    def __init__(self, path: str, required: Sequence[str] = ("image",), index_dir: str = ""):
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.source: no JSON Lines file at {path!r}")
        self.path = path
        self.root = os.path.dirname(os.path.abspath(path))
        self.required = tuple(dict.fromkeys(("image", *required)))
        self._lines = file_index.cached(path, file_index.LINE, file_index.line_offsets, index_dir)
        if not len(self._lines):
            raise ValueError(f"{path} holds no records")

    def __len__(self) -> int:
        return len(self._lines)

    def record(self, index: int) -> dict[str, Any]:
        """Line `index` parsed and checked, the image path not yet opened."""
        line = self._lines[int(index)]
        where = f"{self.path}:{int(line['line'])}"
        raw = file_index.read_at(self.path, int(line["offset"]), int(line["length"]))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"{where}: not UTF-8 ({e})") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise BadRecord(f"{where}: expected a JSON object per line")
        missing = [k for k in self.required if k not in record]
        if missing:
            raise BadRecord(
                f"{where}: missing field(s) {missing}; every line needs "
                f"{sorted(self.required)} (has {sorted(record)})"
            )
        for key in self.required:
            record[key] = _check_value(key, record[key], where)
        if "label" in record:
            record["label"] = _check_value("label", record["label"], where)
        if not isinstance(record["image"], str):
            raise BadRecord(f'{where}: "image" is {record["image"]!r}, not a path')
        record["_where"] = where
        return record

    def field(self, key: str, skip_bad: bool = False) -> list[Any]:
        """Every record's `key` (no image is read), e.g. all captions to train a tokenizer;
        one per record in order, or, with `skip_bad`, only the good records' values."""
        values = []
        for i in range(len(self)):
            try:
                record = self.record(i)
                where = record["_where"]
                if key not in record:
                    raise BadRecord(f"{where}: missing field {key!r} (has {sorted(record)})")
                values.append(_check_value(key, record[key], where))
            except BadRecord:
                if not skip_bad:
                    raise
        return values

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.record(index)
        where = record.pop("_where")
        # An absolute path stays as it is; a relative one is relative to the file's folder.
        image_path = os.path.join(self.root, os.path.expanduser(record["image"]))
        record["image"] = decode_image(image_path, f"{where}: image {record['image']!r}")
        if "label" in record:
            record["label"] = np.int64(record["label"])
        return record

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"


def parse(source: str) -> str | None:
    """The file path of a "jsonl:PATH" source, or None for any other source."""
    return source[len(PREFIX) :] if source.startswith(PREFIX) else None
