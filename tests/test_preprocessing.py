"""data.mean / data.std / data.interpolation and a folder's preprocessor config, without
transformers: device normalisation against numpy, the HF rule for the resized long side,
the preprocessor fields read by init_from=hf:, and the validation errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vlmjax import config as config_lib
from vlmjax import defaults, export, init_hf
from vlmjax.data import image_ops, pipeline
from vlmjax.tasks import classification


def test_normalise_uses_the_configured_mean_and_std():
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3) * 14
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    got = np.asarray(classification.normalise(images, mean, std))
    want = (images / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    default = np.asarray(classification.normaliser(defaults.base_config().data)(images))
    np.testing.assert_array_equal(default, images.astype(np.float32) / 127.5 - 1.0)


def test_resize_center_crop_rounds_the_long_side_down_and_honours_interpolation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    # Short side 36 (32 / (32/36)); long side int(36 * 61 / 45) = 48 (round would give 49).
    crop = 32 / 36
    got = image_ops.resize_center_crop(image, 32, crop, "bicubic")
    resized = np.asarray(Image.fromarray(image).resize((48, 36), Image.BICUBIC))
    np.testing.assert_array_equal(got, resized[2:34, 8:40])
    bilinear = image_ops.resize_center_crop(image, 32, crop, "bilinear")
    assert np.abs(bilinear.astype(int) - got.astype(int)).max() > 0
    # An image already S x S is still resized and cropped when the fraction is below 1.
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert not np.array_equal(pipeline.as_image(square, 32, crop, "bicubic"), square)
    np.testing.assert_array_equal(pipeline.as_image(square, 32, 1.0), square)
    with pytest.raises(ValueError, match="data.interpolation='nearest'"):
        image_ops.resize(image, 10, 10, "nearest")


def test_preprocessor_config_round_trip(tmp_path):
    config = defaults.base_config()
    config.data.mean, config.data.std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    config.data.interpolation, config.data.image_size = "bicubic", 224
    config.data.eval_crop_fraction = 0.875
    written = export.preprocessor_config(config.data)
    assert written["size"] == {"shortest_edge": 256} and written["resample"] == 3
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(written))
    read = init_hf.read_preprocessor(str(tmp_path))
    assert read == dict(
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
        interpolation="bicubic",
        image_size=224,
        eval_crop_fraction=224 / 256,
    )
    # transformers 5's processor_config.json nests the same fields.
    os.remove(tmp_path / "preprocessor_config.json")
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": written}))
    assert init_hf.read_preprocessor(str(tmp_path)) == read
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"image_processor": dict(written, resample=0)})
    )
    with pytest.raises(config_lib.ConfigError, match="resample=0"):
        init_hf.read_preprocessor(str(tmp_path))


def test_bad_preprocessing_values_are_config_errors():
    config = defaults.base_config()
    config.data.mean = (0.5, 0.5)
    config.data.std = (0.5, 0.0, 0.5)
    config.data.interpolation = "bicubc"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    message = str(e.value)
    assert "data.mean=(0.5, 0.5) must be 3 numbers" in message
    assert "data.std=(0.5, 0.0, 0.5) must be > 0" in message
    assert "did you mean 'bicubic'" in message
    config.data.mean, config.data.std, config.data.interpolation = (0.5,) * 3, (0.5,) * 3, "bicubic"
    config.optimizer.ema_decay = 1.0
    with pytest.raises(config_lib.ConfigError, match="optimizer.ema_decay=1.0 must be < 1"):
        config_lib.validate(config)
