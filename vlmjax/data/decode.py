"""Decoding one record's image and caption, with every failure a `BadRecord` naming where.

`decode_image` turns any image PIL opens into uint8 [h, w, 3]:
  * 16-bit greyscale (`I;16`, `I;16B`, `I` holding 0..65535) is scaled to 8 bits (x / 257,
    rounded); PIL's own `convert("RGB")` clips it, so a 16-bit PNG read as 99.6% white;
  * 32-bit float (`F`) is taken as 0..1 when its maximum is <= 1, else as 0..255, clipped;
  * CMYK (JPEG, including Adobe's inverted CMYK, which PIL undoes), palette, `LA`, `RGBA`,
    `1`, `L`, `YCbCr` -> RGB with PIL (alpha is dropped, as open_clip and torchvision do);
  * a truncated or corrupt file, a format PIL does not know, a mode it cannot convert and a
    decompression bomb (more than `Image.MAX_IMAGE_PIXELS` pixels) raise `BadRecord`.

`decode_caption` accepts non-empty UTF-8 text. The training pipeline skips and counts a
`BadRecord` (`vlmjax/data/skips.py`); everything else (a bug) still stops the run.
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
from PIL import Image


class BadRecord(ValueError):
    """A record that cannot be used; the message starts with where it is (FILE:LINE or
    SHARD:KEY) and says why."""


def _scaled(img: Image.Image) -> np.ndarray:
    """Modes PIL's convert would clip or mangle -> uint8 [h, w] (None: not such a mode)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.int64)
        if img.mode == "I" and wide.size and wide.max() <= 255 and wide.min() >= 0:
            return wide.astype(np.uint8)  # an 8-bit image stored as 32-bit ints
        # 65535 / 257 = 255 exactly, so white stays white and black black.
        return np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return None


def decode_image(data: bytes | str, where: str) -> np.ndarray:
    """Encoded image bytes (or a file path) -> uint8 [h, w, 3]; `BadRecord` (prefixed by
    `where`) when it is missing, corrupt, truncated, a decompression bomb or unconvertible."""
    if isinstance(data, str) and not os.path.isfile(data):
        raise BadRecord(f"{where}: no image file at {data!r}")
    if isinstance(data, bytes | bytearray | memoryview) and not len(data):
        raise BadRecord(f"{where}: empty image")
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x MAX_IMAGE_PIXELS and raises above: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(data) if not isinstance(data, str) else data
            with Image.open(handle) as img:
                img.load()  # decodes now: truncation shows here, not later
                gray = _scaled(img)
                if gray is not None:
                    return np.repeat(gray[..., None], 3, axis=-1)
                rgb = img if img.mode == "RGB" else img.convert("RGB")
                out = np.asarray(rgb, dtype=np.uint8)  # [h, w, 3]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRecord(f"{where}: decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as e:
        # Without object reprs ("<_io.BytesIO object at 0x...>"): a reason is the same
        # every time it is read.
        reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(e))
        raise BadRecord(f"{where}: cannot decode image ({type(e).__name__}: {reason})") from None
    if out.ndim != 3 or out.shape[-1] != 3 or 0 in out.shape:
        raise BadRecord(f"{where}: image decodes to shape {out.shape}, not [h, w, 3]")
    return out


def decode_caption(data: bytes | str | None, where: str) -> str:
    """UTF-8 bytes or str -> the stripped caption; `BadRecord` when missing, not UTF-8 or empty."""
    if data is None:
        raise BadRecord(f"{where}: no caption")
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"{where}: caption is not UTF-8 ({e})") from None
    if not isinstance(data, str):
        raise BadRecord(f"{where}: caption is {type(data).__name__}, not text")
    text = data.strip()
    if not text:
        raise BadRecord(f"{where}: empty caption")
    return text
