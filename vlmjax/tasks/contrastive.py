"""Contrastive image-text training (CLIP, SigLIP) with zero-shot and retrieval evaluation.

Batches are {'image': uint8 [B, S, S, 3], 'tokens': int32 [B, L]}; in eval also 'mask' and,
where the source has class labels, 'label' (+ 'novel' on `shapes`). The loss is
`losses.contrastive_loss` over the global batch (`loss.kind` softmax | sigmoid,
`loss.impl` all_gather | chunked). Evaluation embeds a whole split, gathers the embeddings
to every process and scores them with `vlmjax/evaluate.py`:

  eval/zeroshot_accuracy (+ _top5 with > 5 classes, + _novel / _seen on `shapes`): images
      classified by similarity to each class's prompt ensemble (`data.templates`);
  eval/i2t_recall@K, eval/t2i_recall@K for K in 1, 5, 10: retrieval among the split's
      pairs, identical captions counting as the same one.

Config keys (beyond `defaults.base_config`): `model_name = "clip"`, `model.*` = CLIP fields
with `model.vision.*` (ViT fields) and `model.text.*` (TextTransformer fields; the
tokenizer's vocab size and special ids unless given), `loss.kind`, `loss.impl`,
`data.caption_key`, `data.tokenizer`, `data.templates` (see `vlmjax/data/text.py`).
"""

from __future__ import annotations

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
from vlmjax import evaluate, losses
from vlmjax.data import pipeline, sources
from vlmjax.data import text as text_lib
from vlmjax.data import tokenizer as tokenizer_lib
from vlmjax.models import clip, convnets, text, vit
from vlmjax.tasks.classification import normalise

log = logging.getLogger("vlmjax")

MODELS = {"clip": clip.CLIP}
IMAGE_TOWERS = {"vit": vit.ViT, "resnet": convnets.ResNet}
RECALL_AT = (1, 5, 10)


def tokenizer(config: ml_collections.ConfigDict):
    return text_lib.get_tokenizer(config.data)


def _checked_tokenizer(config: ml_collections.ConfigDict):
    """The tokenizer, after checking that the text tower can take its ids."""
    tok = tokenizer(config)
    t = _model_kwargs(config)["text"]
    if t["vocab_size"] < tok.vocab_size:
        raise config_lib.ConfigError(
            f"model.text.vocab_size={t['vocab_size']} is smaller than the tokenizer's "
            f"{tok.vocab_size} (data.tokenizer={config.data.tokenizer!r}); remove it (it then "
            "follows the tokenizer) or raise it"
        )
    if t["eos_id"] is not None and t["eos_id"] != tok.eos_id:
        raise config_lib.ConfigError(
            f"model.text.eos_id={t['eos_id']} but the tokenizer ends texts with id "
            f"{tok.eos_id}; the text tower would pool the wrong position"
        )
    return tok


def context_length(config: ml_collections.ConfigDict) -> int:
    return config.model.get("text", {}).get("context_length", text.TextTransformer.context_length)


def _model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """CLIP kwargs from `config.model`, every nested key checked, text fields completed
    from the tokenizer."""
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
    if not (text_cfg.get("vocab_size") and "eos_id" in text_cfg and "pad_id" in text_cfg):
        # Completed from the tokenizer (which may need the data); a config that gives all
        # three builds without it, and the data pipeline checks them against it.
        tok = tokenizer(config)
        text_cfg["vocab_size"] = text_cfg.get("vocab_size") or tok.vocab_size
        text_cfg.setdefault("eos_id", tok.eos_id)
        text_cfg.setdefault("pad_id", tok.pad_id)
    if config.loss.kind == "sigmoid" and kwargs.get("sigmoid_bias") is None:
        raise config_lib.ConfigError(
            "loss.kind='sigmoid' needs the learnable bias: set model.sigmoid_bias (SigLIP "
            "starts it at -10, with model.init_temperature=0.1)"
        )
    return {**kwargs, "vision": vision, "text": text_cfg}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The CLIP model of `config.model`."""
    losses._check(config.loss.kind, config.loss.impl)
    return clip.CLIP(**_model_kwargs(config))


def init_inputs(config: ml_collections.ConfigDict) -> tuple[jax.ShapeDtypeStruct, ...]:
    size = config.data.image_size
    return (
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, context_length(config)), jnp.int32),
    )


def fake_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    """A random train batch of `batch_size` rows, shaped and typed like the real ones."""
    rng = np.random.default_rng(0)
    size, length = config.data.image_size, context_length(config)
    tok = tokenizer(config)
    words = rng.integers(0, tok.vocab_size, (batch_size, length - 2)).tolist()
    return {
        "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "tokens": tokenizer_lib.pack(words, length, tok.bos_id, tok.eos_id, tok.pad_id),
    }


# --- data ------------------------------------------------------------------------------------


def eval_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `data` config of the eval split: `data.eval_source` (e.g. ImageNet for zero-shot
    while training on image-text pairs) with `data.eval_caption_key`, else `data` itself."""
    data = config.data
    if not data.eval_source:
        return data
    out = ml_collections.ConfigDict(data.to_dict())
    out.source, out.caption_key = data.eval_source, data.eval_caption_key
    return out


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
            "image": pipeline.as_image(record[data.image_key], size, data.eval_crop_fraction),
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
    process_index: int,
    process_count: int,
    start_example: int = 0,
) -> grain.IterDataset:
    tok, length = _checked_tokenizer(config), context_length(config)

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


