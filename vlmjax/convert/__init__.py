"""Pretrained weights from Hugging Face `save_pretrained` folders into our Flax models.

    model, variables = convert.from_hf("path/to/resnet-50")
    logits = model.apply(variables, images_nhwc, train=False)  # [b, classes] float32

`variables` are plain numpy float32 trees (no `nn.Partitioned` boxes); put them on devices
with the shardings you need. Converters are checked against the reference outputs of
transformers (tests/convert/). Adding a family: write `hf_<family>.py` with `ARCHITECTURES`
and `convert(config, tensors) -> (model, variables)`, and add a line to `CONVERTERS`.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn

from vlmjax.convert import tensors as tensors_lib

# config.json model_type -> converter module (imported on use: each pulls in its model).
CONVERTERS = {
    "resnet": "vlmjax.convert.hf_resnet",
    "fuyu": "vlmjax.convert.hf_fuyu",
    "clip": "vlmjax.convert.hf_clip",
}


def _supported() -> str:
    lines = []
    for model_type, module_name in CONVERTERS.items():
        architectures = importlib.import_module(module_name).ARCHITECTURES
        lines.append(f"{model_type} ({', '.join(architectures)})")
    return "; ".join(lines)


def from_hf(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """(Flax model, {"params": ..., "batch_stats": ...}) from a save_pretrained folder.

    The folder needs config.json and model.safetensors (or sharded safetensors with
    model.safetensors.index.json). Dispatches on config.json's `model_type`, and checks
    `architectures` (the HF class that saved it) against what the converter handles.
    Images for the returned model are NHWC, where the HF model took NCHW.
    """
    config, tensors = tensors_lib.read_folder(path)
    model_type = config.get("model_type")
    if model_type not in CONVERTERS:
        raise NotImplementedError(
            f"no converter for model_type={model_type!r} in {path!r}; supported: {_supported()}"
        )
    converter = importlib.import_module(CONVERTERS[model_type])
    unknown = [a for a in config.get("architectures") or () if a not in converter.ARCHITECTURES]
    if unknown:
        raise NotImplementedError(
            f"{path!r} was saved by {unknown}, which the {model_type} converter does not "
            f"handle; supported: {_supported()}"
        )
    return converter.convert(config, tensors)
