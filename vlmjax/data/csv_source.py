"""Image-path + caption tables (CSV/TSV, open_clip's `--csv-*` layout) as a random-access source.

    data.source = "csv:/data/train.tsv"   (or any path ending in .csv / .tsv)
    data.csv_img_key = "filepath"; data.csv_caption_key = "title"; data.csv_separator = "\\t"

The first line names the columns; every other non-blank line is one record (one line per
record: a quoted field may not span lines). Image paths are relative to the table's folder,
or absolute. Lines are indexed once (`file_index.LINE`: 16 bytes per record, cached like a
tar shard's index) and parsed when read, so no per-record memory is held. A record whose
line is not UTF-8, has too few fields, an empty caption or a missing or undecodable image
raises `decode.BadRecord("FILE:LINE: why")` (skipped and counted in training).
"""

from __future__ import annotations

import csv
import os
from typing import Any

from vlmjax.data import file_index
from vlmjax.data.decode import BadRecord, decode_caption, decode_image

PREFIX = "csv:"


def parse(source: str) -> str | None:
    """The path of a CSV/TSV source ("csv:PATH" or a path ending in .csv/.tsv), or None."""
    if source.startswith(PREFIX):
        return source[len(PREFIX) :]
    return source if source.endswith((".csv", ".tsv")) else None


def _fields(text: str, separator: str) -> list[str]:
    return next(csv.reader([text], delimiter=separator))


class CsvSource:
    """Random-access records {"image": uint8 [h, w, 3], caption_key: str} of one table."""

    def __init__(
        self,
        path: str,
        img_key: str = "filepath",
        caption_key: str = "title",
        separator: str = "\t",
        output_caption_key: str = "caption",
        index_dir: str = "",
    ):
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.source: no CSV/TSV file at {path!r}")
        if len(separator) != 1:
            raise ValueError(f"data.csv_separator={separator!r} must be one character")
        self.path, self.separator = path, separator
        self.root = os.path.dirname(os.path.abspath(path))
        self.output_caption_key = output_caption_key or "caption"
        lines = file_index.cached(path, file_index.LINE, file_index.line_offsets, index_dir)
        if len(lines) < 2:
            raise ValueError(f"{path}: needs a header line and at least one record")
        self._lines = lines
        header = self._text(0).lstrip("\ufeff")
        columns = _fields(header, separator)
        for key, value in (("csv_img_key", img_key), ("csv_caption_key", caption_key)):
            if value not in columns:
                raise ValueError(
                    f"data.{key}={value!r} is not a column of {path} (columns: {columns}; "
                    f"separator data.csv_separator={separator!r})"
                )
        self.columns = columns
        self._image_col, self._caption_col = columns.index(img_key), columns.index(caption_key)

    def _text(self, j: int) -> str:
        line = self._lines[j]
        raw = file_index.read_at(self.path, int(line["offset"]), int(line["length"]))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"{self.path}:{int(line['line'])}: not UTF-8 ({e})") from None

    def __len__(self) -> int:
        return len(self._lines) - 1

    def caption(self, index: int) -> str:
        """Record `index`'s caption alone (no image is read), e.g. to train a tokenizer."""
        return self._fields(index)[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        where, image, caption = self._fields(index)
        path = os.path.join(self.root, os.path.expanduser(image))
        return {
            "image": decode_image(path, f"{where}: image {image!r}"),
            self.output_caption_key: caption,
        }

    def _fields(self, index: int) -> tuple[str, str, str]:
        """(FILE:LINE, image path as written, caption) of record `index`, checked."""
        j = int(index) + 1  # line 0 is the header
        where = f"{self.path}:{int(self._lines[j]['line'])}"
        try:
            fields = _fields(self._text(j), self.separator)
        except csv.Error as e:
            raise BadRecord(f"{where}: not a {self.separator!r}-separated line ({e})") from None
        if len(fields) <= max(self._image_col, self._caption_col):
            raise BadRecord(f"{where}: {len(fields)} fields, the header has {len(self.columns)}")
        image = fields[self._image_col].strip()
        if not image:
            raise BadRecord(f"{where}: empty image path")
        return where, image, decode_caption(fields[self._caption_col], where)

    def __repr__(self) -> str:
        return f"CsvSource({self.path!r}, {len(self)} records)"