def eval_splits(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    split = config.data.eval_split
    return (split,) if split else ()


def eval_dataset(
    config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
):
    """Batches of the split in order, each pair with its first caption (or prompt)."""
    tok, length = _checked_tokenizer(config), context_length(config)
    data = eval_data(config)
    features = _features(data)

    def eval_features(record):
        ex = features(record)
        texts = ex.pop("texts")
        return {**ex, "tokens": tok.encode(texts[:1], length)[0]}

    return pipeline.eval_batches(
        _source(data, split),
        eval_features,
        batch_size=config.eval_batch_size // process_count,
        process_index=process_index,
        process_count=process_count,
        max_examples=config.data.eval_max_examples or None,
    )


# --- loss and evaluation ---------------------------------------------------------------------


def loss_fn(
    model: nn.Module,
    params: Any,
    model_state: dict,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    kind: str,
    impl: str,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict]]:
    """The contrastive loss of one global batch; returns (loss, (metrics, model_state))."""
    # Non-parameter collections (a ResNet tower's BatchNorm statistics) update in training.
    out, new_state = model.apply(
        {"params": params, **model_state},
        normalise(batch["image"]),
        batch["tokens"],
        train=True,
        rngs={"dropout": rng},
        mutable=list(model_state),
    )
    loss, metrics = losses.contrastive_loss(
        out["zimg"],
        out["ztxt"],
        out["log_scale"],
        out["bias"],
        kind=kind,
        impl=impl,
        mesh=jax.sharding.get_abstract_mesh(),
    )
    metrics = dict(metrics)
    metrics["temperature"] = jnp.exp(-out["log_scale"])
    if out["bias"] is not None:
        metrics["bias"] = out["bias"]
    return loss, (metrics, dict(new_state))


def make_loss_fn(config: ml_collections.ConfigDict, model: nn.Module):
    """loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))."""
    return functools.partial(loss_fn, model, kind=config.loss.kind, impl=config.loss.impl)


def make_eval_fn(config: ml_collections.ConfigDict, model: nn.Module):
    """eval(params, model_state, batch) -> the batch's embeddings and fields (replicated by
    the caller's out_shardings, so every process sees the whole global batch)."""
    del config

    def eval_fn(params, model_state, batch):
        out = model.apply(
            {"params": params, **model_state}, normalise(batch["image"]), batch["tokens"]
        )
        keep = {k: batch[k] for k in ("tokens", "mask", "label", "novel") if k in batch}
        return {"zimg": out["zimg"], "ztxt": out["ztxt"], **keep}

    return eval_fn


_ENCODERS: dict[tuple[int, Any], tuple[nn.Module, Any]] = {}


def _text_encoder(model: nn.Module, mesh: jax.sharding.Mesh):
    """Jitted tokens [n, L] -> unit embeddings [n, E], replicated to every device; built
    once per model and mesh (the model is kept with it, so its id stays unique)."""
    key = (id(model), mesh)
    if key not in _ENCODERS:

        def encode(params, tokens):
            return model.apply({"params": params}, tokens, method=clip.CLIP.encode_text)

        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        _ENCODERS[key] = (model, jax.jit(encode, out_shardings=rep))
    return _ENCODERS[key][1]


def encode_texts(
    model: nn.Module, params: Any, tokens: np.ndarray, batch_sharding, batch_size: int
) -> np.ndarray:
    """Unit text embeddings [N, E] float32 (host) of tokens int32 [N, L] (the same on every
    process), in sharded chunks of `batch_size` rows."""
    out = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        array = jax.make_array_from_callback(
            padded.shape, batch_sharding, lambda i, rows=padded: rows[i]
        )
        z = _text_encoder(model, batch_sharding.mesh)(params, array)
        out.append(np.asarray(jax.device_get(z))[: len(chunk)])
    return np.concatenate(out)


def evaluate_split(
    config: ml_collections.ConfigDict, split: str, model, eval_step, state, batch_sharding
) -> dict[str, float]:
    """Zero-shot accuracy and retrieval recall over `split` (see the module doc)."""
    parts: dict[str, list[np.ndarray]] = {}
    for host_batch in eval_dataset(config, split, jax.process_index(), jax.process_count()):
        outputs = jax.device_get(
            eval_step(
                state.params, state.model_state, pipeline.to_global(host_batch, batch_sharding)
            )
        )
        for k, v in outputs.items():
            parts.setdefault(k, []).append(np.asarray(v))
    got = {k: np.concatenate(v) for k, v in parts.items()}
    keep = got.pop("mask").astype(bool)
    got = {k: v[keep] for k, v in got.items()}

    data = eval_data(config)
    metrics = {}
    if data.caption_key:  # (prompts made from labels are no captions to retrieve)
        metrics = evaluate.retrieval_recall(
            got["zimg"], got["ztxt"], evaluate.caption_groups(got["tokens"]), RECALL_AT
        )
    names = sources.class_names(data)
    if "label" in got and names:
        templates = text_lib.templates(data.templates)
        prompts = [t.format(name) for name in names for t in templates]
        tokens = tokenizer(config).encode(prompts, context_length(config))
        z = encode_texts(model, state.params, tokens, batch_sharding, config.eval_batch_size)
        classifier = evaluate.zeroshot_classifier(z.reshape(len(names), len(templates), -1))
        correct = evaluate.topk_accuracy(got["zimg"], classifier, got["label"])
        metrics["zeroshot_accuracy"] = float(correct.mean())
        if len(names) > 5:
            top5 = evaluate.topk_accuracy(got["zimg"], classifier, got["label"], k=5)
            metrics["zeroshot_accuracy_top5"] = float(top5.mean())
        if "novel" in got and got["novel"].any():
            novel = got["novel"].astype(bool)
            metrics["zeroshot_accuracy_novel"] = float(correct[novel].mean())
            if (~novel).any():
                metrics["zeroshot_accuracy_seen"] = float(correct[~novel].mean())
    metrics["count"] = float(keep.sum())
    return metrics
