"""Decoding every PIL mode, and jsonl records whose problems name FILE:LINE and are skipped
in training (issue 15)."""

import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlmjax.data import decode, jsonl, pipeline, shapes, skips


def _encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_16_bit_and_float_greyscale_are_scaled_not_clipped():
    levels = np.array([[0, 1, 128, 255]], np.uint16)
    wide = levels * 257  # the 16-bit values of those 8-bit levels
    png16 = _encoded(Image.fromarray(wide))  # PIL writes (and reads) mode I;16
    with Image.open(io.BytesIO(png16)) as img:
        assert img.mode.startswith("I")
        assert (np.asarray(img.convert("RGB"))[..., 0] == 255).sum() == 3  # PIL clips
    out = decode.decode_image(png16, "x")
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], levels)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    as_i = Image.fromarray(wide.astype(np.int32))  # mode I holding 16-bit values
    np.testing.assert_array_equal(decode.decode_image(_encoded(as_i, "TIFF"), "x")[..., 1], levels)
    floats = Image.fromarray(levels.astype(np.float32) / 255.0)  # mode F in [0, 1]
    assert floats.mode == "F"
    np.testing.assert_array_equal(
        decode.decode_image(_encoded(floats, "TIFF"), "x")[..., 0], levels
    )


def test_cmyk_palette_and_alpha_modes_become_rgb():
    scene = shapes.split_example("train", 3, 32)["image"]
    rgb = Image.fromarray(scene)
    cmyk = decode.decode_image(_encoded(rgb.convert("CMYK"), "JPEG"), "x")
    assert cmyk.shape == (32, 32, 3)
    assert np.abs(cmyk.astype(int) - scene.astype(int)).mean() < 6  # JPEG error only
    for mode in ("P", "LA", "RGBA", "L", "1"):
        img = rgb.convert(mode)
        np.testing.assert_array_equal(
            decode.decode_image(_encoded(img), "x"), np.asarray(img.convert("RGB"))
        )


def _scene_file(folder, name, index, size=32):
    image = shapes.split_example("train", index, 32)["image"]
    Image.fromarray(image).resize((size, size)).save(os.path.join(folder, name))
    return name


@pytest.fixture
def bad_jsonl(tmp_path):
    """A jsonl file with good lines and one of each record-level problem; returns (path,
    {record index: (line number, what its error must say)})."""
    folder = str(tmp_path)
    os.makedirs(os.path.join(folder, "img"))
    good = [_scene_file(folder, f"img/{i}.png", i) for i in range(6)]
    big = _scene_file(folder, "img/big.png", 6, size=64)
    with open(os.path.join(folder, "img/cut.png"), "wb") as f:
        f.write(open(os.path.join(folder, good[0]), "rb").read()[:60])
    absolute = os.path.join(folder, good[1])
    lines = [
        json.dumps({"image": good[0], "caption": "a", "label": 0}).encode(),
        json.dumps({"image": absolute, "caption": "b", "label": 1}).encode(),
        b'{"image": "img/2.png", "caption": "\xff\xfe", "label": 2}',  # not UTF-8
        json.dumps({"image": None, "caption": "c", "label": 3}).encode(),
        b'{"image": "img/3.png", "caption": "d", "label": NaN}',
        json.dumps({"image": good[4], "caption": None, "label": 4}).encode(),
        json.dumps({"image": "img/missing.png", "caption": "e", "label": 5}).encode(),
        json.dumps({"image": big, "caption": "f", "label": 0}).encode(),
        b"",  # a blank line is no record, but counts as a line
        json.dumps({"image": "img/cut.png", "caption": "g", "label": 1}).encode(),
        json.dumps({"image": good[5], "caption": "  ", "label": 2}).encode(),
        b"[1, 2]",
        json.dumps({"image": good[5], "caption": "h", "label": 5}).encode(),
    ]
    path = os.path.join(folder, "train.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    bad = {
        2: (3, "not UTF-8"),
        3: (4, '"image" is null'),
        4: (5, '"label" is nan, not an integer'),
        5: (6, '"caption" is null'),
        6: (7, "no image file"),
        7: (8, "decompression bomb"),
        8: (10, "cannot decode image"),
        9: (11, '"caption" is empty'),
        10: (12, "expected a JSON object"),
    }
    return path, bad


def test_jsonl_problems_name_file_and_line(bad_jsonl, monkeypatch):
    path, bad = bad_jsonl
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 32x32 fits, 64x64 is a "bomb"
    source = jsonl.JsonlSource(path, required=("caption",))
    assert len(source) == 12  # the blank line is no record
    assert source[0]["caption"] == "a" and source[0]["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(  # an absolute path is read where it is
        source[1]["image"], shapes.split_example("train", 1, 32)["image"]
    )
    assert source[11]["label"] == 5
    for index, (line, reason) in bad.items():
        with pytest.raises(decode.BadRecord) as e:
            source[index]
        assert str(e.value).startswith(f"{path}:{line}: "), e.value
        assert reason in str(e.value), e.value
    with pytest.raises(decode.BadRecord, match=f"{path}:3: not UTF-8"):
        source.field("caption")  # an evaluator's scan stops on the first bad line
    # An empty prompt is a captioning example, not a bad record; an empty target is bad.
    decoder = os.path.join(os.path.dirname(path), "decoder.jsonl")
    with open(decoder, "w") as f:
        f.write(json.dumps({"image": "img/0.png", "prompt": "", "target": "a"}) + "\n")
        f.write(json.dumps({"image": "img/0.png", "prompt": "q", "target": ""}) + "\n")
    lines = jsonl.JsonlSource(decoder, required=("prompt", "target"))
    assert lines[0]["prompt"] == "" and lines[0]["target"] == "a"
    with pytest.raises(decode.BadRecord, match=f'{decoder}:2: "target" is empty'):
        lines[1]
    # No image is read: the lines naming a missing, oversized or cut image give captions.
    assert source.field("caption", skip_bad=True) == ["a", "b", "e", "f", "g", "h"]


def test_jsonl_training_stream_skips_and_counts_bad_lines(bad_jsonl, monkeypatch):
    """The pipeline replaces each bad record (a mid-run missing image no longer stops
    training) and counts every failed read; the good examples are read as they are."""
    path, bad = bad_jsonl
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    source = jsonl.JsonlSource(path, required=("caption",))
    cfg = ml_collections.ConfigDict(dict(image_key="image", label_key="label", image_size=32))
    features = pipeline.classification_features(cfg)
    it = iter(pipeline.train_dataset(source, features, batch_size=4, seed=0))
    batches = [next(it) for _ in range(3)]  # one epoch of 12 positions
    order = [int(i) for i in pipeline.grain.MapDataset.source(list(range(12))).shuffle(seed=0)]
    expected = 0
    for pos in order:
        current, attempt = pos, 0
        while current in bad:
            expected, attempt = expected + 1, attempt + 1
            current = skips.replacement(pos, attempt, 12)
    assert sum(int(b[skips.SKIPPED].sum()) for b in batches) == expected >= len(bad)
    reasons = "\n".join(r for b in batches for r in b[skips.REASONS].tolist())
    assert all(f"{path}:{line}: " in reasons for line, _ in bad.values())
    good_labels = {0: 0, 1: 1, 11: 5}
    labels = sum((b["label"].tolist() for b in batches), [])
    for pos, label in zip(order, labels, strict=True):
        if pos in good_labels:
            assert label == good_labels[pos]
