"""Test data in img2dataset's layouts, written from `shapes` scenes: WebDataset tar shards
with known bad samples, and the same samples as parquet and as a CSV of image files."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from vlmjax.data import shapes

NUM = 40  # samples, in 2 shards of 20
PER_SHARD = 20
# Samples that must be skipped, and why.
BAD = {
    5: "truncated jpg",
    13: "no .txt",
    22: "non-UTF-8 caption",
    31: "not an image",
    36: "blank caption",
}
CMYK, GREY16, PNG, WEBP = 9, 17, 2, 26  # good samples in other encodings


def key(i: int) -> str:
    return f"{i:09d}"


def sample(i: int) -> tuple[str, bytes, bytes | None]:
    """(image extension, image bytes, caption bytes or None) of sample i."""
    ex = shapes.split_example("train", i, 32)
    image, caption = ex["image"], ex["caption"].encode()
    buf, ext = io.BytesIO(), "jpg"
    if i == CMYK:
        Image.fromarray(image).convert("CMYK").save(buf, "JPEG", quality=95)
    elif i == GREY16:  # 16-bit greyscale PNG: the 8-bit grey level x 257
        grey = np.asarray(Image.fromarray(image).convert("L"), np.uint16) * 257
        Image.fromarray(grey).save(buf, "PNG")  # PIL writes mode I;16
        ext = "png"
    elif i == PNG:
        Image.fromarray(image).save(buf, "PNG")
        ext = "png"
    elif i == WEBP:
        Image.fromarray(image).save(buf, "WEBP", lossless=True)
        ext = "webp"
    else:
        Image.fromarray(image).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    if i == 5:
        data = data[: len(data) // 2]
    elif i == 31:
        data = b"<html>404 not found</html>"
    if i == 13:
        caption = None
    elif i == 22:
        caption = b"\xff\xfe caption"
    elif i == 36:
        caption = b"  \n"
    return ext, data, caption


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: str) -> str:
    """2 shards of 20 samples ({key}.jpg|png|webp, .txt, .json); returns the brace pattern."""
    os.makedirs(folder, exist_ok=True)
    for s in range(NUM // PER_SHARD):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                ext, image, caption = sample(i)
                _add(tar, f"{key(i)}.{ext}", image)
                if caption is not None:
                    _add(tar, f"{key(i)}.txt", caption)
                meta = {"key": key(i), "caption": caption.decode("latin-1") if caption else None}
                _add(tar, f"{key(i)}.json", json.dumps(meta).encode())
    return os.path.join(folder, "{00000..00001}.tar")


def write_parquet(folder: str) -> str:
    """The same samples as one parquet file per shard (img2dataset columns jpg, caption)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    for s in range(NUM // PER_SHARD):
        rows = [sample(i) for i in range(s * PER_SHARD, (s + 1) * PER_SHARD)]
        table = pa.table(
            {
                "key": [key(i) for i in range(s * PER_SHARD, (s + 1) * PER_SHARD)],
                "jpg": pa.array([r[1] for r in rows], pa.binary()),
                "caption": pa.array([r[2] for r in rows], pa.binary()),
            }
        )
        pq.write_table(table, os.path.join(folder, f"{s:05d}.parquet"), row_group_size=8)
    return os.path.join(folder, "*.parquet")


def write_csv(folder: str) -> str:
    """The same samples as image files and a TSV (open_clip's filepath / title columns)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "train.tsv")
    with open(path, "wb") as f:
        f.write(b"filepath\ttitle\n")
        for i in range(NUM):
            ext, image, caption = sample(i)
            name = f"images/{key(i)}.{ext}"
            with open(os.path.join(folder, name), "wb") as img:
                img.write(image)
            f.write(name.encode() + b"\t" + (caption or b"").strip(b"\n") + b"\n")
    return path
