"""Random-access data sources by name: the embedded `shapes` dataset or any prepared tfds one.

Sources are read through tfds' array_record data sources, which need no TensorFlow; a
dataset that is not prepared is an error that says how to prepare it (nothing is downloaded
at run time).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from vlmjax.data import shapes


def _tfds_builder(name: str, data_dir: str | None):
    builder = tfds.builder(name, data_dir=data_dir)
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        raise FileNotFoundError(
            f"tfds dataset '{name}' is not prepared under {builder.data_dir}. Prepare it once "
            f"(array_record format) with `tfds build {name} --file_format=array_record"
            f"{' --data_dir=' + data_dir if data_dir else ''}` on a machine that has its "
            f"source files, or point data.data_dir at a prepared copy."
        )
    return builder


def classification_source(cfg: ml_collections.ConfigDict, split: str) -> tuple[Any, int]:
    """(source, num_classes) for the `data` config and `split`.

    `source` supports len() and integer indexing, returning a dict of numpy values.
    """
    if cfg.name == "shapes":
        source = shapes.data_source(
            split,
            data_dir=cfg.data_dir,
            image_size=cfg.image_size,
            num_train=cfg.num_train,
            num_heldout=cfg.num_heldout,
        )
        return source, len(shapes.KINDS)
    builder = _tfds_builder(cfg.name, cfg.data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"tfds dataset '{cfg.name}' has no split '{split}' "
            f"(splits: {list(builder.info.splits)})"
        )
    label = builder.info.features[cfg.label_key]
    num_classes = getattr(label, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"'{cfg.name}' feature '{cfg.label_key}' is not a ClassLabel")
    return builder.as_data_source(split=split), num_classes


def num_classes(cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of the `data` config's labels (no data is read for `shapes`)."""
    if cfg.name == "shapes":
        return len(shapes.KINDS)
    return classification_source(cfg, cfg.train_split)[1]


def prepare(cfg: ml_collections.ConfigDict) -> None:
    """Prepares the embedded dataset if `cfg` names it (a no-op once prepared)."""
    if cfg.name == "shapes":
        shapes.prepare(
            data_dir=cfg.data_dir,
            image_size=cfg.image_size,
            num_train=cfg.num_train,
            num_heldout=cfg.num_heldout,
        )
