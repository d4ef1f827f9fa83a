"""Hugging Face `FuyuForCausalLM` -> `fuyu.FuyuDecoder`.

Checked against transformers 5.24 (tests/convert/make_parity_env.sh pins it), whose
save_pretrained writes the names of the original adept/fuyu-8b checkpoint; the names of
its in-memory modules (`model.language_model.`, `model.vision_embed_tokens`, `lm_head`)
are read too. With L = `language_model.model.layers.{i}`:

    vision_embed_tokens                      -> patch_projection
    language_model.model.embed_tokens        -> token_embedding/embedding
    L.input_layernorm, L.post_attention_layernorm -> layer_{i}/norm1, norm2
    L.self_attn.query_key_value              -> layer_{i}/attn/{query,key,value}
    L.self_attn.{q,k}_layernorm              -> layer_{i}/attn/{q,k}_norm
    L.self_attn.dense                        -> layer_{i}/attn/out
    L.mlp.dense_h_to_4h, L.mlp.dense_4h_to_h -> layer_{i}/mlp/fc1, fc2
    language_model.model.final_layernorm     -> final_norm
    language_model.lm_head                   -> head

Persimmon fuses q, k and v into one Linear whose 3 * width outputs are ordered
(head, q/k/v, head_dim); we keep three projections. A patch is flattened as (row, column,
channel) on both sides, so the patch projection needs no permutation. Inputs for the
converted model come from `vlmjax.data.fuyu_layout.hf_compatible()`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from vlmjax.convert import blocks, writing
from vlmjax.convert import tensors as tensors_lib
from vlmjax.models import fuyu

ARCHITECTURES = ("FuyuForCausalLM",)

# HF hidden_act -> our activation name (transformers' "gelu" is exact, "gelu_new" tanh).
ACTIVATIONS = {
    "relu2": "relu2",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}

# (old checkpoint / save_pretrained, transformers 5 module names)
_PREFIXES = {
    "text": ("language_model.model.", "model.language_model."),
    "head": ("language_model.lm_head.", "lm_head."),
    "vision": ("vision_embed_tokens.", "model.vision_embed_tokens."),
}


def _rope(text: dict[str, Any], config: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from transformers 5 `rope_parameters` or the
    older flat fields. No default theta: FuyuConfig's (10000) is not Persimmon's (25000)."""
    rope = dict(text.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if text.get("rope_scaling") or rope_type != "default":
        raise NotImplementedError(
            f"rope_type={rope_type!r} / rope_scaling={text.get('rope_scaling')!r}: only plain "
            f"rotary embeddings (rope_type 'default') are implemented"
        )
    theta = rope.get("rope_theta", text.get("rope_theta", config.get("rope_theta")))
    if theta is None:
        raise ValueError("config.json has no rope_theta (adept/fuyu-8b uses 25000.0)")
    fraction = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.5))
    return float(theta), float(fraction)


