"""Host-side image operations on uint8 numpy arrays [h, w, 3] (PIL for resampling)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# data.interpolation -> PIL filter (PIL's bicubic is what HF's CLIP image processor uses).
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resize(
    image: np.ndarray, height: int, width: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """Resize of uint8 [h, w, 3] to [height, width, 3] ("bilinear" or "bicubic", PIL)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"data.interpolation={interpolation!r} is not one of {sorted(INTERPOLATIONS)}"
        )
    if image.shape[:2] == (height, width):
        return image
    filter_ = INTERPOLATIONS[interpolation]
    return np.asarray(Image.fromarray(image).resize((width, height), filter_))


def resize_center_crop(
    image: np.ndarray, size: int, crop_fraction: float = 1.0, interpolation: str = "bilinear"
) -> np.ndarray:
    """uint8 [h, w, 3] -> [size, size, 3]: resize the short side to size/crop_fraction, then
    take the centre (crop_fraction 0.875 is the usual ImageNet evaluation crop).

    The long side becomes int(short * long / min(h, w)) (rounded down), as torchvision's
    Resize and HF image processors compute it, so a checkpoint's own preprocessing
    (`preprocessor_config.json`: shortest_edge, crop_size) is reproduced pixel for pixel."""
    h, w = image.shape[:2]
    short = round(size / crop_fraction)
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    new_h, new_w = max(size, new_h), max(size, new_w)
    resized = resize(image, new_h, new_w, interpolation)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Inception-style crop: a random area fraction in `scale` and aspect ratio in `ratio`
    (log-uniform), resized to [size, size, 3]; the centre crop if no sample fits."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            return resize(image[top : top + ch, left : left + cw], size, size, interpolation)
    return resize_center_crop(image, size, interpolation=interpolation)
