"""Hugging Face `CLIPModel` -> `clip.CLIP`.

Checked against transformers 5.24 (tests/convert/make_parity_env.sh pins it). HF names, with
i from 0 and T the tower (`vision_model` or `text_model`):

    T.encoder.layers.{i}.layer_norm1, .layer_norm2   -> T_tower/encoder/layer_{i}/norm1, norm2
        .self_attn.{q,k,v}_proj                       ->     attn/{query,key,value}
        .self_attn.out_proj                           ->     attn/out
        .mlp.fc1, .mlp.fc2                            ->     mlp/fc1, fc2
    vision_model.embeddings.patch_embedding           -> image_tower/embedding/proj (bias 0)
    vision_model.embeddings.class_embedding           -> image_tower/cls
    vision_model.embeddings.position_embedding        -> image_tower/pos_embedding
    vision_model.pre_layrnorm (sic)                   -> image_tower/pre_norm
    vision_model.post_layernorm                       -> image_tower/encoder/norm
    text_model.embeddings.token_embedding             -> text_tower/token_embedding
    text_model.embeddings.position_embedding          -> text_tower/pos_embedding
    text_model.final_layer_norm                       -> text_tower/encoder/norm
    visual_projection, text_projection                -> image_proj, text_proj
    logit_scale                                       -> log_scale

The image tower is built with `cls_position=True` (the class token has position row 0, as
in HF), so every tensor maps one to one and `export` (ours -> HF) gives them back bitwise.
HF's patch conv has no bias: ours is imported as zeros, and a trained (nonzero) one is
folded into the patch rows of the position table on export (the same function, up to
float rounding). HF applies post_layernorm to the pooled class token and we apply the
encoder's final norm to every token before pooling: the same thing, as LayerNorm acts on
each token alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlmjax.convert import blocks, writing
from vlmjax.convert import tensors as tensors_lib
from vlmjax.models import clip, vit

ARCHITECTURES = ("CLIPModel",)
LAYER = {"vision": "vision_model.encoder.layers.{}", "text": "text_model.encoder.layers.{}"}

# transformers' CLIPVisionConfig / CLIPTextConfig defaults, for fields a config.json omits.
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
# Older configs set eos_token_id=2 although CLIP's EOS is 49407; transformers then pools at
# the argmax of the ids (EOS being the largest id), which is our `eos_id=None`.
_LEGACY_EOS_ID = 2


# transformers' hidden_act -> ours. Only these two are checked against transformers (CLIP
# checkpoints use one or the other); the names coincide, but the mapping is spelt out so a
# new entry in layers.ACTIVATIONS does not silently widen what is accepted.
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def _activation(tower: str, config: dict[str, Any]) -> str:
    act = config["hidden_act"]
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"{tower}_config.hidden_act={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[act]


def _tower_config(config: dict[str, Any], tower: str, defaults: dict) -> dict[str, Any]:
    return {**defaults, **(config.get(f"{tower}_config") or {})}


def model_from_config(config: dict[str, Any]) -> clip.CLIP:
    """Our CLIP for an HF CLIPConfig (as read from config.json), in float32.

    Used fields: projection_dim, vision_config (hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, image_size, patch_size, num_channels,
    hidden_act, layer_norm_eps), text_config (the same sizes, vocab_size,
    max_position_embeddings, eos_token_id).
    """
    v = _tower_config(config, "vision", _VISION_DEFAULTS)
    t = _tower_config(config, "text", _TEXT_DEFAULTS)
    if v["num_channels"] != 3:
        raise ValueError(f"vision_config.num_channels={v['num_channels']}: CLIP takes RGB (3)")
    if v["image_size"] % v["patch_size"]:
        raise ValueError(
            f"vision_config.image_size={v['image_size']} is not divisible by "
            f"patch_size={v['patch_size']}"
        )
    vision = dict(
        variant=None,
        **blocks.sizes_in(v),
        patch_size=v["patch_size"],
        pool="cls",
        cls_position=True,
        pre_norm=True,
        activation=_activation("vision", v),
        eps=v["layer_norm_eps"],
    )
    eos_id = t["eos_token_id"]
    text = dict(
        vocab_size=t["vocab_size"],
        context_length=t["max_position_embeddings"],
        **blocks.sizes_in(t),
        activation=_activation("text", t),
        eps=t["layer_norm_eps"],
        pool="eos",
        eos_id=None if eos_id == _LEGACY_EOS_ID else eos_id,
    )
    return clip.CLIP(embed_dim=config.get("projection_dim", 512), vision=vision, text=text)


def variables_from_tensors(
    config: dict[str, Any], tensors: dict[str, np.ndarray], model: clip.CLIP
) -> dict[str, dict]:
    """{"params": ...} of `model` from the HF CLIPModel state dict `tensors` (numpy float32).

    Raises if a tensor is left over or a Flax leaf is not filled.
    """
    pool = tensors_lib.TensorPool(tensors, "HF CLIP checkpoint")
    # position_ids are index buffers (0..n-1), not weights; some versions save them.
    for tower in ("vision_model", "text_model"):
        pool.discard(f"{tower}.embeddings.position_ids")
    params: dict[str, Any] = {}

    # Image tower.
    img = ("image_tower",)
    patch = pool.pop("vision_model.embeddings.patch_embedding.weight")  # [d, 3, p, p]
    tensors_lib.put(params, (*img, "embedding", "proj", "kernel"), tensors_lib.conv_kernel(patch))
    # HF's patch conv has no bias; ours does, and zero is the same function.
    tensors_lib.put(
        params, (*img, "embedding", "proj", "bias"), np.zeros(patch.shape[0], np.float32)
    )
    cls = pool.pop("vision_model.embeddings.class_embedding")  # [d]
    positions = pool.pop("vision_model.embeddings.position_embedding.weight")  # [1 + n, d]
    tensors_lib.put(params, (*img, "cls"), cls[None, None])  # [1, 1, d]
    tensors_lib.put(params, (*img, "pos_embedding", "pos_embedding"), positions[None])
    blocks.norm_in(pool, "vision_model.pre_layrnorm", params, (*img, "pre_norm"))
    v = model.vision
    blocks.encoder_in(pool, LAYER["vision"], params, img, v["depth"], v["num_heads"])
    blocks.norm_in(pool, "vision_model.post_layernorm", params, (*img, "encoder", "norm"))

    # Text tower.
    txt = ("text_tower",)
    tensors_lib.put(
        params,
        (*txt, "token_embedding", "embedding"),
        pool.pop("text_model.embeddings.token_embedding.weight"),  # [vocab, d]
    )
    tensors_lib.put(
        params,
        (*txt, "pos_embedding"),
        pool.pop("text_model.embeddings.position_embedding.weight"),  # [context, d]
    )
    t = model.text
    blocks.encoder_in(pool, LAYER["text"], params, txt, t["depth"], t["num_heads"])
    blocks.norm_in(pool, "text_model.final_layer_norm", params, (*txt, "encoder", "norm"))

    # Projections (bias-free in both) and the temperature.
    for hf, ours in (("visual_projection", "image_proj"), ("text_projection", "text_proj")):
        blocks.dense_in(pool, hf, params, (ours,), bias=False)  # [E, d] -> [d, E]
    tensors_lib.put(params, ("log_scale",), pool.pop("logit_scale").reshape(()))

    pool.assert_consumed()
    variables = {"params": params}
    image_size = _tower_config(config, "vision", _VISION_DEFAULTS)["image_size"]
    images = tensors_lib.abstract_images(3, image_size)
    tokens = np.zeros((1, model.text["context_length"]), np.int32)
    tensors_lib.check_tree(variables, model, images, tokens=tokens)
    return variables


def convert(
    config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> tuple[clip.CLIP, dict[str, dict]]:
    """(model, {"params"}) from an HF CLIPModel config.json and state dict.

    Images for the model are NHWC floats normalised as the HF image processor does; tokens
    are the HF tokenizer's ids ([b, L], L <= max_position_embeddings). The model's
    `max_scale` is raised to the checkpoint's logit scale when that exceeds 100, so the
    logits equal transformers' (which never clamps at inference).
    """
    model = model_from_config(config)
    variables = variables_from_tensors(config, tensors, model)
    scale = math.exp(float(variables["params"]["log_scale"]))
    if scale > model.max_scale:
        model = model.clone(max_scale=scale)
    return model, variables


# --- ours -> HF (convert.to_hf) ------------------------------------------------------

# Our activation -> transformers' hidden_act (the inverse of _ACTIVATIONS).
_HF_ACTIVATIONS = {ours: hf for hf, ours in _ACTIVATIONS.items()}


def image_size(tower: vit.ViT, patches: int) -> int:
    """The square image side of a ViT with `patches` patch tokens."""
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(
            f"the position table has {patches} patch rows, not a square grid: HF configs "
            f"describe square images (image_size) only"
        )
    return grid * tower.hparams()["patch_size"]


def vit_problems(tower: vit.ViT, prefix: str, pool: str, pre_norm: bool, acts: dict) -> list:
    """What an HF ViT-style tower with `pool`, `pre_norm` and activations `acts` cannot be."""
    problems = []
    if tower.pool != pool:
        problems.append(f"{prefix}pool={tower.pool!r} (the HF model pools with {pool!r})")
    if tower.pre_norm != pre_norm:
        problems.append(f"{prefix}pre_norm={tower.pre_norm} (the HF model has {pre_norm})")
    if tower.rep_size:
        problems.append(f"{prefix}rep_size={tower.rep_size} (the HF model has no pre-logits)")
    if tower.activation not in acts:
        problems.append(f"{prefix}activation={tower.activation!r} (supported: {sorted(acts)})")
    return problems


def vit_embeddings_out(
    tower: vit.ViT, leaves: writing.LeafPool, path: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patch conv weight [d, c, p, p], class token [d], positions [1 + n, d]) in HF's form.

    Without `cls_position` the class token's position row is zeros (HF adds row 0 to it);
    a nonzero patch bias (HF's conv has none) is added to the patch rows, which gives the
    same embeddings up to rounding. A zero bias changes nothing, bitwise.
    """
    weight = writing.conv_weight(leaves.pop(f"{path}/embedding/proj/kernel"))
    bias = leaves.pop(f"{path}/embedding/proj/bias")  # [d]
    cls = leaves.pop(f"{path}/cls")[0, 0]  # [d]
    positions = leaves.pop(f"{path}/pos_embedding/pos_embedding")[0]  # [n (+1), d]
    if not tower.cls_position:
        positions = np.concatenate([np.zeros_like(positions[:1]), positions])
    if np.any(bias):
        positions = np.concatenate([positions[:1], positions[1:] + bias])
    return weight, cls, positions