def model_from_config(config: dict[str, Any], **overrides) -> fuyu.FuyuDecoder:
    """Our FuyuDecoder for an HF FuyuConfig (config.json as a dict); errors on what it lacks.

    `overrides` set fields the checkpoint does not determine (dtype, attention, scan, remat,
    dropout). Used fields: patch_size, num_channels and text_config's vocab_size,
    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, head_dim,
    hidden_act, qk_layernorm, layer_norm_eps, rope_parameters (or rope_theta and
    partial_rotary_factor). Old flat configs keep the text fields at the top level.
    """
    text = config.get("text_config") or config
    act = text.get("hidden_act", "relu2")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not one of {sorted(ACTIVATIONS)}")
    width = text.get("hidden_size", 4096)
    heads = text.get("num_attention_heads", 64)
    if width % heads or text.get("head_dim", width // heads) != width // heads:
        raise ValueError(
            f"hidden_size={width}, num_attention_heads={heads}, head_dim={text.get('head_dim')}:"
            f" our attention needs head_dim = hidden_size / num_attention_heads"
        )
    theta, fraction = _rope(text, config)
    allowed = {"dtype", "attention", "scan", "remat", "dropout"}
    if unknown := set(overrides) - allowed:
        raise ValueError(f"overrides {sorted(unknown)} are not among {sorted(allowed)}")
    return fuyu.FuyuDecoder(
        vocab_size=text.get("vocab_size", 262144),
        width=width,
        depth=text.get("num_hidden_layers", 36),
        mlp_dim=text.get("intermediate_size", 16384),
        num_heads=heads,
        patch_size=config.get("patch_size", 30),
        channels=config.get("num_channels", 3),
        activation=ACTIVATIONS[act],
        qk_norm=text.get("qk_layernorm", True),
        rotary_fraction=fraction,
        rope_theta=theta,
        eps=text.get("layer_norm_eps", 1e-5),
        **overrides,
    )


def tied_embeddings(config: dict[str, Any]) -> bool:
    """Whether the LM head is the transposed token embedding.

    transformers writes `tie_word_embeddings` at the top level of a Fuyu config.json and
    reads it from there (FuyuForCausalLM ties on `config.tie_word_embeddings`); its
    `text_config` carries its own, usually false, which it ignores. Old flat configs only
    have the top-level one, so the top level decides whenever it is present.
    """
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return bool((config.get("text_config") or {}).get("tie_word_embeddings", False))


def _dense(pool, hf: str, tree: dict, path: tuple[str, ...], bias: bool = True) -> None:
    tensors_lib.put(tree, (*path, "kernel"), tensors_lib.dense_kernel(pool.pop(hf + ".weight")))
    if bias:
        tensors_lib.put(tree, (*path, "bias"), pool.pop(hf + ".bias"))


def _norm(pool, hf: str, tree: dict, path: tuple[str, ...]) -> None:
    tensors_lib.put(tree, (*path, "scale"), pool.pop(hf + ".weight"))
    tensors_lib.put(tree, (*path, "bias"), pool.pop(hf + ".bias"))


def _attention(pool, hf: str, tree: dict, path: tuple[str, ...], heads: int) -> None:
    weight = pool.pop(hf + ".query_key_value.weight")  # [3 * width, width]
    bias = pool.pop(hf + ".query_key_value.bias")  # [3 * width]
    width = weight.shape[1]
    head_dim = width // heads
    weight = weight.reshape(heads, 3, head_dim, width)  # outputs ordered (head, qkv, dh)
    bias = bias.reshape(heads, 3, head_dim)
    for j, name in enumerate(("query", "key", "value")):
        kernel = np.ascontiguousarray(weight[:, j].transpose(2, 0, 1))  # [width, heads, dh]
        tensors_lib.put(tree, (*path, name, "kernel"), kernel)
        tensors_lib.put(tree, (*path, name, "bias"), np.ascontiguousarray(bias[:, j]))
    out = pool.pop(hf + ".dense.weight")  # [width, heads * dh]
    tensors_lib.put(tree, (*path, "out", "kernel"), out.T.reshape(heads, head_dim, width))
    tensors_lib.put(tree, (*path, "out", "bias"), pool.pop(hf + ".dense.bias"))
    for ours, theirs in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
        if f"{hf}.{theirs}.weight" in pool:
            _norm(pool, f"{hf}.{theirs}", tree, (*path, ours))


def _prefixes(tensors: dict[str, np.ndarray]) -> dict[str, str]:
    legacy = any(name.startswith(_PREFIXES["text"][0]) for name in tensors)
    return {part: names[0 if legacy else 1] for part, names in _PREFIXES.items()}


def variables_from_tensors(
    config: dict[str, Any], tensors: dict[str, np.ndarray], model: fuyu.FuyuDecoder
) -> dict[str, dict]:
    """{"params": ...} of `model` (numpy float32) from the HF state dict `tensors`.

    Raises if a tensor is left over or a Flax leaf is not filled. With `model.scan`, the
    per-layer trees are stacked on a leading axis, as nn.scan stores them.
    """
    pool = tensors_lib.TensorPool(tensors, "HF Fuyu checkpoint")
    prefix = _prefixes(tensors)
    hp = model.hparams()
    params: dict[str, Any] = {}
    text = prefix["text"]

    _dense(pool, prefix["vision"].rstrip("."), params, ("patch_projection",))
    embedding = pool.pop(text + "embed_tokens.weight")  # [vocab, width]
    tensors_lib.put(params, ("token_embedding", "embedding"), embedding)
    layers = []
    for i in range(hp["depth"]):
        hf, layer = f"{text}layers.{i}", {}
        _norm(pool, hf + ".input_layernorm", layer, ("norm1",))
        _attention(pool, hf + ".self_attn", layer, ("attn",), hp["num_heads"])
        _norm(pool, hf + ".post_attention_layernorm", layer, ("norm2",))
        _dense(pool, hf + ".mlp.dense_h_to_4h", layer, ("mlp", "fc1"))
        _dense(pool, hf + ".mlp.dense_4h_to_h", layer, ("mlp", "fc2"))
        layers.append(layer)
    if model.scan:
        params["layers"] = _stack(layers)
    else:
        params.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
    _norm(pool, text + "final_layernorm", params, ("final_norm",))
    head = prefix["head"] + "weight"
    if head in pool:
        _dense(pool, head.removesuffix(".weight"), params, ("head",), bias=False)
    elif tied_embeddings(config):
        tensors_lib.put(params, ("head", "kernel"), np.ascontiguousarray(embedding.T))
    else:
        raise KeyError(
            f"tensor {head!r} not in the checkpoint and the embeddings are not tied "
            f"(tie_word_embeddings is false or absent at the top level of config.json)"
        )

    pool.assert_consumed()
    variables = {"params": params}
    tensors_lib.check_tree(
        variables,
        model,
        jnp.zeros((1, 2), jnp.int32),
        patches=jnp.zeros((1, 2, model.patch_size**2 * model.channels), jnp.float32),
        image_mask=jnp.zeros((1, 2), bool),
    )
    return variables


def _stack(layers: list[dict]) -> dict:
    """[{...leaves}] per layer -> one tree of leaves stacked on axis 0 (nn.scan's layout)."""
    first = layers[0]
    if isinstance(first, dict):
        return {k: _stack([layer[k] for layer in layers]) for k in first}
    return np.stack(layers)


def convert(
    config: dict[str, Any], tensors: dict[str, np.ndarray], **overrides
) -> tuple[fuyu.FuyuDecoder, dict[str, dict]]:
    """(model, {"params"}) from an HF Fuyu config.json and state dict; `overrides` as in
    `model_from_config` (e.g. dtype="bfloat16", scan=True)."""
    model = model_from_config(config, **overrides)
    return model, variables_from_tensors(config, tensors, model)


# --- ours -> HF (convert.to_hf) ------------------------------------------------------

# Our activation -> transformers' hidden_act (one name per function).
_HF_ACTIVATIONS = {
    "relu2": "relu2",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "quick_gelu": "quick_gelu",
}
# FuyuConfig's image_token_id (adept/fuyu-8b's |SPEAKER|); the run's tokenizer may differ:
# pass `hf_config={"image_token_id": ...}` to convert.to_hf.
_IMAGE_TOKEN_ID = 71011


def export(
    model: fuyu.FuyuDecoder, variables: dict
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: array}) of an HF FuyuForCausalLM equal to `model`,
    with the names save_pretrained writes. A head that is exactly the transposed token
    embedding is written tied (tie_word_embeddings, no lm_head tensor), as HF saves it."""
    problems = []
    if model.activation not in _HF_ACTIVATIONS:
        problems.append(f"activation={model.activation!r} (supported: {sorted(_HF_ACTIVATIONS)})")
    blocks.unsupported("FuyuForCausalLM", problems)

    hp = model.hparams()
    leaves = writing.LeafPool(variables)
    out: dict[str, np.ndarray] = {}
    text, heads = _PREFIXES["text"][0], hp["num_heads"]
    blocks.dense_out(leaves, "params/patch_projection", out, _PREFIXES["vision"][0].rstrip("."))
    embedding = leaves.pop("params/token_embedding/embedding")  # [vocab, width]
    writing.put(out, text + "embed_tokens.weight", embedding)
    for i in range(hp["depth"]):
        src, hf = f"params/layer_{i}", f"{text}layers.{i}"
        blocks.norm_out(leaves, f"{src}/norm1", out, hf + ".input_layernorm")
        qkv = [
            (leaves.pop(f"{src}/attn/{n}/kernel"), leaves.pop(f"{src}/attn/{n}/bias"))
            for n in ("query", "key", "value")
        ]  # kernel [width, heads, dh], bias [heads, dh] each
        # Persimmon's fused outputs are ordered (head, q/k/v, dh).
        kernel = np.stack([k for k, _ in qkv], axis=2)  # [width, heads, 3, dh]
        bias = np.stack([b for _, b in qkv], axis=1)  # [heads, 3, dh]
        weight = writing.linear_weight(kernel.reshape(kernel.shape[0], -1))  # [3 width, width]
        writing.put(out, hf + ".self_attn.query_key_value.weight", weight)
        writing.put(out, hf + ".self_attn.query_key_value.bias", bias.reshape(-1))
        dense = leaves.pop(f"{src}/attn/out/kernel")  # [heads, dh, width]
        dense = writing.linear_weight(dense.reshape(-1, dense.shape[-1]))
        writing.put(out, hf + ".self_attn.dense.weight", dense)
        writing.put(out, hf + ".self_attn.dense.bias", leaves.pop(f"{src}/attn/out/bias"))
        if model.qk_norm:
            blocks.norm_out(leaves, f"{src}/attn/q_norm", out, hf + ".self_attn.q_layernorm")
            blocks.norm_out(leaves, f"{src}/attn/k_norm", out, hf + ".self_attn.k_layernorm")
        blocks.norm_out(leaves, f"{src}/norm2", out, hf + ".post_attention_layernorm")
        blocks.dense_out(leaves, f"{src}/mlp/fc1", out, hf + ".mlp.dense_h_to_4h")
        blocks.dense_out(leaves, f"{src}/mlp/fc2", out, hf + ".mlp.dense_4h_to_h")
    blocks.norm_out(leaves, "params/final_norm", out, text + "final_layernorm")
    head = leaves.pop("params/head/kernel")  # [width, vocab]
    tied = bool(np.array_equal(head.T, embedding))
    if not tied:
        writing.put(out, _PREFIXES["head"][0] + "weight", writing.linear_weight(head))
    leaves.assert_consumed()

    config = dict(
        architectures=list(ARCHITECTURES),
        model_type="fuyu",
        patch_size=model.patch_size,
        num_channels=model.channels,
        image_token_id=_IMAGE_TOKEN_ID,
        tie_word_embeddings=tied,
        text_config=dict(
            model_type="persimmon",
            vocab_size=model.vocab_size,
            hidden_size=hp["width"],
            intermediate_size=hp["mlp_dim"],
            num_hidden_layers=hp["depth"],
            num_attention_heads=heads,
            hidden_act=_HF_ACTIVATIONS[model.activation],
            qk_layernorm=model.qk_norm,
            layer_norm_eps=model.eps,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=model.rope_theta,
                partial_rotary_factor=model.rotary_fraction,
            ),
        ),
    )
    return config, out
