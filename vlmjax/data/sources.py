"""Random-access data sources named by `data.source`:

  * "shapes": the embedded dataset (`shapes.py`), built locally on first use;
  * "jsonl:/path/file.jsonl": image-text records from a JSON Lines file (`jsonl.py`);
  * "NAME" or "tfds:NAME": any tfds dataset prepared in array_record format;
  * WebDataset tar shards, "wds:/data/{00000..00127}.tar" or any pattern of .tar files
    (`webdataset.py`; caption from .txt or `data.json_caption_key` of .json);
  * parquet files, "parquet:PATTERN" or a pattern of .parquet files (`parquet.py`; columns
    `data.parquet_image_key`, `data.parquet_caption_key`);
  * a CSV/TSV table, "csv:PATH" or a .csv/.tsv path (`csv_source.py`; open_clip's
    `data.csv_img_key`, `data.csv_caption_key`, `data.csv_separator`);
  * several of the file sources joined by "::", mixed with `data.source_weights`
    (`mixture.py`).

A file source (jsonl, tar, parquet, CSV, mixture) is the train split; an evaluator names its
own file. Records that cannot be used raise `decode.BadRecord` naming FILE:LINE or
SHARD:KEY; training replaces and counts them (`skips.py`).

tfds sources are read through array_record data sources, which need no TensorFlow; a dataset
that is not prepared is an error that says how to prepare it (nothing is downloaded at run
time). Every source supports len() and integer indexing, returning a dict of numpy values.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from vlmjax.data import classnames, csv_source, jsonl, mixture, parquet, shapes, webdataset

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


def _file_source(cfg: ml_collections.ConfigDict, spec: str, required: tuple[str, ...]) -> Any:
    """The jsonl, tar, parquet or CSV source that `spec` names, or None for another kind."""
    caption_key = (cfg.get("caption_key") or "caption").split("/")[0]
    index_dir = cfg.get("index_dir", "")
    if (path := jsonl.parse(spec)) is not None:
        return jsonl.JsonlSource(path, required=required, index_dir=index_dir)
    if (pattern := webdataset.parse(spec)) is not None:
        return webdataset.TarSource(
            pattern, caption_key, cfg.get("json_caption_key", ""), index_dir=index_dir
        )
    if (pattern := parquet.parse(spec)) is not None:
        return parquet.ParquetSource(
            pattern,
            cfg.get("parquet_image_key", "jpg"),
            cfg.get("parquet_caption_key", "caption"),
            caption_key,
        )
    if (path := csv_source.parse(spec)) is not None:
        return csv_source.CsvSource(
            path,
            cfg.get("csv_img_key", "filepath"),
            cfg.get("csv_caption_key", "title"),
            cfg.get("csv_separator", "\t"),
            caption_key,
            index_dir=index_dir,
        )
    return None


def is_file_source(spec: str) -> bool:
    """Whether `spec` names file data (jsonl, tar, parquet, CSV or a "::" mixture of them),
    which is one split: the train split, or an evaluator's own file."""
    parts = mixture.split(spec)
    kinds = (jsonl.parse, webdataset.parse, parquet.parse, csv_source.parse)
    return len(parts) > 1 or any(parse(spec) is not None for parse in kinds)


def _files(cfg: ml_collections.ConfigDict, split: str, required: tuple[str, ...]) -> Any:
    """The file source of `split`: `data.source` for the train split (mixed when "::"
    joins several), or `split` itself when it names a file source."""
    if split != cfg.train_split and not is_file_source(split):
        raise ValueError(
            f"data.source={cfg.source!r} is file data, used as the train split; split "
            f"{split!r} must name its own file (an evaluator reads its own: "
            "evals.NAME.source='wds:/path/val/{0..3}.tar' or 'jsonl:/path/val.jsonl')"
        )
    spec = cfg.source if split == cfg.train_split else split
    parts = mixture.split(spec)
    opened = []
    for part in parts:
        found = _file_source(cfg, part, required)
        if found is None:
            raise ValueError(
                f"data.source: {part!r} (of {spec!r}) is not a jsonl, tar, parquet or CSV "
                "source; only those mix with '::'"
            )
        opened.append(found)
    if len(opened) == 1:
        return opened[0]
    return mixture.Mixture(opened, mixture.weights(cfg.get("source_weights", ""), len(opened)))


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
        return jsonl.JsonlSource(
            _jsonl_path(cfg, split), required=required, index_dir=cfg.get("index_dir", "")
        )
    if is_file_source(cfg.source):
        return _files(cfg, split, required)
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
    if is_file_source(cfg.source):
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
    if is_file_source(cfg.source):
        raise ValueError(
            "jsonl, tar, parquet and CSV sources carry captions, not a class list; use "
            "task='contrastive' or a "
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
