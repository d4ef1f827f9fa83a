"""Image-text data from a JSON Lines file: `data.source = "jsonl:/path/file.jsonl"`.

One JSON object per line. `image` is a path relative to the file's folder (or absolute), any
format PIL reads (PNG, JPEG, ...); the other fields are kept as they are: `caption` for
contrastive training, `prompt`/`target` for the decoder, an optional integer `label`.

    {"image": "imgs/0001.jpg", "caption": "a dog on a beach"}

Records are read by random access (byte offsets are indexed once), so the file works with
the same shuffled, resumable pipelines as tfds sources. Every line is parsed and checked
when the source is opened: a malformed line or a missing field is an error naming the line,
before any training starts, and a missing or unreadable image names its file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

PREFIX = "jsonl:"


class JsonlSource:
    """Random-access records {image: uint8 [h, w, 3], <other fields>} from a .jsonl file."""

    def __init__(self, path: str, required: Sequence[str] = ("image",)):
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.source: no JSON Lines file at {path!r}")
        self.path = path
        self.root = os.path.dirname(os.path.abspath(path))
        self._records: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object per line")
                missing = [k for k in ("image", *required) if k not in record]
                if missing:
                    raise ValueError(
                        f"{path}:{number}: missing field(s) {missing}; every line needs "
                        f"{sorted(set(('image', *required)))} (has {sorted(record)})"
                    )
                record["_line"] = number
                self._records.append(record)
        if not self._records:
            raise ValueError(f"{path} holds no records")

    def __len__(self) -> int:
        return len(self._records)

    def field(self, key: str) -> list[Any]:
        """Every record's `key` (no image is read), e.g. all captions to train a tokenizer."""
        return [r[key] for r in self._records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = dict(self._records[int(index)])
        line = record.pop("_line")
        image_path = os.path.join(self.root, record["image"])
        try:
            with Image.open(image_path) as img:
                record["image"] = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [h, w, 3]
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}:{line}: cannot read image {image_path!r}: {e}") from e
        if "label" in record:
            record["label"] = np.int64(record["label"])
        return record

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"


def parse(source: str) -> str | None:
    """The file path of a "jsonl:PATH" source, or None for any other source."""
    return source[len(PREFIX) :] if source.startswith(PREFIX) else None
