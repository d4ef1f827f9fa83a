"""Input pipelines: a random-access source -> per-process shard -> shuffled, augmented batches.

Built on grain's `MapDataset`, so every transformation is a pure function of the example
index and the seed: the iterator's position (its `get_state()`) is all that needs saving to
resume on exactly the next batch, and the order does not depend on the number of threads.
Host batches become global `jax.Array`s with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from vlmjax.data import image_ops, skips, workers

Example = dict[str, np.ndarray]


# --- per-example transforms (numpy, host side) ---------------------------------------------


def as_image(
    image: np.ndarray,
    image_size: int | None,
    crop_fraction: float,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """uint8 [h, w, c] (or [h, w]) -> uint8 [S, S, 3] (resized only when needed, with
    `interpolation`: data.interpolation), or [h, w, 3] when image_size is None (a
    random-resized-crop comes later)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    # A crop fraction below 1 resizes up and crops even an image already S x S, as the
    # HF image processors do (resize to the short side, then crop).
    if image_size and (image.shape[:2] != (image_size, image_size) or crop_fraction < 1):
        image = image_ops.resize_center_crop(image, image_size, crop_fraction, interpolation)
    return image.astype(np.uint8)


AUGMENTATIONS = ("random_resized_crop", "flip", "shift", "channel_shuffle")


def parse_augment(spec: str) -> tuple[str, ...]:
    """ "flip,channel_shuffle" -> ("flip", "channel_shuffle"); "" or "none" -> ()."""
    ops = tuple(op.strip() for op in spec.split(",") if op.strip() and op.strip() != "none")
    for op in ops:
        if op not in AUGMENTATIONS:
            raise ValueError(
                f"data.augment: {op!r} is not one of {AUGMENTATIONS} (combine with commas)"
            )
    return ops


def _augment(
    image: np.ndarray, rng: np.random.Generator, ops: tuple[str, ...], pad: int, size: int = 0
):
    """Label-preserving augmentation of uint8 images, applied in the order given.

    random_resized_crop: any [h, w, 3] -> [size, size, 3] (Inception crop; it must come
    first, on the decoded image). flip: horizontal, p=0.5. shift: pad by `pad` with edge
    pixels and crop back at a random offset (the CIFAR recipe; edge padding keeps the
    background statistics). channel_shuffle: a random permutation of RGB, which makes a
    classifier colour-invariant (on `shapes` the six colours map onto each other, so
    held-out (kind, colour) pairs stop being novel to a kind classifier; never use it where
    labels or captions name colours).
    """
    for op in ops:
        if op == "random_resized_crop":
            image = image_ops.random_resized_crop(image, rng, size)
        elif op == "flip" and rng.random() < 0.5:
            image = image[:, ::-1]
        elif op == "shift" and pad:
            size = image.shape[0]
            padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
            dy, dx = rng.integers(0, 2 * pad + 1, size=2)
            image = padded[dy : dy + size, dx : dx + size]
        elif op == "channel_shuffle":
            image = image[..., rng.permutation(3)]
    return np.ascontiguousarray(image)


def classification_features(
    cfg: ml_collections.ConfigDict, resize: bool = True
) -> Callable[[Mapping], Example]:
    """Maps a raw record to {'image': uint8 [S, S, 3], 'label': int32 []} (+ 'novel' if any).

    With `resize=False` images keep their size (for a random-resized-crop augmentation).
    """
    image_key, label_key = cfg.image_key, cfg.label_key
    size = cfg.image_size if resize else None
    crop_fraction = cfg.get("eval_crop_fraction", 1.0)
    interpolation = cfg.get("interpolation", "bilinear")

    def features(record: Mapping[str, Any]) -> Example:
        for key in (image_key, label_key):
            if key not in record:
                raise KeyError(
                    f"dataset record has no '{key}' field (fields: {sorted(record)}); "
                    f"set data.image_key / data.label_key"
                )
        out = {
            "image": as_image(record[image_key], size, crop_fraction, interpolation),
            "label": np.asarray(record[label_key], np.int32),
        }
        if "novel" in record:
            out["novel"] = np.asarray(record["novel"], np.int32)
        return out

    return features


# --- datasets --------------------------------------------------------------------------------


