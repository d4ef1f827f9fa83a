"""Contrastive image-text training (CLIP, SigLIP).

Batches are {'image': uint8 [B, S, S, 3], 'tokens': int32 [B, L]}. The loss is
`losses.contrastive_loss` over the global batch (`loss.kind` softmax | sigmoid,
`loss.impl` all_gather | chunked | tiled). The task offers the evaluators
(`vlmjax/evaluators/`) unit image and text embeddings and its tokenizer, for zero-shot
classification, retrieval and few-shot probes on any dataset.

Config keys (beyond `defaults.base_config`): `model_name = "clip"`, `model.*` = CLIP fields
with `model.vision.*` (ViT or ResNet fields, `model.image_model`) and `model.text.*`
(TextTransformer fields; the tokenizer's vocab size and special ids unless given),
`loss.kind`, `loss.impl`, `data.caption_key`, `data.tokenizer`, `data.templates` (see
`vlmjax/data/text.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlmjax import config as config_lib
from vlmjax import contrastive_accum, flops, losses
from vlmjax.data import pipeline, sources
from vlmjax.data import text as text_lib
from vlmjax.data import tokenizer as tokenizer_lib
from vlmjax.models import clip, convnets, text, vit
from vlmjax.tasks import Task
from vlmjax.tasks.classification import normaliser

log = logging.getLogger("vlmjax")

MODELS = {"clip": clip.CLIP}
IMAGE_TOWERS = {"vit": vit.ViT, "resnet": convnets.ResNet}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a contrastive run derives from its data, built once (`build`)."""

    tokenizer: tokenizer_lib.Tokenizer
    context_length: int


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None) -> Prepared:
    """The run's tokenizer (trained on the captions and kept in `workdir` for "word" and
    "sentencepiece:N") and text length."""
    return Prepared(
        text_lib.prepare_tokenizer(config.data, workdir=workdir), context_length(config)
    )


def _check_tokenizer(text_cfg: dict[str, Any], tok, spec: str) -> None:
    """The text tower must take the tokenizer's ids."""
    if text_cfg["vocab_size"] < tok.vocab_size:
        raise config_lib.ConfigError(
            f"model.text.vocab_size={text_cfg['vocab_size']} is smaller than the tokenizer's "
            f"{tok.vocab_size} (data.tokenizer={spec!r}); remove it (it then follows the "
            "tokenizer) or raise it"
        )
    if text_cfg["eos_id"] is not None and text_cfg["eos_id"] != tok.eos_id:
        raise config_lib.ConfigError(
            f"model.text.eos_id={text_cfg['eos_id']} but the tokenizer ends texts with id "
            f"{tok.eos_id}; the text tower would pool the wrong position"
        )


def context_length(config: ml_collections.ConfigDict) -> int:
    return config.model.get("text", {}).get("context_length", text.TextTransformer.context_length)


def _model_kwargs(config: ml_collections.ConfigDict, tok) -> dict[str, Any]:
    """CLIP kwargs from `config.model`, every nested key checked, text fields completed
    from the tokenizer `tok` (and checked against it)."""
    if config.model_name not in MODELS:
        raise config_lib.ConfigError(
            f"model_name={config.model_name!r} is not one of {sorted(MODELS)} for task "
            "'contrastive'"
        )
    kwargs = config_lib.module_kwargs(clip.CLIP, config.model.to_dict(), "model")
    vision = dict(kwargs.get("vision") or {})
    tower = IMAGE_TOWERS.get(kwargs.get("image_model", "vit"))
    if tower is None:
        raise config_lib.ConfigError(
            f"model.image_model={kwargs['image_model']!r} is not one of {sorted(IMAGE_TOWERS)}"
        )
    config_lib.module_kwargs(tower, vision, "model.vision")
    text_cfg = dict(kwargs.get("text") or {})
    config_lib.module_kwargs(text.TextTransformer, text_cfg, "model.text")
    text_cfg["vocab_size"] = text_cfg.get("vocab_size") or tok.vocab_size
    text_cfg.setdefault("eos_id", tok.eos_id)
    text_cfg.setdefault("pad_id", tok.pad_id)
    _check_tokenizer(text_cfg, tok, config.data.tokenizer)
    if config.loss.kind == "sigmoid" and kwargs.get("sigmoid_bias") is None:
        raise config_lib.ConfigError(
            "loss.kind='sigmoid' needs the learnable bias: set model.sigmoid_bias (SigLIP "
            "starts it at -10, with model.init_temperature=0.1)"
        )
    return {**kwargs, "vision": vision, "text": text_cfg}


def build_model(config: ml_collections.ConfigDict, prepared: Prepared) -> nn.Module:
    """The CLIP model of `config.model`, its text tower sized for the prepared tokenizer."""
    losses._check(config.loss.kind, config.loss.impl)
    return clip.CLIP(**_model_kwargs(config, prepared.tokenizer))


