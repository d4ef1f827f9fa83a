"""Hugging Face `CLIPModel` -> `clip.CLIP`.

Checked against transformers 5.24 (tests/convert/make_parity_env.sh pins it). HF names, with
i from 0 and T the tower (`vision_model` or `text_model`):

    T.encoder.layers.{i}.layer_norm1, .layer_norm2   -> T_tower/encoder/layer_{i}/norm1, norm2
        .self_attn.{q,k,v}_proj                       ->     attn/{query,key,value}
        .self_attn.out_proj                           ->     attn/out
        .mlp.fc1, .mlp.fc2                            ->     mlp/fc1, fc2
    vision_model.embeddings.patch_embedding           -> image_tower/embedding/proj (bias 0)
    vision_model.embeddings.class_embedding           -> image_tower/cls (+ position row 0)
    vision_model.embeddings.position_embedding        -> image_tower/pos_embedding (rows 1:)
    vision_model.pre_layrnorm (sic)                   -> image_tower/pre_norm
    vision_model.post_layernorm                       -> image_tower/encoder/norm
    text_model.embeddings.token_embedding             -> text_tower/token_embedding
    text_model.embeddings.position_embedding          -> text_tower/pos_embedding
    text_model.final_layer_norm                       -> text_tower/encoder/norm
    visual_projection, text_projection                -> image_proj, text_proj
    logit_scale                                       -> log_scale

Two differences are absorbed here. HF's class token gets position row 0 while our ViT adds
positions to the patch tokens only, so our `cls` is class_embedding + position_embedding[0].
HF applies post_layernorm to the pooled class token and we apply the encoder's final norm
to every token before pooling: the same thing, as LayerNorm acts on each token alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlmjax.convert import tensors as tensors_lib
from vlmjax.models import clip

ARCHITECTURES = ("CLIPModel",)

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
        width=v["hidden_size"],
        depth=v["num_hidden_layers"],
        mlp_dim=v["intermediate_size"],
        num_heads=v["num_attention_heads"],
        patch_size=v["patch_size"],
        pool="cls",
        pre_norm=True,
        activation=_activation("vision", v),
        eps=v["layer_norm_eps"],
    )
    eos_id = t["eos_token_id"]
    text = dict(
        vocab_size=t["vocab_size"],
        context_length=t["max_position_embeddings"],
        width=t["hidden_size"],
        depth=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        mlp_dim=t["intermediate_size"],
        activation=_activation("text", t),
        eps=t["layer_norm_eps"],
        pool="eos",
        eos_id=None if eos_id == _LEGACY_EOS_ID else eos_id,
    )
    return clip.CLIP(embed_dim=config.get("projection_dim", 512), vision=vision, text=text)


def _dense(pool: tensors_lib.TensorPool, hf: str, params: dict, path: tuple[str, ...]) -> None:
    tensors_lib.put(params, (*path, "kernel"), tensors_lib.dense_kernel(pool.pop(hf + ".weight")))
    tensors_lib.put(params, (*path, "bias"), pool.pop(hf + ".bias"))


def _layer_norm(pool: tensors_lib.TensorPool, hf: str, params: dict, path: tuple[str, ...]):
    tensors_lib.put(params, (*path, "scale"), pool.pop(hf + ".weight"))
    tensors_lib.put(params, (*path, "bias"), pool.pop(hf + ".bias"))


def _attention(
    pool: tensors_lib.TensorPool, hf: str, params: dict, path: tuple[str, ...], num_heads: int
) -> None:
    """q/k/v/out projections; torch's [h * dh] feature axis splits head-major into [h, dh]."""
    for name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        weight = pool.pop(f"{hf}.{name}.weight")  # [h * dh, d]
        width = weight.shape[1]
        kernel = weight.T.reshape(width, num_heads, -1)  # [d, h, dh]
        tensors_lib.put(params, (*path, ours, "kernel"), np.ascontiguousarray(kernel))
        bias = pool.pop(f"{hf}.{name}.bias").reshape(num_heads, -1)  # [h, dh]
        tensors_lib.put(params, (*path, ours, "bias"), bias)
    weight = pool.pop(f"{hf}.out_proj.weight")  # [d, h * dh]
    kernel = weight.T.reshape(num_heads, -1, weight.shape[0])  # [h, dh, d]
    tensors_lib.put(params, (*path, "out", "kernel"), np.ascontiguousarray(kernel))
    tensors_lib.put(params, (*path, "out", "bias"), pool.pop(f"{hf}.out_proj.bias"))


def _encoder(
    pool: tensors_lib.TensorPool, hf: str, params: dict, path: tuple[str, ...], tower: dict
) -> None:
    """The transformer blocks of one tower (our unscanned `layer_{i}` names)."""
    for i in range(tower["depth"]):
        src, dst = f"{hf}.encoder.layers.{i}", (*path, "encoder", f"layer_{i}")
        _layer_norm(pool, f"{src}.layer_norm1", params, (*dst, "norm1"))
        _attention(pool, f"{src}.self_attn", params, (*dst, "attn"), tower["num_heads"])
        _layer_norm(pool, f"{src}.layer_norm2", params, (*dst, "norm2"))
        _dense(pool, f"{src}.mlp.fc1", params, (*dst, "mlp", "fc1"))
        _dense(pool, f"{src}.mlp.fc2", params, (*dst, "mlp", "fc2"))


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
    tensors_lib.put(params, (*img, "cls"), (cls + positions[0])[None, None])  # [1, 1, d]
    tensors_lib.put(params, (*img, "pos_embedding", "pos_embedding"), positions[None, 1:])
    _layer_norm(pool, "vision_model.pre_layrnorm", params, (*img, "pre_norm"))
    _encoder(pool, "vision_model", params, img, model.vision)
    _layer_norm(pool, "vision_model.post_layernorm", params, (*img, "encoder", "norm"))

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
    _encoder(pool, "text_model", params, txt, model.text)
    _layer_norm(pool, "text_model.final_layer_norm", params, (*txt, "encoder", "norm"))

    # Projections (bias-free in both) and the temperature.
    for hf, ours in (("visual_projection", "image_proj"), ("text_projection", "text_proj")):
        weight = pool.pop(hf + ".weight")  # [E, d]
        tensors_lib.put(params, (ours, "kernel"), tensors_lib.dense_kernel(weight))
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