def train_dataset(
    source: Any,
    features: Callable[[Mapping], Example],
    *,
    batch_size: int,
    seed: int,
    augment: str = "",
    augment_pad: int = 4,
    image_size: int = 0,
    num_threads: int = 2,
    prefetch: int = 4,  # batches read ahead
    num_workers: int = 0,  # processes decoding and augmenting (vlmjax/data/workers.py)
    process_index: int = 0,
    process_count: int = 1,
    start_example: int = 0,
    random_features: Callable[[Example, np.random.Generator], Example] | None = None,
) -> grain.IterDataset:
    """Infinite, shuffled (reshuffled each epoch), augmented batches: this process's rows.

    `random_features(example, rng)`, if given, runs before the image augmentation with the
    same per-example generator (e.g. to pick one of several captions and tokenise it).

    `batch_size` is per process. All processes see one global stream (shuffle and
    augmentation are keyed by the position in it), cut into chunks of `batch_size`; global
    batch k is chunks k*n .. k*n+n-1 and process i reads only chunk k*n+i. So the global
    batches, and a run's result, do not depend on how many processes share the work, and
    processes never read the same record within an epoch.

    `start_example` skips that many examples of the global stream (random access, no
    reading): a run resumes from the number of examples it consumed, which stays valid when
    the process count or the batch size changes between save and restore.
    """
    ops = parse_augment(augment)
    if "random_resized_crop" in ops[1:]:
        raise ValueError("data.augment: random_resized_crop must come first")
    # Bad records (decode.BadRecord) are replaced as a pure function of the position and
    # counted in each example's skip fields (vlmjax/data/skips.py).
    ds = grain.MapDataset.source(skips.Replacing(source, features))
    if len(ds) < batch_size * process_count:
        raise ValueError(
            f"the dataset has {len(ds)} examples, fewer than one global batch of "
            f"{batch_size * process_count}"
        )
    ds = ds.shuffle(seed=seed).repeat()

    def randomise(ex: Example, rng: np.random.Generator) -> Example:
        if random_features is not None:
            ex = {**random_features(ex, rng), **skips.carry(ex)}
        return {**ex, "image": _augment(ex["image"], rng, ops, augment_pad, image_size)}

    ds = ds.random_map(randomise, seed=seed + 1)
    ds = ds[start_example:].batch(batch_size, drop_remainder=True)[process_index::process_count]
    # The elements here are batches: `prefetch` batches ahead, not examples.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    # Workers change where batches are made, never which: the same stream for any count.
    return workers.with_workers(ds.to_iter_dataset(read), num_workers)


def run_train_dataset(
    config: ml_collections.ConfigDict,
    source: Any,
    features: Callable[[bool], Callable[[Mapping], Example]],
    process_index: int,
    process_count: int,
    start_example: int = 0,
    random_features: Callable[[Example, np.random.Generator], Example] | None = None,
) -> grain.IterDataset:
    """`train_dataset` with a run's settings (`batch_size` split over the processes, `seed`,
    `data.{image_size, augment, num_threads, prefetch, num_workers}`), as every task reads
    its training data. `features(resize)` builds the record -> example function; `resize` is
    False when `random_resized_crop` does the resizing itself."""
    data = config.data
    crop = "random_resized_crop" in parse_augment(data.augment)
    return train_dataset(
        source,
        features(not crop),
        image_size=data.image_size,
        batch_size=config.batch_size // process_count,
        seed=config.seed,
        augment=data.augment,
        num_threads=data.num_threads,
        prefetch=data.prefetch,
        num_workers=workers.resolve(data.num_workers, data.source),
        process_index=process_index,
        process_count=process_count,
        start_example=start_example,
        random_features=random_features,
    )


def eval_batches(
    source: Any,
    features: Callable[[Mapping], Example],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int | None = None,
) -> Iterator[Example]:
    """One pass over the split in order, in batches of `batch_size` (per process).

    Every process yields the same number of batches; padding rows repeat a real example and
    carry `mask == 0`, so metrics are sums over `mask` and nothing is counted twice.
    """
    total = len(source) if max_examples is None else min(len(source), max_examples)
    per_process = -(-total // process_count)
    num_batches = -(-per_process // batch_size)
    indices = np.arange(process_index, total, process_count)
    ds = grain.MapDataset.source(source).map(features)
    for b in range(num_batches):
        rows = indices[b * batch_size : (b + 1) * batch_size]
        valid = len(rows)
        if valid < batch_size:
            rows = np.concatenate(
                [rows, np.full(batch_size - valid, indices[0] if len(indices) else 0)]
            )
        examples = [ds[int(i)] for i in rows]
        batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
        batch["mask"] = (np.arange(batch_size) < valid).astype(np.int32)
        yield batch


def to_global(batch: Example, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host-local batch (leading dim = this process's rows) -> global sharded jax.Arrays."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
