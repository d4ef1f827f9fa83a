"""Host-side (numpy) inputs of the Fuyu decoder: patches, token layout, masks and packing.

One example is an image uint8 [h, w, c] of any size, prompt token ids and (for training)
target token ids. Its sequence, as in Hugging Face's FuyuProcessor:

    [PATCH x cols, NEWLINE] x rows, BOS, prompt..., BOA, target..., EOS

The image is padded (bottom and right) to whole patches, cut into p x p patches in row
order, and each patch flattened as (row, column, channel) pixels. BOA ("beginning of
answer") is appended to every prompt by HF's processor; set `Tokens.boa=None` to leave it
out. Position i is trained to predict token i + 1; the loss covers the positions whose next
token is target text or the EOS that closes it, never the image, newlines or prompt.

Examples are then packed into fixed-length rows (first fit), with `segment_ids` (1, 2, ...
per example, 0 for padding) and per-segment `positions`, so images of any size waste no
compute beyond a row's tail. A batch is a dict of numpy arrays, `R` rows of `T` tokens:

    tokens      [R, T] int32    token ids (image positions hold `Tokens.image`)
    patches     [R, T, p*p*c] float32  normalised pixels at image positions, zeros elsewhere
    image_mask  [R, T] bool     True at patch positions
    segment_ids [R, T] int32    example number within the row, 0 for padding
    positions   [R, T] int32    position within the example (rotary positions)
    targets     [R, T] int32    the next token within the example (pad at its last token)
    loss_mask   [R, T] float32  1 where `targets` is target text or its EOS

`packed_batches` streams examples into such batches; `prompt_batch` builds left-padded
prompts for `vlmjax.generate`. `hf_compatible()` gives the layout that reproduces
FuyuProcessor exactly (its canvas resize and token ids).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

BATCH_KEYS = (
    "tokens",
    "patches",
    "image_mask",
    "segment_ids",
    "positions",
    "targets",
    "loss_mask",
)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Special token ids; the defaults are adept/fuyu-8b's."""

    image: int = 71011  # |SPEAKER|: placeholder at patch positions (HF finds patches by it)
    newline: int = 71019  # |NEWLINE|: closes each row of patches
    bos: int | None = 1  # <s>; None: the prompt starts right after the image
    eos: int = 2  # </s>: closes the target text
    pad: int = 0
    boa: int | None = 71122  # <0x04>, "beginning of answer", after the prompt; None: omit


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """How examples become sequences.

    `canvas` (height, width): images larger than it are first downscaled to fit (aspect
    ratio kept, PIL bilinear), as FuyuImageProcessor does with its 1080 x 1920 canvas;
    None keeps every image at its own size. `pad_value` is the raw pixel value that fills
    the last row and column of patches (HF pads with 1 before normalising).
    """

    patch_size: int = 30
    channels: int = 3
    tokens: Tokens = Tokens()
    canvas: tuple[int, int] | None = None
    pad_value: int = 1

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels


HF_CANVAS = (1080, 1920)


def hf_compatible(
    patch_size: int = 30, tokens: Tokens = Tokens(), canvas: tuple[int, int] = HF_CANVAS
) -> LayoutSpec:
    """The layout of transformers' FuyuProcessor + FuyuImageProcessor (defaults: fuyu-8b)."""
    if canvas[0] % patch_size or canvas[1] % patch_size:
        raise ValueError(f"canvas {canvas} must be a multiple of patch_size {patch_size}")
    return LayoutSpec(patch_size=patch_size, tokens=tokens, canvas=canvas)


# ----------------------------------------------------------------------------- images


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5, in HF's order of
    operations (rescale in float64, cast, normalise in float32) so values match bit for bit."""
    x = (np.asarray(pixels).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


def resize_to_canvas(image: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """Downscales uint8 [h, w, c] to fit within canvas (height, width), keeping the aspect
    ratio; smaller images are returned as they are. Sizes and filter as FuyuImageProcessor
    (int(side * scale), PIL bilinear)."""
    height, width = image.shape[:2]
    if height <= canvas[0] and width <= canvas[1]:
        return image
    from PIL import Image  # imported here: only images larger than the canvas need it

    scale = min(canvas[0] / height, canvas[1] / width)
    size = (int(width * scale), int(height * scale))  # PIL takes (width, height)
    squeeze = image.ndim == 3 and image.shape[2] == 1
    resized = Image.fromarray(image[..., 0] if squeeze else image).resize(
        size, resample=Image.Resampling.BILINEAR
    )
    out = np.asarray(resized)
    return out[..., None] if squeeze else out


def pad_to_patches(image: np.ndarray, patch_size: int, value: float = 0) -> np.ndarray:
    """[h, w, c] -> [ceil(h/p)*p, ceil(w/p)*p, c], padded at the bottom and right."""
    height, width = image.shape[:2]
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    pad = ((0, rows * patch_size - height), (0, cols * patch_size - width), (0, 0))
    return np.pad(image, pad, constant_values=value)


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[rows*p, cols*p, c] -> [rows*cols, p*p*c]: patches in row order, each flattened as
    (row, column, channel), which is HF's `patchify_image` order."""
    height, width, channels = image.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image {height}x{width} is not a whole number of {p}x{p} patches")
    rows, cols = height // p, width // p
    x = image.reshape(rows, p, cols, p, channels)  # [rows, p, cols, p, c]
    x = x.transpose(0, 2, 1, 3, 4)  # [rows, cols, p, p, c]
    return x.reshape(rows * cols, p * p * channels)