def init_inputs(config: ml_collections.ConfigDict) -> tuple[jax.ShapeDtypeStruct, ...]:
    size = config.data.image_size
    return (
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, context_length(config)), jnp.int32),
    )


def fake_batch(
    config: ml_collections.ConfigDict, prepared: Prepared, batch_size: int
) -> dict[str, np.ndarray]:
    """A random train batch of `batch_size` rows, shaped and typed like the real ones."""
    rng = np.random.default_rng(0)
    size, length = config.data.image_size, prepared.context_length
    tok = prepared.tokenizer
    words = rng.integers(0, tok.vocab_size, (batch_size, length - 2)).tolist()
    return {
        "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "tokens": tokenizer_lib.pack(words, length, tok.bos_id, tok.eos_id, tok.pad_id),
    }


# --- data ------------------------------------------------------------------------------------


def _source(data: ml_collections.ConfigDict, split: str):
    field = data.caption_key.split("/")[0] if data.caption_key else data.label_key
    return sources.source(data, split, required=(field,))


def _features(data: ml_collections.ConfigDict, resize: bool = True):
    """record -> {'image': uint8 [S, S, 3] (or as stored, for a random crop), 'texts': [str]}
    (+ 'label', 'novel' where the record has them)."""
    names = sources.class_names(data)
    size = data.image_size if resize else None

    def features(record):
        if data.image_key not in record:
            raise KeyError(
                f"dataset record has no '{data.image_key}' field (fields: {sorted(record)}); "
                "set data.image_key"
            )
        out = {
            "image": pipeline.as_image(
                record[data.image_key],
                size,
                data.eval_crop_fraction,
                data.get("interpolation", "bilinear"),
            ),
            "texts": text_lib.captions_of(record, data, names),
        }
        if names is not None and data.label_key in record:
            out["label"] = np.asarray(record[data.label_key], np.int32)
        if "novel" in record:
            out["novel"] = np.asarray(record["novel"], np.int32)
        return out

    return features


def train_dataset(
    config: ml_collections.ConfigDict,
    prepared: Prepared,
    process_index: int,
    process_count: int,
    start_example: int = 0,
) -> grain.IterDataset:
    tok, length = prepared.tokenizer, prepared.context_length

    def pick_caption(ex, rng):
        texts = ex["texts"]
        caption = texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
        return {"image": ex["image"], "tokens": tok.encode([caption], length)[0]}

    return pipeline.run_train_dataset(
        config,
        _source(config.data, config.data.train_split),
        lambda resize: _features(config.data, resize=resize),
        process_index,
        process_count,
        start_example,
        random_features=pick_caption,
    )


# --- loss and the task ---------------------------------------------------------------------


def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> Task:
    """The contrastive task of `config`, its tokenizer prepared once (and kept in `workdir`)."""
    prepared = prepare(config, workdir)
    model = build_model(config, prepared)
    normalise = normaliser(config.data)  # data.mean / data.std

    def embed_images(variables, images):
        return model.apply(variables, normalise(images), method=clip.CLIP.encode_image)

    def embed_texts(variables, tokens):
        return model.apply(variables, tokens, method=clip.CLIP.encode_text)

    def tokenize(texts):
        return prepared.tokenizer.encode(list(texts), prepared.context_length)

    try:
        flops_per_example = flops.per_example(config, model)
    except ValueError:  # a tower without a formula: no FLOP metrics
        flops_per_example = None
    # One embedding and loss pair serves the plain step and grad_accum_steps=k, which keeps
    # the loss over all B pairs (GradCache): the towers run on k micro-batches, the loss
    # sees every negative (vlmjax/contrastive_accum.py).
    embed_fn, batch_loss = contrastive_accum.two_tower_fns(
        model,
        kind=config.loss.kind,
        impl=config.loss.impl,
        tile=config.loss.tile,
        inputs=lambda batch: (normalise(batch["image"]), batch["tokens"]),
    )

    def loss_fn(params, model_state, batch, rng):
        """The contrastive loss of one global batch; (loss, (metrics, model_state)). A
        ResNet tower's BatchNorm statistics update in training."""
        rows, shared, new_state = embed_fn(params, model_state, batch, rng)
        loss, metrics = batch_loss(rows, shared)
        return loss, (metrics, new_state)

    def grad_fn(params, model_state, batch, rng, k):
        return contrastive_accum.accumulated_value_and_grad(
            embed_fn, batch_loss, params, model_state, batch, rng, k
        )

    return Task(
        name="contrastive",
        prepared=prepared,
        model=model,
        init_inputs=init_inputs(config),
        loss_fn=loss_fn,
        train_dataset=functools.partial(train_dataset, config, prepared),
        fake_batch=functools.partial(fake_batch, config, prepared),
        flops_per_example=flops_per_example,
        grad_fn=grad_fn,
        embed_images=embed_images,
        embed_texts=embed_texts,
        tokenize=tokenize,
    )
