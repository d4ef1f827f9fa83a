"""Hugging Face `ResNetForImageClassification` / `ResNetModel` -> `convnets.ResNet`.

Checked against transformers 5.24 (tests/convert/make_parity_env.sh pins it). HF names,
with i, j, k from 0 (`resnet.` is absent in a bare `ResNetModel`):

    resnet.embedder.embedder.{convolution,normalization}  -> conv_init, bn_init
    resnet.encoder.stages.{i}.layers.{j}                   -> stage{i+1}_block{j+1}
        .layer.{k}.{convolution,normalization}             ->     conv{k+1}, bn{k+1}
        .shortcut.{convolution,normalization}              ->     proj_conv, proj_bn
    classifier.1.{weight,bias}                             -> head/{kernel,bias}

BatchNorm `weight`, `bias` become params `scale`, `bias`; `running_mean`, `running_var`
become batch_stats `mean`, `var`; `num_batches_tracked` is dropped (our BatchNorm uses a
fixed momentum, torch's default momentum=0.1 is our 0.9, and eps 1e-5 matches).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmjax.convert import blocks, writing
from vlmjax.convert import tensors as tensors_lib
from vlmjax.models import convnets

ARCHITECTURES = ("ResNetForImageClassification", "ResNetModel")


def model_from_config(config: dict[str, Any]) -> convnets.ResNet:
    """Our ResNet for an HF ResNetConfig (as read from config.json); errors on what it lacks.

    Used fields: embedding_size, hidden_sizes, depths, layer_type, hidden_act,
    downsample_in_first_stage, downsample_in_bottleneck, id2label (or num_labels),
    architectures (a bare ResNetModel has no head: num_classes=0, pooled features out).
    """
    layer_type = config.get("layer_type", "bottleneck")
    if layer_type not in convnets.EXPANSION:
        raise ValueError(f"layer_type={layer_type!r} is not one of {sorted(convnets.EXPANSION)}")
    if config.get("hidden_act", "relu") != "relu":
        raise ValueError(f"hidden_act={config['hidden_act']!r}: our ResNet only has relu")
    if config.get("downsample_in_first_stage", False):
        raise ValueError(
            "downsample_in_first_stage=True (stride 2 in stage 1) is not supported: "
            "our ResNet strides only in stages 2 and later"
        )
    if config.get("downsample_in_bottleneck", False):
        raise ValueError(
            "downsample_in_bottleneck=True strides the first 1x1 conv (ResNet v1); "
            "our ResNet is v1.5 (stride in the 3x3 conv)"
        )
    width = config.get("embedding_size", 64)
    depths = tuple(config.get("depths", (3, 4, 6, 3)))
    hidden_sizes = tuple(config.get("hidden_sizes", (256, 512, 1024, 2048)))
    # Our stages are width * 2**i wide (x4 at a bottleneck's output), as in torchvision.
    expansion = convnets.EXPANSION[layer_type]
    expected = tuple(width * 2**i * expansion for i in range(len(depths)))
    if hidden_sizes != expected:
        raise ValueError(
            f"hidden_sizes={list(hidden_sizes)} with embedding_size={width} and "
            f"layer_type={layer_type!r}: our ResNet needs embedding_size * 2**i * {expansion} "
            f"= {list(expected)}"
        )

    if "ResNetModel" in config.get("architectures", ()):
        num_classes = 0
    elif "id2label" in config:
        # transformers 5 saves id2label and derives num_labels from it.
        num_classes = len(config["id2label"])
    else:
        num_classes = config.get("num_labels", 2)  # HF's default

    # A standard depth keeps the model's repr short; anything else uses the overrides.
    for depth, (kind, stage_sizes) in convnets.DEPTHS.items():
        if (kind, stage_sizes) == (layer_type, depths):
            return convnets.ResNet(num_classes=num_classes, depth=depth, width=width)
    return convnets.ResNet(
        num_classes=num_classes, width=width, block=layer_type, stage_sizes=depths
    )


def _conv(pool: tensors_lib.TensorPool, hf: str, params: dict, path: tuple[str, ...]) -> None:
    tensors_lib.put(params, (*path, "kernel"), tensors_lib.conv_kernel(pool.pop(hf + ".weight")))


def _batch_norm(pool: tensors_lib.TensorPool, hf: str, variables: dict, path: tuple[str, ...]):
    params, stats = variables["params"], variables["batch_stats"]
    tensors_lib.put(params, (*path, "scale"), pool.pop(hf + ".weight"))
    tensors_lib.put(params, (*path, "bias"), pool.pop(hf + ".bias"))
    tensors_lib.put(stats, (*path, "mean"), pool.pop(hf + ".running_mean"))
    tensors_lib.put(stats, (*path, "var"), pool.pop(hf + ".running_var"))
    pool.discard(hf + ".num_batches_tracked")  # a training-step counter, no Flax counterpart


def variables_from_tensors(
    config: dict[str, Any], tensors: dict[str, np.ndarray], model: convnets.ResNet
) -> dict[str, dict]:
    """{"params", "batch_stats"} of `model` from the HF state dict `tensors` (numpy float32).

    Raises if a tensor is left over or a Flax leaf is not filled.
    """
    pool = tensors_lib.TensorPool(tensors, "HF ResNet checkpoint")
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    params = variables["params"]
    # ResNetForImageClassification nests the trunk under `resnet.`; a bare ResNetModel does not.
    prefix = "resnet." if any(name.startswith("resnet.") for name in tensors) else ""

    stem = prefix + "embedder.embedder"
    _conv(pool, stem + ".convolution", params, ("conv_init",))
    _batch_norm(pool, stem + ".normalization", variables, ("bn_init",))

    kind, stage_sizes = model.architecture()
    num_convs = 3 if kind == "bottleneck" else 2
    for i, num_blocks in enumerate(stage_sizes):
        for j in range(num_blocks):
            hf = f"{prefix}encoder.stages.{i}.layers.{j}"
            block = f"stage{i + 1}_block{j + 1}"
            for k in range(num_convs):
                _conv(pool, f"{hf}.layer.{k}.convolution", params, (block, f"conv{k + 1}"))
                _batch_norm(pool, f"{hf}.layer.{k}.normalization", variables, (block, f"bn{k + 1}"))
            # HF and we both project exactly when the block changes shape; check_tree below
            # catches a disagreement.
            if f"{hf}.shortcut.convolution.weight" in pool:
                _conv(pool, f"{hf}.shortcut.convolution", params, (block, "proj_conv"))
                _batch_norm(pool, f"{hf}.shortcut.normalization", variables, (block, "proj_bn"))

    if model.num_classes:
        # classifier.0 is nn.Flatten; the pooled [b, c, 1, 1] -> [b, c] matches our mean.
        weight = pool.pop("classifier.1.weight")  # [classes, c]
        tensors_lib.put(params, ("head", "kernel"), tensors_lib.dense_kernel(weight))
        tensors_lib.put(params, ("head", "bias"), pool.pop("classifier.1.bias"))

    pool.assert_consumed()
    sample = tensors_lib.abstract_images(config.get("num_channels", 3))
    tensors_lib.check_tree(variables, model, sample, train=False)
    return variables


def convert(
    config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> tuple[convnets.ResNet, dict[str, dict]]:
    """(model, {"params", "batch_stats"}) from an HF ResNet config.json and state dict."""
    model = model_from_config(config)
    return model, variables_from_tensors(config, tensors, model)


# --- ours -> HF (convert.to_hf) ------------------------------------------------------


def _conv_out(leaves: writing.LeafPool, path: str, out: dict, hf: str) -> None:
    writing.put(out, hf + ".weight", writing.conv_weight(leaves.pop(path + "/kernel")))


def _batch_norm_out(leaves: writing.LeafPool, path: str, out: dict, hf: str) -> None:
    writing.put(out, hf + ".weight", leaves.pop(f"params/{path}/scale"))
    writing.put(out, hf + ".bias", leaves.pop(f"params/{path}/bias"))
    writing.put(out, hf + ".running_mean", leaves.pop(f"batch_stats/{path}/mean"))
    writing.put(out, hf + ".running_var", leaves.pop(f"batch_stats/{path}/var"))
    # torch's step counter (it only matters with momentum=None, which HF ResNet never uses);
    # ours has none, so it restarts at 0.
    writing.put(out, hf + ".num_batches_tracked", np.array(0, np.int64))


def export(model: convnets.ResNet, variables: dict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: array}) of an HF ResNetForImageClassification (or,
    with `num_classes=0`, a ResNetModel) equal to `model`. Raises ValueError naming every
    option HF's ResNet cannot express (its stem is a 7x7 stride-2 conv and a max pool)."""
    kind, stage_sizes = model.architecture()
    problems = []
    if (model.stem_kernel, model.stem_stride, model.stem_pool) != (7, 2, True):
        problems.append(
            f"stem_kernel={model.stem_kernel}, stem_stride={model.stem_stride}, "
            f"stem_pool={model.stem_pool} (HF's stem is a 7x7 stride-2 conv and a max pool)"
        )
    if model.bn_eps != 1e-5:
        problems.append(f"bn_eps={model.bn_eps} (HF's BatchNorm eps is 1e-5)")
    bare = not model.num_classes
    blocks.unsupported("ResNetModel" if bare else "ResNetForImageClassification", problems)

    leaves = writing.LeafPool(variables)
    out: dict[str, np.ndarray] = {}
    prefix = "" if bare else "resnet."
    stem = prefix + "embedder.embedder"
    kernel = leaves.pop("params/conv_init/kernel")  # [7, 7, c, width]
    channels = int(kernel.shape[2])
    writing.put(out, stem + ".convolution.weight", writing.conv_weight(kernel))
    _batch_norm_out(leaves, "bn_init", out, stem + ".normalization")
    num_convs = 3 if kind == "bottleneck" else 2
    for i, num_blocks in enumerate(stage_sizes):
        for j in range(num_blocks):
            hf, block = f"{prefix}encoder.stages.{i}.layers.{j}", f"stage{i + 1}_block{j + 1}"
            for k in range(num_convs):
                _conv_out(leaves, f"params/{block}/conv{k + 1}", out, f"{hf}.layer.{k}.convolution")
                _batch_norm_out(leaves, f"{block}/bn{k + 1}", out, f"{hf}.layer.{k}.normalization")
            if f"params/{block}/proj_conv/kernel" in leaves:
                _conv_out(leaves, f"params/{block}/proj_conv", out, f"{hf}.shortcut.convolution")
                _batch_norm_out(leaves, f"{block}/proj_bn", out, f"{hf}.shortcut.normalization")
    if not bare:
        blocks.dense_out(leaves, "params/head", out, "classifier.1")
    leaves.assert_consumed()

    expansion = convnets.EXPANSION[kind]
    config: dict[str, Any] = dict(
        architectures=["ResNetModel" if bare else "ResNetForImageClassification"],
        model_type="resnet",
        num_channels=channels,
        embedding_size=model.width,
        hidden_sizes=[model.width * 2**i * expansion for i in range(len(stage_sizes))],
        depths=list(stage_sizes),
        layer_type=kind,
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
    )
    if not bare:
        labels = {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
        config.update(id2label=labels, label2id={v: int(k) for k, v in labels.items()})
    return config, out