def unpatchify(patches: np.ndarray, rows: int, cols: int, patch_size: int) -> np.ndarray:
    """Inverse of `patchify`: [rows*cols, p*p*c] -> [rows*p, cols*p, c]."""
    p = patch_size
    channels = patches.shape[-1] // (p * p)
    x = patches.reshape(rows, cols, p, p, channels)  # [rows, cols, p, p, c]
    x = x.transpose(0, 2, 1, 3, 4)  # [rows, p, cols, p, c]
    return x.reshape(rows * p, cols * p, channels)


def image_patches(image: np.ndarray, spec: LayoutSpec) -> tuple[np.ndarray, int, int]:
    """uint8 [h, w, c] -> (normalised patches float32 [rows*cols, p*p*c], rows, cols)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != spec.channels or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image [height, width, {spec.channels}], "
            f"got {image.dtype} {image.shape}"
        )
    if min(image.shape[:2]) == 0:
        raise ValueError(f"empty image {image.shape}")
    if spec.canvas is not None:
        image = resize_to_canvas(image, spec.canvas)
    padded = pad_to_patches(image, spec.patch_size, spec.pad_value)
    rows, cols = padded.shape[0] // spec.patch_size, padded.shape[1] // spec.patch_size
    return normalise(patchify(padded, spec.patch_size)), rows, cols


# ----------------------------------------------------------------------------- one example


def layout(
    image: np.ndarray | None,
    prompt: Sequence[int],
    target: Sequence[int] | None = None,
    spec: LayoutSpec = LayoutSpec(),
) -> dict[str, np.ndarray]:
    """One example as an unpacked sequence of length L (the keys of a batch row, without
    `segment_ids`/`positions`, which packing adds).

    `target=None` lays out a prompt for generation: no target, no EOS, no loss.
    """
    ids = spec.tokens
    pieces: list[np.ndarray] = []
    patches = np.zeros((0, spec.patch_dim), np.float32)
    if image is not None:
        patches, rows, cols = image_patches(image, spec)
        grid = np.full((rows, cols + 1), ids.image, np.int32)
        grid[:, -1] = ids.newline
        pieces.append(grid.reshape(-1))
    head = ([] if ids.bos is None else [ids.bos]) + [*prompt]
    head += [] if ids.boa is None else [ids.boa]
    pieces.append(np.asarray(head, np.int32))
    num_target = 0
    if target is not None:
        pieces.append(np.asarray([*target, ids.eos], np.int32))
        num_target = len(target) + 1
    tokens = np.concatenate(pieces)
    length = len(tokens)

    image_mask = tokens == ids.image
    if image is None:
        image_mask[:] = False
    elif image_mask.sum() != len(patches):
        # Only when a prompt uses the image placeholder id itself.
        raise ValueError(f"prompt or target contains the image placeholder id {ids.image}")
    aligned = np.zeros((length, spec.patch_dim), np.float32)
    aligned[image_mask] = patches
    is_target = np.zeros(length, bool)
    is_target[length - num_target :] = True
    targets = np.full(length, ids.pad, np.int32)
    targets[:-1] = tokens[1:]
    loss_mask = np.zeros(length, np.float32)
    loss_mask[:-1] = is_target[1:]
    return dict(
        tokens=tokens,
        patches=aligned,
        image_mask=image_mask,
        targets=targets,
        loss_mask=loss_mask,
    )


# ----------------------------------------------------------------------------- packing


def _empty_rows(num_rows: int, seq_len: int, patch_dim: int, pad_id: int) -> dict:
    return dict(
        tokens=np.full((num_rows, seq_len), pad_id, np.int32),
        patches=np.zeros((num_rows, seq_len, patch_dim), np.float32),
        image_mask=np.zeros((num_rows, seq_len), bool),
        segment_ids=np.zeros((num_rows, seq_len), np.int32),
        positions=np.zeros((num_rows, seq_len), np.int32),
        targets=np.full((num_rows, seq_len), pad_id, np.int32),
        loss_mask=np.zeros((num_rows, seq_len), np.float32),
    )


class _Packer:
    """First-fit packing of sequences into `num_rows` rows of `seq_len` tokens."""

    def __init__(self, num_rows: int, seq_len: int, patch_dim: int, pad_id: int):
        self.batch = _empty_rows(num_rows, seq_len, patch_dim, pad_id)
        self.used = [0] * num_rows  # tokens taken in each row
        self.count = [0] * num_rows  # segments in each row
        self.seq_len = seq_len

    def add(self, seq: dict[str, np.ndarray]) -> bool:
        """Places `seq` in the first row with room; False if none has."""
        length = len(seq["tokens"])
        if length > self.seq_len:
            raise ValueError(
                f"a sequence of {length} tokens does not fit seq_len={self.seq_len}: raise "
                f"seq_len, shorten the text, or use smaller images (a {length}-token example "
                f"is mostly its patches plus one newline per row)"
            )
        for row, used in enumerate(self.used):
            if used + length <= self.seq_len:
                span = slice(used, used + length)
                for key in ("tokens", "patches", "image_mask", "targets", "loss_mask"):
                    self.batch[key][row, span] = seq[key]
                self.count[row] += 1
                self.batch["segment_ids"][row, span] = self.count[row]
                self.batch["positions"][row, span] = np.arange(length)
                self.used[row] = used + length
                return True
        return False

    @property
    def empty(self) -> bool:
        return not any(self.used)


def pack(
    sequences: Sequence[dict[str, np.ndarray]],
    seq_len: int,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Packs `layout` outputs into one batch of rows [R, seq_len] (first fit, in order).

    With `num_rows=None`, R is the fewest rows first fit needs; with `num_rows` set, the
    sequences must fit in that many rows (else ValueError).
    """
    if not sequences:
        raise ValueError("nothing to pack")
    patch_dim = sequences[0]["patches"].shape[-1]
    rows = num_rows if num_rows is not None else len(sequences)
    packer = _Packer(rows, seq_len, patch_dim, pad_id)
    for i, seq in enumerate(sequences):
        if not packer.add(seq):
            raise ValueError(
                f"sequence {i} ({len(seq['tokens'])} tokens) does not fit in {rows} rows of "
                f"{seq_len}; free per row: {[seq_len - u for u in packer.used]}"
            )
    if num_rows is None:
        used_rows = sum(1 for u in packer.used if u)
        return {k: v[:used_rows] for k, v in packer.batch.items()}
    return packer.batch


