"""Hugging Face `SiglipModel` <-> `clip.CLIP` in its SigLIP form (Zhai et al., 2023).

Checked against transformers 5.24 (tests/convert/make_parity_env.sh pins it). SigLIP 2's
fixed-resolution checkpoints (google/siglip2-*-patch16-224 and the like) are saved as
`model_type: "siglip"` / `SiglipModel` and load here; `model_type: "siglip2"`
(`Siglip2Model`) is the NaFlex variable-resolution variant, whose patch embedding is a
Linear over flattened patches with a resized position grid per image: not implemented.

Our SigLIP: image tower `vit.ViT(pool="map", activation="gelu_tanh", eps=1e-6)` (no class
token, no pre-norm; the MAP head's output is the image embedding, so
`image_projection="none"`), text tower `text.TextTransformer(causal=False, pool="final")`
whose HF `head` is our `text_proj` with a bias (`text_projection="linear_bias"`), and the
learnt `log_scale` and `bias` (`sigmoid_bias` set): logits = exp(log_scale) * cos + bias.
HF names, with T the tower (`vision_model` or `text_model`):

    T.encoder.layers.{i}.*                         -> T_tower/encoder/layer_{i}/* (as CLIP)
    vision_model.embeddings.patch_embedding        -> image_tower/embedding/proj
    vision_model.embeddings.position_embedding     -> image_tower/pos_embedding [1, n, d]
    vision_model.post_layernorm                    -> image_tower/encoder/norm
    vision_model.head.probe                        -> image_tower/map_head/probe
    vision_model.head.attention.in_proj_{weight,bias} -> map_head/attn/{query,key,value}
    vision_model.head.attention.out_proj           -> map_head/attn/out
    vision_model.head.layernorm, .mlp.fc1, .mlp.fc2 -> map_head/norm, mlp/fc1, mlp/fc2
    text_model.embeddings.token_embedding          -> text_tower/token_embedding
    text_model.embeddings.position_embedding       -> text_tower/pos_embedding
    text_model.final_layer_norm                    -> text_tower/encoder/norm
    text_model.head                                -> text_proj (kernel and bias)
    logit_scale, logit_bias                        -> log_scale, bias

The MAP head's attention is torch's nn.MultiheadAttention, whose q, k and v weights are
stacked in one in_proj_weight [3d, d] (q rows first).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlmjax.convert import blocks, hf_clip, writing
from vlmjax.convert import tensors as tensors_lib
from vlmjax.models import clip

ARCHITECTURES = ("SiglipModel",)
LAYER = hf_clip.LAYER

# transformers' SiglipVisionConfig / SiglipTextConfig defaults, for fields a config omits.
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=True,
)
_TEXT_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=64,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    pad_token_id=1,
    projection_size=None,  # HF: the text hidden_size
)
# transformers' hidden_act -> ours ("gelu" is exact, the tanh forms are one function).
_ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}
_HF_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
# SigLIP's initial logit bias (Zhai et al., 2023); only the field's being set matters when
# the checkpoint's value is loaded over it.
_INIT_BIAS = -10.0


def _activation(tower: str, config: dict[str, Any]) -> str:
    act = config["hidden_act"]
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"{tower}_config.hidden_act={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[act]


def _towers(config: dict[str, Any]) -> tuple[dict, dict]:
    v = {**_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    t = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    return v, t


def model_from_config(config: dict[str, Any]) -> clip.CLIP:
    """Our CLIP in SigLIP form for an HF SiglipConfig (config.json as a dict), float32.

    Used fields: vision_config (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_channels, image_size, patch_size, hidden_act, layer_norm_eps,
    vision_use_head), text_config (the same sizes, vocab_size, max_position_embeddings,
    projection_size, pad_token_id).
    """
    v, t = _towers(config)
    if config.get("model_type") == "siglip2":
        raise NotImplementedError(
            "model_type='siglip2' (Siglip2Model) is SigLIP 2's NaFlex variable-resolution "
            "variant, which is not implemented; SigLIP 2's fixed-resolution checkpoints are "
            "saved as model_type='siglip' (SiglipModel) and load"
        )
    if not v["vision_use_head"]:
        raise ValueError(
            "vision_config.vision_use_head=false: SiglipModel's image embedding is the MAP "
            "head's output, so a SiglipModel needs the head"
        )
    if v["num_channels"] != 3:
        raise ValueError(f"vision_config.num_channels={v['num_channels']}: SigLIP takes RGB (3)")
    for field in ("image_size", "patch_size"):
        if not isinstance(v[field], int):
            raise ValueError(f"vision_config.{field}={v[field]!r}: only square sizes (an int)")
    if v["image_size"] % v["patch_size"]:
        raise ValueError(
            f"vision_config.image_size={v['image_size']} is not divisible by "
            f"patch_size={v['patch_size']}"
        )
    projection = t["projection_size"] or t["hidden_size"]
    if projection != v["hidden_size"]:
        raise ValueError(
            f"text_config.projection_size={projection} differs from vision_config.hidden_size="
            f"{v['hidden_size']}: SiglipModel compares the two embeddings, so they must match"
        )
    vision = dict(
        variant=None,
        **blocks.sizes_in(v),
        patch_size=v["patch_size"],
        pool="map",
        pre_norm=False,
        activation=_activation("vision", v),
        eps=v["layer_norm_eps"],
    )
    text = dict(
        vocab_size=t["vocab_size"],
        context_length=t["max_position_embeddings"],
        **blocks.sizes_in(t),
        activation=_activation("text", t),
        eps=t["layer_norm_eps"],
        pool="final",
        causal=False,
        pad_id=t["pad_token_id"] if t["pad_token_id"] is not None else 0,
    )
    return clip.CLIP(
        embed_dim=v["hidden_size"],
        vision=vision,
        text=text,
        sigmoid_bias=_INIT_BIAS,
        image_projection="none",
        text_projection="linear_bias",
    )


def variables_from_tensors(
    config: dict[str, Any], tensors: dict[str, np.ndarray], model: clip.CLIP
) -> dict[str, dict]:
    """{"params": ...} of `model` from the HF SiglipModel state dict `tensors` (float32).

    Raises if a tensor is left over or a Flax leaf is not filled.
    """
    pool = tensors_lib.TensorPool(tensors, "HF SigLIP checkpoint")
    for tower in ("vision_model", "text_model"):
        pool.discard(f"{tower}.embeddings.position_ids")  # index buffers, not weights
    params: dict[str, Any] = {}
    v, t = model.vision, model.text

    img = ("image_tower",)
    patch = "vision_model.embeddings.patch_embedding"
    weight = pool.pop(f"{patch}.weight")  # [d, 3, p, p]
    tensors_lib.put(params, (*img, "embedding", "proj", "kernel"), tensors_lib.conv_kernel(weight))
    tensors_lib.put(params, (*img, "embedding", "proj", "bias"), pool.pop(f"{patch}.bias"))
    positions = pool.pop("vision_model.embeddings.position_embedding.weight")  # [n, d]
    tensors_lib.put(params, (*img, "pos_embedding", "pos_embedding"), positions[None])
    blocks.encoder_in(pool, LAYER["vision"], params, img, v["depth"], v["num_heads"])
    blocks.norm_in(pool, "vision_model.post_layernorm", params, (*img, "encoder", "norm"))
    head, ours = "vision_model.head", (*img, "map_head")
    tensors_lib.put(params, (*ours, "probe"), pool.pop(f"{head}.probe"))  # [1, 1, d]
    in_weight = pool.pop(f"{head}.attention.in_proj_weight")  # [3d, d]: q, k, v rows
    in_bias = pool.pop(f"{head}.attention.in_proj_bias")  # [3d]
    for j, name in enumerate(("query", "key", "value")):
        rows = slice(j * v["width"], (j + 1) * v["width"])
        kernel, bias = blocks.heads_in(in_weight[rows], in_bias[rows], v["num_heads"])
        tensors_lib.put(params, (*ours, "attn", name, "kernel"), kernel)
        tensors_lib.put(params, (*ours, "attn", name, "bias"), bias)
    out_weight = pool.pop(f"{head}.attention.out_proj.weight")  # [d, d]
    kernel = out_weight.T.reshape(v["num_heads"], -1, v["width"])  # [h, dh, d]
    tensors_lib.put(params, (*ours, "attn", "out", "kernel"), np.ascontiguousarray(kernel))
    out_bias = pool.pop(f"{head}.attention.out_proj.bias")
    tensors_lib.put(params, (*ours, "attn", "out", "bias"), out_bias)
    blocks.norm_in(pool, f"{head}.layernorm", params, (*ours, "norm"))
    blocks.dense_in(pool, f"{head}.mlp.fc1", params, (*ours, "mlp", "fc1"))
    blocks.dense_in(pool, f"{head}.mlp.fc2", params, (*ours, "mlp", "fc2"))

    txt = ("text_tower",)
    embedding = pool.pop("text_model.embeddings.token_embedding.weight")  # [vocab, d]
    tensors_lib.put(params, (*txt, "token_embedding", "embedding"), embedding)
    positions = pool.pop("text_model.embeddings.position_embedding.weight")  # [context, d]
    tensors_lib.put(params, (*txt, "pos_embedding"), positions)
    blocks.encoder_in(pool, LAYER["text"], params, txt, t["depth"], t["num_heads"])
    blocks.norm_in(pool, "text_model.final_layer_norm", params, (*txt, "encoder", "norm"))
    blocks.dense_in(pool, "text_model.head", params, ("text_proj",))

    tensors_lib.put(params, ("log_scale",), pool.pop("logit_scale").reshape(()))
    tensors_lib.put(params, ("bias",), pool.pop("logit_bias").reshape(()))
    pool.assert_consumed()

    variables = {"params": params}
    size = _towers(config)[0]["image_size"]
    tokens = np.zeros((1, t["context_length"]), np.int32)
    tensors_lib.check_tree(variables, model, tensors_lib.abstract_images(3, size), tokens=tokens)
    return variables


def convert(
    config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> tuple[clip.CLIP, dict[str, dict]]:
    """(model, {"params"}) from an HF SiglipModel config.json and state dict.

    Images are NHWC, normalised as the HF image processor does (SigLIP: mean = std = 0.5);
    tokens are the HF tokenizer's ids padded to max_position_embeddings, as SigLIP was
    trained (the text is pooled at the last position, padding or not). `max_scale` is raised
    to the checkpoint's logit scale when that exceeds it: transformers never clamps.
    """
    model = model_from_config(config)
    variables = variables_from_tensors(config, tensors, model)
    scale = math.exp(float(variables["params"]["log_scale"]))
    if scale > model.max_scale:
        model = model.clone(max_scale=scale)
    return model, variables


# --- ours -> HF (convert.to_hf) ------------------------------------------------------


def export(model: clip.CLIP, variables: dict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: array}) of an HF SiglipModel equal to `model`.

    Raises ValueError naming every option SiglipModel cannot express before anything is
    built. A model without `sigmoid_bias` gets logit_bias 0 (the same logits); a bias-free
    text projection ("linear") gets a zero bias.
    """
    image, text_tower = clip.towers(model)
    problems = []
    if model.image_model != "vit":
        problems.append(f"image_model={model.image_model!r} (SiglipModel's image tower is a ViT)")
    else:
        problems += hf_clip.vit_problems(image, "vision.", "map", False, _HF_ACTIVATIONS)
        if image.hparams()["width"] != model.embed_dim:
            problems.append(
                f"vision width {image.hparams()['width']} != embed_dim={model.embed_dim}"
            )
    if text_tower.pool != "final":
        problems.append(f"text.pool={text_tower.pool!r} (SiglipModel pools at the last position)")
    if text_tower.causal:
        problems.append("text.causal=True (SiglipModel's text tower is not causal)")
    if text_tower.activation not in _HF_ACTIVATIONS:
        problems.append(
            f"text.activation={text_tower.activation!r} (supported: {sorted(_HF_ACTIVATIONS)})"
        )
    if model.image_projection != "none":
        problems.append(
            f"image_projection={model.image_projection!r} (SiglipModel has no image projection)"
        )
    if model.text_projection not in ("linear", "linear_bias"):
        problems.append(f"text_projection={model.text_projection!r} (SiglipModel has a head)")
    blocks.unsupported("SiglipModel", problems)

    leaves = writing.LeafPool(variables)
    out: dict[str, np.ndarray] = {}
    v, img = image.hparams(), "params/image_tower"
    proj = f"{img}/embedding/proj"
    weight = writing.conv_weight(leaves.pop(f"{proj}/kernel"))  # [d, 3, p, p]
    writing.put(out, "vision_model.embeddings.patch_embedding.weight", weight)
    writing.put(out, "vision_model.embeddings.patch_embedding.bias", leaves.pop(f"{proj}/bias"))
    positions = leaves.pop(f"{img}/pos_embedding/pos_embedding")  # [1, n, d]
    size = hf_clip.image_size(image, positions.shape[1])
    writing.put(out, "vision_model.embeddings.position_embedding.weight", positions[0])
    blocks.encoder_out(leaves, img, out, LAYER["vision"], v["depth"])
    blocks.norm_out(leaves, f"{img}/encoder/norm", out, "vision_model.post_layernorm")
    head, ours = "vision_model.head", f"{img}/map_head"
    writing.put(out, f"{head}.probe", leaves.pop(f"{ours}/probe"))
    qkv = [  # (weight [d, d], bias [d]) each
        blocks.heads_out(leaves.pop(f"{ours}/attn/{n}/kernel"), leaves.pop(f"{ours}/attn/{n}/bias"))
        for n in ("query", "key", "value")
    ]
    writing.put(out, f"{head}.attention.in_proj_weight", np.concatenate([w for w, _ in qkv]))
    writing.put(out, f"{head}.attention.in_proj_bias", np.concatenate([b for _, b in qkv]))
    kernel = leaves.pop(f"{ours}/attn/out/kernel")  # [h, dh, d]
    out_weight = writing.linear_weight(kernel.reshape(-1, kernel.shape[-1]))
    writing.put(out, f"{head}.attention.out_proj.weight", out_weight)
    writing.put(out, f"{head}.attention.out_proj.bias", leaves.pop(f"{ours}/attn/out/bias"))
    blocks.norm_out(leaves, f"{ours}/norm", out, f"{head}.layernorm")
    blocks.dense_out(leaves, f"{ours}/mlp/fc1", out, f"{head}.mlp.fc1")
    blocks.dense_out(leaves, f"{ours}/mlp/fc2", out, f"{head}.mlp.fc2")

    txt = "params/text_tower"
    token_embedding = leaves.pop(f"{txt}/token_embedding/embedding")
    writing.put(out, "text_model.embeddings.token_embedding.weight", token_embedding)
    writing.put(
        out, "text_model.embeddings.position_embedding.weight", leaves.pop(f"{txt}/pos_embedding")
    )
    blocks.encoder_out(leaves, txt, out, LAYER["text"], text_tower.depth)
    blocks.norm_out(leaves, f"{txt}/encoder/norm", out, "text_model.final_layer_norm")
    text_kernel = leaves.pop("params/text_proj/kernel")
    writing.put(out, "text_model.head.weight", writing.linear_weight(text_kernel))
    if model.text_projection == "linear_bias":
        writing.put(out, "text_model.head.bias", leaves.pop("params/text_proj/bias"))
    else:
        writing.put(out, "text_model.head.bias", np.zeros(text_kernel.shape[1], np.float32))
    log_scale = leaves.pop("params/log_scale")
    writing.put(out, "logit_scale", hf_clip.log_scale_out(log_scale, model.max_scale, (1,)))
    bias = leaves.pop("params/bias") if model.sigmoid_bias is not None else np.float32(0)
    writing.put(out, "logit_bias", np.asarray(bias, np.float32).reshape(1))
    leaves.assert_consumed()

    config = {
        "architectures": list(ARCHITECTURES),
        "model_type": "siglip",
        "vision_config": dict(
            model_type="siglip_vision_model",
            **blocks.sizes_out(v),
            num_channels=int(weight.shape[1]),
            image_size=size,
            patch_size=v["patch_size"],
            hidden_act=_HF_ACTIVATIONS[image.activation],
            layer_norm_eps=image.eps,
            vision_use_head=True,
        ),
        "text_config": dict(
            model_type="siglip_text_model",
            vocab_size=text_tower.vocab_size,
            **blocks.sizes_out(text_tower),
            max_position_embeddings=text_tower.context_length,
            hidden_act=_HF_ACTIVATIONS[text_tower.activation],
            layer_norm_eps=text_tower.eps,
            projection_size=model.embed_dim,
            pad_token_id=text_tower.pad_id,
        ),
    }
    return config, out
