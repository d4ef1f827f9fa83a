"""The embedded `shapes` dataset: rendered scenes of coloured shapes, offline and deterministic.

Each scene is a dark, noisy background with one shape, or two shapes (one small, one large)
in a spatial relation. Every example carries a class label (the large shape's kind), a
caption, and one question/answer pair, so the same data serves classification, captioning
and VQA. One (kind, colour) combination per kind never appears in `train`; the `heldout`
split marks scenes that use one with `novel` = 1, to measure compositional generalisation.

Example i of a split is rendered from `np.random.default_rng((split_seed, i))` alone, so the
data does not depend on generation order, process count or which sizes were built before.
Images are drawn with numpy (coordinate-grid masks, 4x4 supersampled for antialiasing) and
stored as array_record through tfds, which reads back without TensorFlow.
"""

from __future__ import annotations

import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

KINDS = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
RELATIONS = ("above", "below", "left of", "right of")
# One held-out colour per kind and one held-out kind per colour (a permutation), so every
# kind and every colour is still seen in training, just never in that pairing.
HELDOUT_COMBOS = tuple(zip(KINDS, COLOURS, strict=True))

_RGB = np.array(
    [[220, 40, 40], [40, 190, 60], [50, 90, 235], [230, 210, 40], [210, 50, 210], [40, 205, 215]],
    np.float32,
)
_HELDOUT_COLOUR = {KINDS.index(k): COLOURS.index(c) for k, c in HELDOUT_COMBOS}
_INVERSE = (1, 0, 3, 2)  # the relation seen from the other shape
_DIAMETER = ((0.25, 0.35), (0.45, 0.65))  # fraction of the image side, per size
_MAX_PAIR = 0.88  # two shapes (plus margins and a gap) must fit across the image
_SPLIT_SEEDS = {"train": 0, "heldout": 1}
_SUPERSAMPLE = 4


# --- rendering -------------------------------------------------------------------------------


