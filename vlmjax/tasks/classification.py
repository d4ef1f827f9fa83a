"""Image classification: a ViT (or any image model) trained with softmax cross-entropy.

Batches are {'image': uint8 [B, S, S, 3], 'label': int32 [B]} (+ 'novel' int32 [B] on the
shapes dataset, marking held-out attribute combinations; + 'mask' int32 [B] in eval).
Images travel to the device as uint8 (4x less host-to-device traffic) and are normalised
there.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlmjax import config as config_lib
from vlmjax import flops, losses
from vlmjax.data import pipeline, sources
from vlmjax.models import convnets, vit
from vlmjax.tasks import Task

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


DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)


def normalise(
    images: jax.Array,
    mean: tuple[float, ...] = DEFAULT_MEAN,
    std: tuple[float, ...] = DEFAULT_STD,
) -> jax.Array:
    """uint8 [..., 3] in [0, 255] -> float32 (x / 255 - mean) / std per channel (`data.mean`,
    `data.std`, in [0, 1] pixel units as HF's image_mean / image_std); the defaults give
    [-1, 1]."""
    x = images.astype(jnp.float32)
    if tuple(mean) == DEFAULT_MEAN and tuple(std) == DEFAULT_STD:
        return x / 127.5 - 1.0  # the formula runs from scratch have always used, bit for bit
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (x / 255.0 - mean) / std


def normaliser(data: ml_collections.ConfigDict):
    """`normalise` with the run's `data.mean` / `data.std` (fixed when the task is built)."""
    mean = tuple(float(v) for v in data.get("mean", DEFAULT_MEAN))
    std = tuple(float(v) for v in data.get("std", DEFAULT_STD))
    return functools.partial(normalise, mean=mean, std=std)


def loss_fn(
    model: nn.Module,
    params: Any,
    model_state: dict,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    label_smoothing: float = 0.0,
    normalise=normalise,
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
    loss = losses.cross_entropy(logits, batch["label"], label_smoothing).mean()
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return loss, ({"loss": loss, "accuracy": accuracy}, dict(new_state))


def _train_dataset(config, process_index, process_count, start_example=0):
    return pipeline.run_train_dataset(
        config,
        _checked_source(config, config.data.train_split),
        lambda resize: pipeline.classification_features(config.data, resize=resize),
        process_index,
        process_count,
        start_example,
    )


def _flops(config: ml_collections.ConfigDict, model: nn.Module) -> float | None:
    try:
        return flops.per_example(config, model)
    except ValueError:  # a model without a formula: no FLOP metrics
        return None


def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> Task:
    """The classification task of `config` (nothing is derived from the data but the class
    count, so nothing is kept in `workdir`)."""
    del workdir
    model = build_model(config)
    pixels = normaliser(config.data)

    def logits(variables, images):
        return model.apply(variables, pixels(images), train=False)

    return Task(
        name="classification",
        prepared=None,
        model=model,
        init_inputs=init_inputs(config),
        loss_fn=functools.partial(
            loss_fn, model, label_smoothing=config.loss.label_smoothing, normalise=pixels
        ),
        train_dataset=functools.partial(_train_dataset, config),
        fake_batch=functools.partial(fake_batch, config),
        flops_per_example=_flops(config, model),
        logits=logits,
    )
