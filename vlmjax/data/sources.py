"""Random-access data sources named by `data.source`:

  * "shapes": the embedded dataset (`shapes.py`), built locally on first use;
  * "jsonl:/path/file.jsonl": image-text records from a JSON Lines file (`jsonl.py`);
  * "NAME" or "tfds:NAME": any tfds dataset prepared in array_record format.

tfds sources are read through array_record data sources, which need no TensorFlow; a dataset
that is not prepared is an error that says how to prepare it (nothing is downloaded at run
time). Every source supports len() and integer indexing, returning a dict of numpy values.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from vlmjax.data import classnames, jsonl, shapes

TFDS_PREFIX = "tfds:"


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


def _tfds_name(source: str) -> str:
    return source[len(TFDS_PREFIX) :] if source.startswith(TFDS_PREFIX) else source


def _jsonl_path(cfg: ml_collections.ConfigDict, split: str) -> str:
    """A jsonl source's file for `split`: the train split is `data.source` itself; any other
    split must name its own file as "jsonl:PATH"."""
    if jsonl.parse(split) is not None:
        return jsonl.parse(split)
    if split == cfg.train_split:
        return jsonl.parse(cfg.source)
    raise ValueError(
        f"data.source={cfg.source!r} is one file, used as the train split; split {split!r} "
        "must name its own file as 'jsonl:/path/val.jsonl' (an evaluator reads its own file: "
        "evals.NAME.source='jsonl:/path/val.jsonl')"
    )


def source(cfg: ml_collections.ConfigDict, split: str, required: tuple[str, ...] = ()) -> Any:
    """The random-access source of `split` for the `data` config. `required` names record
    fields that a jsonl file must have on every line (checked when it is opened)."""
    if cfg.source == "shapes":
        return shapes.data_source(
            split,
            data_dir=cfg.data_dir,
            image_size=cfg.image_size,
            num_train=cfg.num_train,
            num_heldout=cfg.num_heldout,
        )
    if jsonl.parse(cfg.source) is not None:
        return jsonl.JsonlSource(_jsonl_path(cfg, split), required=required)
    name = _tfds_name(cfg.source)
    builder = _tfds_builder(name, cfg.data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"tfds dataset '{name}' has no split '{split}' (splits: {list(builder.info.splits)})"
        )
    return builder.as_data_source(split=split)


def class_names(cfg: ml_collections.ConfigDict) -> list[str] | None:
    """Names of the label classes as prompt words (see `classnames.from_labels`), or None
    if the source has none."""
    if cfg.source == "shapes":
        return list(shapes.KINDS)
    if jsonl.parse(cfg.source) is not None:
        return None
    builder = _tfds_builder(_tfds_name(cfg.source), cfg.data_dir)
    features = builder.info.features
    feature = features[cfg.label_key] if cfg.label_key in features.keys() else None
    names = getattr(feature, "names", None)
    # As prompt words: WordNet ids (tfds imagenet2012) become the curated ImageNet names.
    return classnames.from_labels(names) if names else None


def classification_source(cfg: ml_collections.ConfigDict, split: str) -> tuple[Any, int]:
    """(source, num_classes) for the `data` config and `split`."""
    if cfg.source == "shapes":
        return source(cfg, split), len(shapes.KINDS)
    if jsonl.parse(cfg.source) is not None:
        raise ValueError(
            "jsonl sources carry captions, not a class list; use task='contrastive' or a "
            "tfds dataset with a ClassLabel feature for classification"
        )
    name = _tfds_name(cfg.source)
    builder = _tfds_builder(name, cfg.data_dir)
    label = builder.info.features[cfg.label_key]
    num_classes = getattr(label, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"'{name}' feature '{cfg.label_key}' is not a ClassLabel")
    return source(cfg, split), num_classes


def num_classes(cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of the `data` config's labels (no data is read for `shapes`)."""
    if cfg.source == "shapes":
        return len(shapes.KINDS)
    return classification_source(cfg, cfg.train_split)[1]


def prepare(cfg: ml_collections.ConfigDict) -> None:
    """Prepares the embedded dataset if `cfg` names it (a no-op once prepared)."""
    if cfg.source == "shapes":
        shapes.prepare(
            data_dir=cfg.data_dir,
            image_size=cfg.image_size,
            num_train=cfg.num_train,
            num_heldout=cfg.num_heldout,
        )
