"""Pretrained weights in from Hugging Face `save_pretrained` folders, and back out.

    model, variables = convert.from_hf("path/to/resnet-50")
    logits = model.apply(variables, images_nhwc, train=False)  # [b, classes] float32
    convert.to_hf(model, variables, "path/to/out")  # config.json + model.safetensors

`variables` are plain numpy float32 trees (no `nn.Partitioned` boxes); put them on devices
with the shardings you need. Converters are checked against the reference outputs of
transformers (tests/convert/). Adding a family: write `hf_<family>.py` with `ARCHITECTURES`,
`convert(config, tensors) -> (model, variables)` and `export(model, variables) -> (config,
tensors)`, and add a line to `CONVERTERS` and to `_exporter`.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn

from vlmjax.convert import tensors as tensors_lib
from vlmjax.convert import writing

# config.json model_type -> converter module (imported on use: each pulls in its model).
CONVERTERS = {
    "resnet": "vlmjax.convert.hf_resnet",
    "fuyu": "vlmjax.convert.hf_fuyu",
    "clip": "vlmjax.convert.hf_clip",
    "siglip": "vlmjax.convert.hf_siglip",
    "vit": "vlmjax.convert.hf_vit",
}
# model_types we know and do not convert, with the reason.
NOT_IMPLEMENTED = {
    "siglip2": "SigLIP 2's NaFlex (variable-resolution) Siglip2Model is not implemented; "
    "SigLIP 2's fixed-resolution checkpoints are saved as model_type 'siglip' and load",
}


def read_config(path: str) -> dict[str, Any]:
    """config.json of a save_pretrained folder, as a dict (no tensors are read)."""
    return tensors_lib.read_config(path)


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
    model_type = read_config(path).get("model_type")
    if model_type in NOT_IMPLEMENTED:
        raise NotImplementedError(
            f"{path!r}: model_type={model_type!r}: {NOT_IMPLEMENTED[model_type]}"
        )
    if model_type not in CONVERTERS:
        raise NotImplementedError(
            f"no converter for model_type={model_type!r} in {path!r}; supported: {_supported()}"
        )
    config, tensors = tensors_lib.read_folder(path)
    converter = importlib.import_module(CONVERTERS[model_type])
    unknown = [a for a in config.get("architectures") or () if a not in converter.ARCHITECTURES]
    if unknown:
        raise NotImplementedError(
            f"{path!r} was saved by {unknown}, which the {model_type} converter does not "
            f"handle; supported: {_supported()}"
        )
    return converter.convert(config, tensors)


def _exporter(model: nn.Module):
    """The hf_<family> module that exports `model` (by its class and, for CLIP, its towers)."""
    from vlmjax.models import clip, convnets, fuyu, vit

    if isinstance(model, clip.CLIP):
        image_tower, _ = clip.towers(model)
        # SigLIP's image tower pools with a MAP head; everything else is CLIP's layout
        # (and its exporter names what CLIPModel lacks).
        siglip = isinstance(image_tower, vit.ViT) and image_tower.pool == "map"
        return importlib.import_module(CONVERTERS["siglip" if siglip else "clip"])
    families = {vit.ViT: "vit", convnets.ResNet: "resnet", fuyu.FuyuDecoder: "fuyu"}
    for cls, family in families.items():
        if isinstance(model, cls):
            return importlib.import_module(CONVERTERS[family])
    raise TypeError(
        f"no HF exporter for {type(model).__name__}; exportable: CLIP (CLIPModel or, with "
        f"a MAP-pooled image tower, SiglipModel), ViT, ResNet, FuyuDecoder"
    )


def to_hf(
    model: nn.Module,
    variables: dict,
    out_dir: str,
    dtype: str = "float32",
    hf_config: dict[str, Any] | None = None,
) -> None:
    """Writes out_dir/config.json and out_dir/model.safetensors, a folder transformers loads
    with `from_pretrained` (CLIPModel, SiglipModel, ViTForImageClassification or ViTModel,
    ResNetForImageClassification or ResNetModel, FuyuForCausalLM).

    `variables`: the model's {"params": ..., "batch_stats": ...} (numpy or addressable jax
    arrays; scanned layers are unstacked). `dtype`: of the floating tensors ("float32",
    "bfloat16", "float16"). Options the HF class cannot express raise ValueError naming
    them before anything is written; a leaf with no place in the HF model raises too.
    `hf_config`: top-level config.json fields set over the exporter's (token ids the model
    does not know, e.g. Fuyu's image_token_id, or id2label names). Tokenizer and
    preprocessor files are not written here.
    """
    config, tensors = _exporter(model).export(model, variables)
    config.update(hf_config or {})
    writing.write_folder(out_dir, config, tensors, dtype)