def _inside(kind: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of `kind` at points (x, y) in units of the shape's half-extent, y down."""
    ax, ay = np.abs(x), np.abs(y)
    if kind == 0:  # circle
        return x * x + y * y <= 1.0
    if kind == 1:  # square: a bit smaller than its box so its area matches the others
        return np.maximum(ax, ay) <= 0.9
    if kind == 2:  # triangle, apex up, filling its box
        return (y <= 1.0) & (2.0 * ax <= y + 1.0)
    if kind == 3:  # diamond
        return ax + ay <= 1.0
    if kind == 4:  # cross: thick arms so they survive at ~8 px
        return ((ax <= 0.34) & (ay <= 0.95)) | ((ay <= 0.34) & (ax <= 0.95))
    # Five-pointed star, point up. Fold the angle into one half-spike, where the edge is the
    # segment from the outer tip A = (1, 0) to the inner corner B; fat (inner radius 0.5) so
    # it does not shrink to a blob at small sizes. Shifted down so its box is centred.
    y = y - 0.095
    rho = np.hypot(x, y)
    sector = 2 * np.pi / 5
    phi = np.mod(np.arctan2(y, x) + np.pi / 2, sector)
    phi = np.minimum(phi, sector - phi)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    bx, by = 0.5 * np.cos(sector / 2), 0.5 * np.sin(sector / 2)
    return (bx - 1.0) * py - by * (px - 1.0) >= 0.0  # same side of A->B as the centre


def _coverage(kind: int, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """float32 [size, size]: the fraction of each pixel (c spans [c, c+1)) inside the shape."""
    out = np.zeros((size, size), np.float32)
    x0, x1 = max(int(cx - half) - 1, 0), min(int(cx + half) + 2, size)
    y0, y1 = max(int(cy - half) - 1, 0), min(int(cy + half) + 2, size)
    sub = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    xs = ((np.arange(x0, x1)[:, None] + sub).ravel() - cx) / half
    ys = ((np.arange(y0, y1)[:, None] + sub).ravel() - cy) / half
    mask = _inside(kind, xs[None, :], ys[:, None])
    cov = mask.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = cov
    return out


def _attributes(rng: np.random.Generator, allow_heldout: bool, novel: bool) -> tuple[int, int]:
    """(kind, colour) ids: a held-out pair if `novel`, else any allowed pair, uniformly."""
    kind = int(rng.integers(len(KINDS)))
    held = _HELDOUT_COLOUR[kind]
    if novel:
        return kind, held
    if allow_heldout:
        return kind, int(rng.integers(len(COLOURS)))
    colour = int(rng.integers(len(COLOURS) - 1))
    return kind, colour + (colour >= held)


def _layout(rng: np.random.Generator, size: int, two: bool) -> tuple[list, int]:
    """([(size_id, cx, cy, half)] large first, relation of small to large (-1 if one shape))."""
    margin = gap = 0.03 * size
    if not two:
        size_id = int(rng.integers(2))
        half = rng.uniform(*_DIAMETER[size_id]) * size / 2
        cx, cy = rng.uniform(margin + half, size - margin - half, size=2)
        return [(size_id, cx, cy, half)], -1
    d_small = rng.uniform(*_DIAMETER[0])
    d_large = rng.uniform(_DIAMETER[1][0], min(_DIAMETER[1][1], _MAX_PAIR - d_small))
    hs, hl = d_small * size / 2, d_large * size / 2
    relation = int(rng.integers(len(RELATIONS)))
    # Along the relation's axis the boxes are separated by at least `gap`; across it, the
    # offset stays under half that separation, so the stated relation is the dominant one.
    sep = rng.uniform(hs + hl + gap, size - 2 * margin - hs - hl)
    if relation in (0, 2):  # small above / left of large: small comes first along the axis
        a_small = rng.uniform(margin + hs, size - margin - hl - sep)
        a_large = a_small + sep
    else:
        a_large = rng.uniform(margin + hl, size - margin - hs - sep)
        a_small = a_large + sep
    c_large = rng.uniform(margin + hl, size - margin - hl)
    c_small = rng.uniform(
        max(margin + hs, c_large - sep / 2), min(size - margin - hs, c_large + sep / 2)
    )
    if relation < 2:  # vertical relation: the axis is y
        return [(1, c_large, a_large, hl), (0, c_small, a_small, hs)], relation
    return [(1, a_large, c_large, hl), (0, a_small, c_small, hs)], relation


def _question(
    rng: np.random.Generator, shapes: list[tuple[int, int, int]], relation: int, allow_heldout: bool
) -> tuple[str, str]:
    """One (question, answer) well defined for the scene; `shapes` = [(size, kind, colour)]."""
    n = len(shapes)
    same_kind = n == 2 and shapes[0][1] == shapes[1][1]

    def ref(slot: int) -> str:  # a unique description of the shape in `slot`
        s, k, _ = shapes[slot]
        return f"the {SIZES[s]} {KINDS[k]}" if same_kind else f"the {KINDS[k]}"

    types = ["colour", "shape_by_size", "count", "exists"]
    if not same_kind:
        types.append("size")  # (otherwise the reference itself gives the size away)
    if n == 1 or shapes[0][2] != shapes[1][2]:
        types.append("shape_by_colour")
    if n == 2:
        types.append("relation")
    qtype = types[rng.integers(len(types))]
    slot = int(rng.integers(n))
    s, k, c = shapes[slot]
    if qtype == "colour":
        return f"what colour is {ref(slot)}?", COLOURS[c]
    if qtype == "shape_by_size":
        return f"what shape is the {SIZES[s]} object?", KINDS[k]
    if qtype == "shape_by_colour":
        return f"what shape is the {COLOURS[c]} object?", KINDS[k]
    if qtype == "count":
        return "how many shapes are there?", ("one", "two")[n - 1]
    if qtype == "size":
        return f"what size is {ref(slot)}?", SIZES[s]
    if qtype == "relation":  # `relation` is the small shape's (slot 1) relative to the large
        rel = relation if slot == 1 else _INVERSE[relation]
        return f"where is {ref(slot)} relative to {ref(1 - slot)}?", RELATIONS[rel]
    if rng.random() < 0.5:
        return f"is there a {COLOURS[c]} {KINDS[k]}?", "yes"
    # A near miss (right kind, wrong colour or the reverse) so the answer needs binding.
    # Train questions never even name a held-out pair.
    present = {(kk, cc) for _, kk, cc in shapes}
    while True:
        if rng.random() < 0.5:
            k2, c2 = k, int(rng.integers(len(COLOURS)))
        else:
            k2, c2 = int(rng.integers(len(KINDS))), c
        if (k2, c2) not in present and (allow_heldout or _HELDOUT_COLOUR[k2] != c2):
            return f"is there a {COLOURS[c2]} {KINDS[k2]}?", "no"


def render_example(
    rng: np.random.Generator, image_size: int, allow_heldout: bool, force_novel: bool
) -> dict:
    """Renders one scene from `rng`.

    Args:
      rng: the only source of randomness (the example is a pure function of its state).
      image_size: side S of the square image.
      allow_heldout: whether shapes may use a held-out (kind, colour) pair.
      force_novel: at least one shape uses a held-out pair (needs `allow_heldout`).

    Returns:
      {'image': uint8 [S, S, 3], 'label': int (large shape's kind), 'caption': str,
       'question': str, 'answer': str, 'novel': int64 0/1,
       'kinds', 'colours': int64 [2] (slot 0 = large or only shape; -1 in slot 1 if single)}.
    """
    if force_novel and not allow_heldout:
        raise ValueError("force_novel needs allow_heldout")
    size = image_size
    two = rng.random() < 0.5
    layout, relation = _layout(rng, size, two)
    novel_slot = int(rng.integers(len(layout))) if force_novel else -1
    attrs = [_attributes(rng, allow_heldout, slot == novel_slot) for slot in range(len(layout))]

    # Background: dark base colour + gentle gradient; every channel stays below ~100, while
    # each shape colour has a channel above ~180, so the two never coincide.
    lin = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    grad = rng.uniform(-15, 15, size=(2, 3)).astype(np.float32)
    image = rng.uniform(15, 70, size=3).astype(np.float32) + (
        lin[:, None, None] * grad[0] + lin[None, :, None] * grad[1]
    )
    for (_, cx, cy, half), (kind, colour) in zip(layout, attrs, strict=True):
        alpha = _coverage(kind, cx, cy, half, size)[..., None]
        rgb = np.minimum(_RGB[colour] * rng.uniform(0.8, 1.1), 255.0)  # brightness jitter
        image = image * (1.0 - alpha) + rgb * alpha
    image += rng.normal(0.0, 4.0, size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    shapes = [(s, k, c) for (s, *_), (k, c) in zip(layout, attrs, strict=True)]
    words = [f"a {SIZES[s]} {COLOURS[c]} {KINDS[k]}" for s, k, c in shapes]
    if two and rng.random() < 0.5:  # mention the small shape first
        caption = f"{words[1]} {RELATIONS[relation]} {words[0]}"
    elif two:
        caption = f"{words[0]} {RELATIONS[_INVERSE[relation]]} {words[1]}"
    else:
        caption = words[0]
    question, answer = _question(rng, shapes, relation, allow_heldout)
    kinds = np.full(2, -1, np.int64)
    colours = np.full(2, -1, np.int64)
    kinds[: len(attrs)], colours[: len(attrs)] = zip(*attrs, strict=True)
    novel = any(_HELDOUT_COLOUR[k] == c for k, c in attrs)
    return {
        "image": image,
        "label": attrs[0][0],
        "caption": caption,
        "question": question,
        "answer": answer,
        "novel": np.int64(novel),
        "kinds": kinds,
        "colours": colours,
    }


def split_example(split: str, index: int, image_size: int) -> dict:
    """Example `index` of `split` ('train' or 'heldout'), exactly as the builder stores it."""
    rng = np.random.default_rng((_SPLIT_SEEDS[split], index))
    if split == "train":
        return render_example(rng, image_size, allow_heldout=False, force_novel=False)
    # heldout: half the scenes use a held-out pair, the other half only seen pairs, so
    # accuracy on each half compares novel against seen compositions at equal difficulty.
    novel = bool(rng.random() < 0.5)
    return render_example(rng, image_size, allow_heldout=novel, force_novel=novel)


# --- tfds builder ----------------------------------------------------------------------------


class ShapesConfig(tfds.core.BuilderConfig):
    """Image side and split sizes; the name (e.g. `s32_tr20000_ho2000`) encodes all three."""

    def __init__(self, image_size: int = 32, num_train: int = 20000, num_heldout: int = 2000):
        super().__init__(
            name=f"s{image_size}_tr{num_train}_ho{num_heldout}",
            description=f"{image_size}x{image_size} images, {num_train} train, "
            f"{num_heldout} heldout examples",
        )
        self.image_size = image_size
        self.num_train = num_train
        self.num_heldout = num_heldout


class Shapes(tfds.core.GeneratorBasedBuilder):
    """tfds builder of the `shapes` dataset (splits `train` and `heldout`)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ShapesConfig()]

    # tfds' default looks the file up through `importlib_resources`, a backport package it
    # does not install (the lookup then fails with ModuleNotFoundError): point at it directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict(
            {
                # Tensor, not Image: Image needs TensorFlow to encode PNGs.
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=KINDS),
                "caption": text,
                "question": text,
                "answer": text,
                "novel": tfds.features.Scalar(np.int64),
                "kinds": tfds.features.Tensor(shape=(2,), dtype=np.int64),
                "colours": tfds.features.Tensor(shape=(2,), dtype=np.int64),
            }
        )
        # Examples are already i.i.d.; keeping generation order makes record i = example i.
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__, features=features, disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "heldout": self._generate_examples("heldout", cfg.num_heldout),
        }

    def _generate_examples(self, split: str, num: int):
        size = self.builder_config.image_size
        for i in range(num):
            yield i, split_example(split, i, size)


# --- public entry points ---------------------------------------------------------------------


def default_data_dir() -> str:
    """$VLMJAX_DATA_DIR, else ~/.cache/vlmjax/tensorflow_datasets."""
    return os.environ.get("VLMJAX_DATA_DIR") or os.path.expanduser(
        "~/.cache/vlmjax/tensorflow_datasets"
    )


def _builder(data_dir: str | None, image_size: int, num_train: int, num_heldout: int) -> Shapes:
    config = ShapesConfig(image_size, num_train, num_heldout)
    # tfds refuses a new config object named like a BUILDER_CONFIGS one: pass those by name.
    known = {c.name for c in Shapes.BUILDER_CONFIGS}
    return Shapes(
        config=config.name if config.name in known else config,
        data_dir=data_dir or default_data_dir(),
    )


def dataset_dir(
    data_dir: str | None, image_size: int = 32, num_train: int = 20000, num_heldout: int = 2000
) -> str:
    """The folder holding this configuration's prepared files (and derived ones, such as a
    word vocabulary trained on its captions)."""
    return _builder(data_dir, image_size, num_train, num_heldout).data_dir


def _is_prepared(builder: Shapes) -> bool:
    return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def prepare(
    data_dir: str | None = None,
    image_size: int = 32,
    num_train: int = 20000,
    num_heldout: int = 2000,
) -> tfds.core.DatasetBuilder:
    """Builds the dataset (once; later calls are a no-op) and returns its builder.

    Safe to call from several processes at once on one machine: an exclusive `flock` on
    `<data_dir>/.shapes-<config>.lock` lets one process build while the others wait, then
    find it prepared. (tfds also writes into a temporary folder and renames it at the end.)
    On a filesystem without working `flock`, prepare on one process and barrier first.
    """
    data_dir = data_dir or default_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    name = ShapesConfig(image_size, num_train, num_heldout).name
    with open(os.path.join(data_dir, f".shapes-{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Built after taking the lock, so it sees a dataset another process just wrote.
            builder = _builder(data_dir, image_size, num_train, num_heldout)
            if not _is_prepared(builder):
                builder.download_and_prepare(file_format="array_record")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return builder


def data_source(
    split: str,
    data_dir: str | None = None,
    image_size: int = 32,
    num_train: int = 20000,
    num_heldout: int = 2000,
):
    """Random-access source of a prepared split ('train' or 'heldout').

    Supports len() and integer indexing; record i is example i, a dict of numpy values:
    image uint8 [S, S, 3], label int (KINDS id), caption/question/answer bytes, novel int
    (0/1), kinds/colours int64 [2]. Raises FileNotFoundError if `prepare` has not been run.
    """
    builder = _builder(data_dir, image_size, num_train, num_heldout)
    if not _is_prepared(builder):
        raise FileNotFoundError(
            f"shapes/{builder.builder_config.name} is not prepared under {builder.data_dir}: "
            "call vlmjax.data.shapes.prepare(...) with the same arguments first"
        )
    return builder.as_data_source(split=split)