def packed_batches(
    examples: Iterable[dict],
    spec: LayoutSpec,
    *,
    seq_len: int,
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Streams {"image": uint8 [h, w, c] or None, "prompt": ids, "target": ids} examples
    into packed batches of `batch_size` rows x `seq_len` tokens (see the module docstring).

    First fit over the rows of the open batch, in order; an example that fits in no row
    closes the batch. The last, partly filled batch is yielded too (its unused rows are
    all padding, which has no loss).
    """
    packer = _Packer(batch_size, seq_len, spec.patch_dim, spec.tokens.pad)
    for example in examples:
        seq = layout(example.get("image"), example["prompt"], example.get("target"), spec)
        if not packer.add(seq):
            yield packer.batch
            packer = _Packer(batch_size, seq_len, spec.patch_dim, spec.tokens.pad)
            packer.add(seq)
    if not packer.empty:
        yield packer.batch


def efficiency(batch: dict[str, np.ndarray]) -> float:
    """Packing efficiency: real tokens / all tokens of the batch (log it per batch)."""
    return float((np.asarray(batch["segment_ids"]) > 0).mean())


def prompt_batch(
    examples: Sequence[dict], spec: LayoutSpec, length: int | None = None
) -> dict[str, np.ndarray]:
    """Left-padded prompts for `vlmjax.generate.generate`: {"image", "prompt"} examples ->
    tokens, patches, image_mask, segment_ids (1 real, 0 padding), positions [B, P].

    Left padding ends every prompt at the last column, so decoding steps run in lockstep;
    padding has segment 0 and is never attended to, and positions start at 0 at each
    prompt's first real token, so the result does not depend on the padding.
    """
    seqs = [layout(e.get("image"), e["prompt"], None, spec) for e in examples]
    longest = max(len(s["tokens"]) for s in seqs)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest prompt ({longest})")
    batch = _empty_rows(len(seqs), length, spec.patch_dim, spec.tokens.pad)
    del batch["targets"], batch["loss_mask"]
    for row, seq in enumerate(seqs):
        n = len(seq["tokens"])
        span = slice(length - n, length)
        for key in ("tokens", "patches", "image_mask"):
            batch[key][row, span] = seq[key]
        batch["segment_ids"][row, span] = 1
        batch["positions"][row, span] = np.arange(n)
    return batch