def export(model: clip.CLIP, variables: dict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: array}) of an HF CLIPModel equal to `model`.

    Raises ValueError naming every option CLIPModel cannot express (a ResNet image tower,
    a SigLIP-style head, pooling, activations) before anything is built.
    """
    image, text_tower = clip.towers(model)
    problems = []
    if model.image_model != "vit":
        problems.append(f"image_model={model.image_model!r} (CLIPModel's image tower is a ViT)")
    else:
        problems += vit_problems(image, "vision.", "cls", True, _HF_ACTIVATIONS)
    if text_tower.pool != "eos":
        problems.append(f"text.pool={text_tower.pool!r} (CLIPModel pools at the EOS token)")
    if not text_tower.causal:
        problems.append("text.causal=False (CLIPModel's text tower is causal)")
    if text_tower.activation not in _HF_ACTIVATIONS:
        problems.append(
            f"text.activation={text_tower.activation!r} (supported: {sorted(_HF_ACTIVATIONS)})"
        )
    if text_tower.eos_id == _LEGACY_EOS_ID:
        problems.append(
            f"text.eos_id={_LEGACY_EOS_ID} (transformers reads eos_token_id=2 as 'pool at the "
            f"argmax of the ids', from legacy CLIP configs, not as token 2)"
        )
    for field in ("image_projection", "text_projection"):
        if getattr(model, field) != "linear":
            problems.append(f"{field}={getattr(model, field)!r} (CLIPModel's is 'linear')")
    if model.sigmoid_bias is not None:
        problems.append(
            f"sigmoid_bias={model.sigmoid_bias} (CLIPModel has no logit bias; SiglipModel has)"
        )
    blocks.unsupported("CLIPModel", problems)

    leaves = writing.LeafPool(variables)
    out: dict[str, np.ndarray] = {}
    v, img = image.hparams(), "params/image_tower"
    weight, cls, positions = vit_embeddings_out(image, leaves, img)
    size = image_size(image, positions.shape[0] - 1)  # HF's table: [1 + n, d]
    writing.put(out, "vision_model.embeddings.patch_embedding.weight", weight)
    writing.put(out, "vision_model.embeddings.class_embedding", cls)
    writing.put(out, "vision_model.embeddings.position_embedding.weight", positions)
    blocks.norm_out(leaves, f"{img}/pre_norm", out, "vision_model.pre_layrnorm")
    blocks.encoder_out(leaves, img, out, LAYER["vision"], v["depth"])
    blocks.norm_out(leaves, f"{img}/encoder/norm", out, "vision_model.post_layernorm")

    txt = "params/text_tower"
    token_embedding = leaves.pop(f"{txt}/token_embedding/embedding")
    writing.put(out, "text_model.embeddings.token_embedding.weight", token_embedding)
    writing.put(
        out, "text_model.embeddings.position_embedding.weight", leaves.pop(f"{txt}/pos_embedding")
    )
    blocks.encoder_out(leaves, txt, out, LAYER["text"], text_tower.depth)
    blocks.norm_out(leaves, f"{txt}/encoder/norm", out, "text_model.final_layer_norm")
    blocks.dense_out(leaves, "params/image_proj", out, "visual_projection", bias=False)
    blocks.dense_out(leaves, "params/text_proj", out, "text_projection", bias=False)
    writing.put(out, "logit_scale", log_scale_out(leaves.pop("params/log_scale"), model.max_scale))
    leaves.assert_consumed()

    config = {
        "architectures": list(ARCHITECTURES),
        "model_type": "clip",
        "projection_dim": model.embed_dim,
        "vision_config": dict(
            model_type="clip_vision_model",
            **blocks.sizes_out(v),
            num_channels=int(weight.shape[1]),
            image_size=size,
            patch_size=v["patch_size"],
            hidden_act=_HF_ACTIVATIONS[image.activation],
            layer_norm_eps=image.eps,
            projection_dim=model.embed_dim,
        ),
        "text_config": dict(
            model_type="clip_text_model",
            vocab_size=text_tower.vocab_size,
            **blocks.sizes_out(text_tower),
            max_position_embeddings=text_tower.context_length,
            hidden_act=_HF_ACTIVATIONS[text_tower.activation],
            layer_norm_eps=text_tower.eps,
            # transformers pools at the argmax of the ids when eos_token_id is 2 (our None).
            eos_token_id=_LEGACY_EOS_ID if text_tower.eos_id is None else text_tower.eos_id,
            pad_token_id=text_tower.pad_id,
            projection_dim=model.embed_dim,
        ),
    }
    return config, out


def log_scale_out(log_scale: np.ndarray, max_scale: float, shape: tuple = ()) -> np.ndarray:
    """Our log temperature [] -> HF's logit_scale (CLIP: [], SigLIP: [1]), clamped as our
    model clamps it (transformers never clamps)."""
    clamped = np.minimum(log_scale, np.float32(math.log(max_scale)))
    return np.asarray(clamped, np.float32).reshape(shape)
