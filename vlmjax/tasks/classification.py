"""Image classification: a ViT (or any image model) trained with softmax cross-entropy.

Batches are {'image': uint8 [B, S, S, 3], 'label': int32 [B]} (+ 'novel' int32 [B] on the
shapes dataset, marking held-out attribute combinations; + 'mask' int32 [B] in eval).
Images travel to the device as uint8 (4x less host-to-device traffic) and are normalised
there.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlmjax import config as config_lib
from vlmjax.data import pipeline, sources
from vlmjax.models import convnets, vit

MODELS = {"vit": vit.ViT, "resnet": convnets.ResNet, "alexnet": convnets.AlexNet}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The model named by `config.model_name`, with `config.model` as its fields."""
    if config.model_name not in MODELS:
        raise config_lib.ConfigError(
            f"model_name={config.model_name!r} is not one of {sorted(MODELS)}"
        )
    cls = MODELS[config.model_name]
    kwargs = config_lib.module_kwargs(cls, config.model.to_dict(), "model")
    # An explicit model.num_classes needs no prepared data to build the model (configs of
    # datasets this machine lacks still build); train_dataset checks it against the data.
    if not kwargs.get("num_classes"):
        kwargs["num_classes"] = sources.num_classes(config.data)
    return cls(**kwargs)


def _checked_source(config: ml_collections.ConfigDict, split: str):
    source, num_classes = sources.classification_source(config.data, split)
    expected = config.model.get("num_classes")
    if expected and expected != num_classes:
        raise config_lib.ConfigError(
            f"model.num_classes={expected} but dataset '{config.data.source}' has {num_classes} "
            f"classes; set --config.model.num_classes={num_classes}"
        )
    return source


def init_inputs(config: ml_collections.ConfigDict) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract positional inputs of `model.init` for one example."""
    size = config.data.image_size
    return (jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),)


def fake_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    """A random train batch of `batch_size` rows, shaped and typed like the real ones (for
    benchmarks); the class count comes from model.num_classes, else 2."""
    rng = np.random.default_rng(0)
    size = config.data.image_size
    classes = config.model.get("num_classes") or 2
    return {
        "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, classes, (batch_size,)).astype(np.int32),
    }


def train_dataset(
    config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    start_example: int = 0,
) -> grain.IterDataset:
    return pipeline.run_train_dataset(
        config,
        _checked_source(config, config.data.train_split),
        lambda resize: pipeline.classification_features(config.data, resize=resize),
        process_index,
        process_count,
        start_example,
    )


def eval_splits(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    split = config.data.eval_split
    return (split,) if split else ()


def eval_dataset(
    config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
):
    source = _checked_source(config, split)
    return pipeline.eval_batches(
        source,
        pipeline.classification_features(config.data),
        batch_size=config.eval_batch_size // process_count,
        process_index=process_index,
        process_count=process_count,
        max_examples=config.data.eval_max_examples or None,
    )


def normalise(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def _cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy in float32; logits [b, k], labels int [b] -> [b]."""
    num_classes = logits.shape[-1]
    targets = (
        optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
        if smoothing
        else (jax.nn.one_hot(labels, num_classes))
    )
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def loss_fn(
    model: nn.Module,
    params: Any,
    model_state: dict,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict]]:
    """Mean cross-entropy over the batch; returns (loss, (metrics, new model_state))."""
    variables = {"params": params, **model_state}
    # Non-parameter collections (BatchNorm statistics) are updated in training.
    logits, new_state = model.apply(
        variables,
        normalise(batch["image"]),
        train=True,
        rngs={"dropout": rng},
        mutable=list(model_state),
    )
    loss = _cross_entropy(logits, batch["label"], label_smoothing).mean()
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return loss, ({"loss": loss, "accuracy": accuracy}, dict(new_state))


def make_loss_fn(config: ml_collections.ConfigDict, model: nn.Module):
    """loss(params, model_state, batch, rng) -> (loss, (metrics, new model_state))."""
    smoothing = config.loss.label_smoothing
    return lambda params, model_state, batch, rng: loss_fn(
        model, params, model_state, batch, rng, label_smoothing=smoothing
    )


def make_eval_fn(config: ml_collections.ConfigDict, model: nn.Module):
    """eval(params, model_state, batch) -> dict of masked sums."""
    del config
    return lambda params, model_state, batch: eval_sums(model, params, model_state, batch)


def eval_sums(
    model: nn.Module, params: Any, model_state: dict, batch: dict[str, jax.Array]
) -> dict[str, jax.Array]:
    """Masked sums over one eval batch; `eval_finalize` turns the totals into metrics."""
    logits = model.apply({"params": params, **model_state}, normalise(batch["image"]), train=False)
    mask = batch["mask"].astype(jnp.float32)
    correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
    sums = {
        "count": mask.sum(),
        "correct": (correct * mask).sum(),
        "loss": (_cross_entropy(logits, batch["label"], 0.0) * mask).sum(),
    }
    if "novel" in batch:
        novel = mask * batch["novel"].astype(jnp.float32)
        sums["novel_count"] = novel.sum()
        sums["novel_correct"] = (correct * novel).sum()
    return sums


def eval_finalize(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums["count"], 1.0)
    metrics = {"accuracy": sums["correct"] / count, "loss": sums["loss"] / count}
    if sums.get("novel_count"):
        metrics["accuracy_novel"] = sums["novel_correct"] / sums["novel_count"]
        seen = sums["count"] - sums["novel_count"]
        if seen:
            metrics["accuracy_seen"] = (sums["correct"] - sums["novel_correct"]) / seen
    return metrics
