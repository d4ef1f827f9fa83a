"""Evaluators: `config.evals`, a dict of named evaluators, each with its own data and schedule
(as big_vision's `config.evals`). For example:

    c.evals.zeroshot = dict(type="zeroshot", split="heldout", templates="shapes")
    c.evals.imagenet = dict(type="zeroshot", source="imagenet2012", split="validation",
                            templates="openai_imagenet", every=5000)
    c.evals.coco = dict(type="retrieval", source="coco_captions", split="test",
                        caption_key="captions/text")

Results are logged as `eval/<name>/<metric>`. Types (each module's doc lists its metrics and
keys): `classification`, `zeroshot`, `retrieval`, `fewshot`, `captioning`, `vqa`.

Keys every evaluator takes; unset ones follow the run:

    type         one of TYPES (required)
    split        the split to evaluate (required; a jsonl, tar, parquet or CSV evaluator
                 reads its `source` files)
    every        steps between runs (default: the run's `eval_every`; 0: only at the end)
    batch_size   rows per global batch (default: `eval_batch_size`); rounded up to the batch
                 shards, the last batch padded and masked
    source, data_dir, image_size, image_key
                 the dataset (default: the run's `data.*`)
    crop_fraction  resize the short side to size / fraction, crop the centre
                 (default `data.eval_crop_fraction`)
    max_examples the first N examples of the split (0: all)

`build` checks every evaluator (type, keys, data, class names, splits) before training
starts, and each error names the evaluator and the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from vlmjax import config as config_lib
from vlmjax.data import jsonl, sources
from vlmjax.evaluators import classification, common, decoder, fewshot, retrieval, zeroshot

TYPES: dict[str, tuple[type, dict[str, Any]]] = {
    "classification": (classification.Classification, classification.KEYS),
    "zeroshot": (zeroshot.ZeroShot, zeroshot.KEYS),
    "retrieval": (retrieval.Retrieval, retrieval.KEYS),
    "fewshot": (fewshot.FewShot, fewshot.KEYS),
    "captioning": (decoder.Captioning, decoder.CAPTIONING_KEYS),
    "vqa": (decoder.VQA, decoder.VQA_KEYS),
}
COMMON_KEYS: dict[str, Any] = {
    "type": None,
    "split": None,
    "every": None,
    "batch_size": None,
    "source": None,
    "data_dir": None,
    "image_size": None,
    "image_key": None,
    "crop_fraction": None,
    "max_examples": 0,
}
# Evaluator keys that replace a key of the run's `data` config in the evaluator's copy.
DATA_KEYS = {"source": "source", "data_dir": "data_dir", "image_size": "image_size",
             "image_key": "image_key", "crop_fraction": "eval_crop_fraction",
             "label_key": "label_key", "caption_key": "caption_key"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """One named evaluator of a run and when it runs."""

    name: str
    every: int  # 0: only at the end of training
    evaluator: Any  # has run(state) -> {metric: float}

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or bool(self.every and step % self.every == 0)


def check_settings(name: str, raw: dict, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The evaluator's keys, checked against its type, defaults filled in."""
    where = f"evals.{name}"
    kind = raw.get("type")
    if kind not in TYPES:
        raise config_lib.ConfigError(f"{where}.type={kind!r} must be one of {sorted(TYPES)}")
    valid = {**COMMON_KEYS, **TYPES[kind][1]}
    for key in raw:
        if key not in valid:
            raise config_lib.ConfigError(
                f"unknown key '{where}.{key}' for a {kind} evaluator: "
                + config_lib.suggest(key, sorted(valid))
            )
    out = {**valid, **raw}
    own_files = bool(out["source"]) and sources.is_file_source(out["source"])  # tar, CSV, ...
    if not out["split"] and jsonl_source(out, config) is None and not own_files:
        raise config_lib.ConfigError(f"{where}.split is required (e.g. 'validation')")
    out["every"] = config.eval_every if out["every"] is None else out["every"]
    out["batch_size"] = out["batch_size"] or config.eval_batch_size
    if out["every"] is None or out["every"] < 0 or out["batch_size"] < 1:
        raise config_lib.ConfigError(
            f"{where}: every={out['every']} must be >= 0 and batch_size={out['batch_size']} >= 1"
        )
    return out


def jsonl_source(settings: dict, config: ml_collections.ConfigDict) -> str | None:
    """The evaluator's jsonl file, or None for another kind of source."""
    return jsonl.parse(settings["source"] or config.data.source)


def _data(settings: dict, config: ml_collections.ConfigDict) -> common.Data:
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    for key, data_key in DATA_KEYS.items():
        if settings.get(key) is not None:
            cfg[data_key] = settings[key]
    return common.Data(
        cfg=cfg, split=settings["split"] or "", max_examples=settings["max_examples"]
    )


def build(config: ml_collections.ConfigDict, task, mesh: jax.sharding.Mesh) -> list[Scheduled]:
    """The run's evaluators, each built and checked (its data opened) now."""
    out = []
    for name, raw in sorted(config.evals.to_dict().items()):
        if not isinstance(raw, dict):
            raise config_lib.ConfigError(f"evals.{name} must be a dict of evaluator keys")
        settings = check_settings(name, raw, config)
        cls = TYPES[settings["type"]][0]
        try:
            evaluator = cls(settings, _data(settings, config), task, mesh)
        except (ValueError, KeyError, FileNotFoundError) as e:
            message = e.args[0] if e.args else repr(e)
            raise config_lib.ConfigError(f"evals.{name} ({settings['type']}): {message}") from e
        out.append(Scheduled(name, settings["every"], evaluator))
    return out


def run(evaluators: list[Scheduled], state, step: int | None = None, total_steps: int = 0):
    """{"eval/<name>/<metric>": value} of the evaluators due at `step` (all when None)."""
    metrics = {}
    for scheduled in evaluators:
        if step is None or scheduled.due(step, total_steps):
            for key, value in scheduled.evaluator.run(state).items():
                metrics[f"eval/{scheduled.name}/{key}"] = float(value)
    return metrics
