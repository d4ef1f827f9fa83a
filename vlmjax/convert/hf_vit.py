"""Hugging Face `ViTForImageClassification` / `ViTModel` <-> `vit.ViT`.

Checked against transformers 5.24 (tests/convert/make_parity_env.sh pins it), whose
save_pretrained still writes the names below (its modules were renamed in 5.9; the
checkpoint names were kept). With L = `vit.encoder.layer.{i}` (`vit.` is absent in a bare
ViTModel):

    vit.embeddings.patch_embeddings.projection -> embedding/proj
    vit.embeddings.cls_token                   -> cls
    vit.embeddings.position_embeddings         -> pos_embedding [1, 1 + n, d]
    L.layernorm_before, L.layernorm_after      -> encoder/layer_{i}/norm1, norm2
    L.attention.attention.{query,key,value}    ->     attn/{query,key,value}
    L.attention.output.dense                   ->     attn/out
    L.intermediate.dense, L.output.dense       ->     mlp/fc1, fc2
    vit.layernorm                              -> encoder/norm
    pooler.dense (ViTModel)                    -> pre_logits (then tanh)
    classifier                                 -> head

Our ViT: `pool="cls", cls_position=True, pre_norm=False, eps=1e-12`, exact GELU. A
checkpoint with `qkv_bias=false` loads with zero q/k/v biases (ours always has them), and
is exported back with `qkv_bias=true` and those zeros: the same function, other keys.

ViTModel: we keep its pooler, as the original ViT's pre-logits layer (`rep_size`): the
converted model (`num_classes=0`) returns HF's `pooler_output`, tanh(Dense(cls token)).
A ViTModel saved without the pooler (`add_pooling_layer=False`) converts with
`rep_size=0` and returns `last_hidden_state[:, 0]`. To fine-tune a classifier the way
`ViTForImageClassification.from_pretrained(vit_model_folder)` does (head on the class
token, the pooler dropped), build the run's ViT with `rep_size=0` and drop `pre_logits`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmjax.convert import blocks, hf_clip, writing
from vlmjax.convert import tensors as tensors_lib
from vlmjax.models import vit

ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
BLOCK = dict(
    norm1="layernorm_before",
    norm2="layernorm_after",
    fc1="intermediate.dense",
    fc2="output.dense",
    query="attention.attention.query",
    key="attention.attention.key",
    value="attention.attention.value",
    out="attention.output.dense",
)
# transformers' ViTConfig defaults, for fields a config.json omits.
_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    image_size=224,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
    pooler_output_size=None,
    pooler_act="tanh",
)
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    return {**_DEFAULTS, **config}


def _is_bare(config: dict[str, Any]) -> bool:
    return "ViTModel" in (config.get("architectures") or ())


def model_from_config(config: dict[str, Any], pooler: bool | None = None) -> vit.ViT:
    """Our ViT for an HF ViTConfig (config.json as a dict), float32; errors on what it lacks.

    Used fields: hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
    hidden_act, layer_norm_eps, patch_size, head_dim, pooler_output_size, pooler_act,
    id2label (or num_labels), architectures (ViTModel: no head). `pooler`: whether a
    ViTModel's checkpoint has its pooler (default: yes, as ViTModel saves it).
    """
    c = _fields(config)
    if c["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={c['hidden_act']!r} is not one of {sorted(_ACTIVATIONS)}")
    width, heads = c["hidden_size"], c["num_attention_heads"]
    if width % heads or c.get("head_dim", width // heads) != width // heads:
        raise ValueError(
            f"hidden_size={width}, num_attention_heads={heads}, head_dim={c.get('head_dim')}: "
            f"our attention needs head_dim = hidden_size / num_attention_heads"
        )
    for field in ("image_size", "patch_size"):
        if not isinstance(c[field], int):
            raise ValueError(f"{field}={c[field]!r}: only square sizes (an int) are supported")
    if c["image_size"] % c["patch_size"]:
        raise ValueError(
            f"image_size={c['image_size']} is not divisible by patch_size={c['patch_size']}"
        )
    rep_size = 0
    if _is_bare(config):
        num_classes = 0
        if pooler is None or pooler:
            if c["pooler_act"] != "tanh":
                raise ValueError(f"pooler_act={c['pooler_act']!r}: only 'tanh' is implemented")
            rep_size = c["pooler_output_size"] or width
    elif "id2label" in config:
        num_classes = len(config["id2label"])  # transformers 5 saves id2label, not num_labels
    else:
        num_classes = config.get("num_labels", 2)  # HF's default
    return vit.ViT(
        num_classes=num_classes,
        variant=None,
        **blocks.sizes_in(c),
        patch_size=c["patch_size"],
        pool="cls",
        cls_position=True,
        pre_norm=False,
        activation=_ACTIVATIONS[c["hidden_act"]],
        eps=c["layer_norm_eps"],
        rep_size=rep_size,
    )


def variables_from_tensors(
    config: dict[str, Any], tensors: dict[str, np.ndarray], model: vit.ViT
) -> dict[str, dict]:
    """{"params": ...} of `model` from the HF ViT state dict `tensors` (numpy float32).

    Raises if a tensor is left over or a Flax leaf is not filled. Without qkv_bias the
    q/k/v biases are zeros.
    """
    pool = tensors_lib.TensorPool(tensors, "HF ViT checkpoint")
    prefix = "" if _is_bare(config) else "vit."
    hp = model.hparams()
    params: dict[str, Any] = {}
    emb = f"{prefix}embeddings"
    weight = pool.pop(f"{emb}.patch_embeddings.projection.weight")  # [d, c, p, p]
    tensors_lib.put(params, ("embedding", "proj", "kernel"), tensors_lib.conv_kernel(weight))
    bias = pool.pop(f"{emb}.patch_embeddings.projection.bias")
    tensors_lib.put(params, ("embedding", "proj", "bias"), bias)
    tensors_lib.put(params, ("cls",), pool.pop(f"{emb}.cls_token"))  # [1, 1, d]
    positions = pool.pop(f"{emb}.position_embeddings")  # [1, 1 + n, d]
    tensors_lib.put(params, ("pos_embedding", "pos_embedding"), positions)
    qkv_bias = _fields(config)["qkv_bias"]
    layer = prefix + "encoder.layer.{}"
    blocks.encoder_in(pool, layer, params, (), hp["depth"], hp["num_heads"], BLOCK, qkv_bias)
    blocks.norm_in(pool, f"{prefix}layernorm", params, ("encoder", "norm"))
    if model.rep_size:
        blocks.dense_in(pool, "pooler.dense", params, ("pre_logits",))
    if model.num_classes:
        blocks.dense_in(pool, "classifier", params, ("head",))
    pool.assert_consumed()
    variables = {"params": params}
    size = _fields(config)["image_size"]
    images = tensors_lib.abstract_images(weight.shape[1], size)
    tensors_lib.check_tree(variables, model, images)
    return variables


def convert(
    config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> tuple[vit.ViT, dict[str, dict]]:
    """(model, {"params"}) from an HF ViT config.json and state dict. Images are NHWC,
    normalised as the HF image processor does, at the config's image_size (the position
    table is not interpolated)."""
    pooler = not _is_bare(config) or "pooler.dense.weight" in tensors
    model = model_from_config(config, pooler=pooler)
    return model, variables_from_tensors(config, tensors, model)


# --- ours -> HF (convert.to_hf) ------------------------------------------------------


def export(model: vit.ViT, variables: dict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: array}) of an HF ViTForImageClassification (a model
    with a head) or a ViTModel (`num_classes=0` with the pre-logits `rep_size`, its pooler)
    equal to `model`. Raises ValueError naming every option HF's ViT cannot express."""
    problems = hf_clip.vit_problems(model, "", "cls", False, _HF_ACTIVATIONS)
    bare = not model.num_classes
    if bare and not model.rep_size:
        problems.append(
            "num_classes=0 with rep_size=0: ViTModel always has its tanh pooler; export a "
            "classifier (num_classes > 0) or a model with rep_size"
        )
    if bare and model.rep_size:
        problems = [p for p in problems if not p.startswith("rep_size")]
    blocks.unsupported("ViTModel" if bare else "ViTForImageClassification", problems)

    leaves = writing.LeafPool(variables)
    out: dict[str, np.ndarray] = {}
    hp = model.hparams()
    prefix = "" if bare else "vit."
    emb = f"{prefix}embeddings"
    weight = writing.conv_weight(leaves.pop("params/embedding/proj/kernel"))  # [d, c, p, p]
    writing.put(out, f"{emb}.patch_embeddings.projection.weight", weight)
    bias = leaves.pop("params/embedding/proj/bias")
    writing.put(out, f"{emb}.patch_embeddings.projection.bias", bias)
    cls = leaves.pop("params/cls")  # [1, 1, d]
    positions = leaves.pop("params/pos_embedding/pos_embedding")  # [1, n (+1), d]
    size = hf_clip.image_size(model, positions.shape[1] - (1 if model.cls_position else 0))
    if not model.cls_position:  # the class token had no position: row 0 is zeros
        positions = np.concatenate([np.zeros_like(positions[:, :1]), positions], axis=1)
    writing.put(out, f"{emb}.cls_token", cls)
    writing.put(out, f"{emb}.position_embeddings", positions)
    blocks.encoder_out(leaves, "params", out, prefix + "encoder.layer.{}", hp["depth"], BLOCK)
    blocks.norm_out(leaves, "params/encoder/norm", out, f"{prefix}layernorm")
    if bare:
        blocks.dense_out(leaves, "params/pre_logits", out, "pooler.dense")
    else:
        blocks.dense_out(leaves, "params/head", out, "classifier")
    leaves.assert_consumed()

    config: dict[str, Any] = dict(
        architectures=["ViTModel" if bare else "ViTForImageClassification"],
        model_type="vit",
        **blocks.sizes_out(hp),
        hidden_act=_HF_ACTIVATIONS[model.activation],
        layer_norm_eps=model.eps,
        image_size=size,
        patch_size=hp["patch_size"],
        num_channels=int(weight.shape[1]),
        qkv_bias=True,
    )
    if bare:
        config.update(pooler_output_size=model.rep_size, pooler_act="tanh")
    else:
        labels = {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
        config.update(id2label=labels, label2id={v: int(k) for k, v in labels.items()})
    return config, out
