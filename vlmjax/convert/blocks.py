"""Tensor mappings shared by the HF transformer families, in both directions.

Importers read HF tensors from a `tensors.TensorPool` into a nested Flax dict; exporters
read Flax leaves from a `writing.LeafPool` into a {HF name: array} dict. Each pair below
is exact both ways (transposes and reshapes only), which the round-trip tests check bitwise.

Attention: torch's q/k/v Linear weight [h * dh, d] is our HeadsProjection kernel
[d, h, dh] (the feature axis splits head-major), its bias [h * dh] our [h, dh]; the output
Linear weight [d, h * dh] is our HeadsMerge kernel [h, dh, d].
"""

from __future__ import annotations

import numpy as np

from vlmjax.convert import tensors as tensors_lib
from vlmjax.convert import writing

Path = tuple[str, ...]

# Our q/k/v/out submodule names in layers.MultiHeadAttention.
ATTENTION = ("query", "key", "value", "out")
# HF CLIP/SigLIP names: T.encoder.layers.{i}.{layer_norm1, self_attn.*_proj, layer_norm2, mlp}
CLIP_BLOCK = dict(
    norm1="layer_norm1",
    norm2="layer_norm2",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    out="self_attn.out_proj",
)


# HF config fields of a transformer tower's sizes -> our module fields.
SIZES = dict(
    hidden_size="width", num_hidden_layers="depth", intermediate_size="mlp_dim",
    num_attention_heads="num_heads",
)  # fmt: skip


def sizes_in(config: dict) -> dict[str, int]:
    """{width, depth, mlp_dim, num_heads} of an HF tower config (CLIP, SigLIP, ViT)."""
    return {ours: config[hf] for hf, ours in SIZES.items()}


def sizes_out(tower) -> dict[str, int]:
    """The HF config fields of a tower's sizes (`tower`: a dict or module with them)."""
    get = tower.get if isinstance(tower, dict) else lambda k: getattr(tower, k)
    return {hf: get(ours) for hf, ours in SIZES.items()}


# --- HF -> ours ---------------------------------------------------------------------


def dense_in(pool: tensors_lib.TensorPool, hf: str, params: dict, path: Path, bias=True) -> None:
    tensors_lib.put(params, (*path, "kernel"), tensors_lib.dense_kernel(pool.pop(hf + ".weight")))
    if bias:
        tensors_lib.put(params, (*path, "bias"), pool.pop(hf + ".bias"))


def norm_in(pool: tensors_lib.TensorPool, hf: str, params: dict, path: Path) -> None:
    tensors_lib.put(params, (*path, "scale"), pool.pop(hf + ".weight"))
    tensors_lib.put(params, (*path, "bias"), pool.pop(hf + ".bias"))


def heads_in(weight: np.ndarray, bias: np.ndarray, num_heads: int) -> tuple[np.ndarray, ...]:
    """torch q/k/v Linear (weight [h * dh, d], bias [h * dh]) -> our (kernel [d, h, dh],
    bias [h, dh])."""
    kernel = weight.T.reshape(weight.shape[1], num_heads, -1)  # [d, h, dh]
    return np.ascontiguousarray(kernel), bias.reshape(num_heads, -1)


def attention_in(
    pool: tensors_lib.TensorPool,
    names: dict[str, str],
    params: dict,
    path: Path,
    num_heads: int,
    qkv_bias: bool = True,
) -> None:
    """Separate q/k/v/out Linears named names["query"], ... (no ".weight") -> our attention.
    Without `qkv_bias` (HF ViT's qkv_bias=False) the q/k/v biases are zeros."""
    for ours in ATTENTION[:3]:
        weight = pool.pop(names[ours] + ".weight")  # [h * dh, d]
        if qkv_bias:
            bias = pool.pop(names[ours] + ".bias")
        else:
            bias = np.zeros(weight.shape[0], np.float32)
        kernel, bias = heads_in(weight, bias, num_heads)
        tensors_lib.put(params, (*path, ours, "kernel"), kernel)
        tensors_lib.put(params, (*path, ours, "bias"), bias)
    weight = pool.pop(names["out"] + ".weight")  # [d, h * dh]
    kernel = weight.T.reshape(num_heads, -1, weight.shape[0])  # [h, dh, d]
    tensors_lib.put(params, (*path, "out", "kernel"), np.ascontiguousarray(kernel))
    tensors_lib.put(params, (*path, "out", "bias"), pool.pop(names["out"] + ".bias"))


def encoder_in(
    pool: tensors_lib.TensorPool,
    layer: str,
    params: dict,
    path: Path,
    depth: int,
    num_heads: int,
    names: dict[str, str] = CLIP_BLOCK,
    qkv_bias: bool = True,
) -> None:
    """`depth` pre-LN blocks `layer.format(i)` + "." + names[...] -> path/encoder/layer_{i}."""
    for i in range(depth):
        src, dst = layer.format(i), (*path, "encoder", f"layer_{i}")
        norm_in(pool, f"{src}.{names['norm1']}", params, (*dst, "norm1"))
        attention = {k: f"{src}.{names[k]}" for k in ATTENTION}
        attention_in(pool, attention, params, (*dst, "attn"), num_heads, qkv_bias)
        norm_in(pool, f"{src}.{names['norm2']}", params, (*dst, "norm2"))
        dense_in(pool, f"{src}.{names['fc1']}", params, (*dst, "mlp", "fc1"))
        dense_in(pool, f"{src}.{names['fc2']}", params, (*dst, "mlp", "fc2"))


# --- ours -> HF ---------------------------------------------------------------------


def dense_out(leaves: writing.LeafPool, path: str, out: dict, hf: str, bias=True) -> None:
    writing.put(out, hf + ".weight", writing.linear_weight(leaves.pop(path + "/kernel")))
    if bias:
        writing.put(out, hf + ".bias", leaves.pop(path + "/bias"))


def norm_out(leaves: writing.LeafPool, path: str, out: dict, hf: str) -> None:
    writing.put(out, hf + ".weight", leaves.pop(path + "/scale"))
    writing.put(out, hf + ".bias", leaves.pop(path + "/bias"))


def heads_out(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [d, h, dh], bias [h, dh]) -> torch (weight [h * dh, d], bias [h * dh])."""
    return writing.linear_weight(kernel.reshape(kernel.shape[0], -1)), bias.reshape(-1)


def attention_out(leaves: writing.LeafPool, path: str, out: dict, names: dict[str, str]) -> None:
    for ours in ATTENTION[:3]:
        kernel, bias = leaves.pop(f"{path}/{ours}/kernel"), leaves.pop(f"{path}/{ours}/bias")
        weight, bias = heads_out(kernel, bias)
        writing.put(out, names[ours] + ".weight", weight)
        writing.put(out, names[ours] + ".bias", bias)
    kernel = leaves.pop(f"{path}/out/kernel")  # [h, dh, d]
    weight = writing.linear_weight(kernel.reshape(-1, kernel.shape[-1]))  # [d, h * dh]
    writing.put(out, names["out"] + ".weight", weight)
    writing.put(out, names["out"] + ".bias", leaves.pop(f"{path}/out/bias"))


def encoder_out(
    leaves: writing.LeafPool,
    path: str,
    out: dict,
    layer: str,
    depth: int,
    names: dict[str, str] = CLIP_BLOCK,
) -> None:
    """path/encoder/layer_{i} -> `layer.format(i)` + "." + names[...] (inverse of encoder_in)."""
    for i in range(depth):
        src, dst = f"{path}/encoder/layer_{i}", layer.format(i)
        norm_out(leaves, f"{src}/norm1", out, f"{dst}.{names['norm1']}")
        attention_out(leaves, f"{src}/attn", out, {k: f"{dst}.{names[k]}" for k in ATTENTION})
        norm_out(leaves, f"{src}/norm2", out, f"{dst}.{names['norm2']}")
        dense_out(leaves, f"{src}/mlp/fc1", out, f"{dst}.{names['fc1']}")
        dense_out(leaves, f"{src}/mlp/fc2", out, f"{dst}.{names['fc2']}")


def unsupported(family: str, problems: list[str]) -> None:
    """Raises one ValueError listing every option the HF class cannot express."""
    if problems:
        raise ValueError(
            f"cannot export to {family}: " + "; ".join(problems) + " (nothing was written)"
        )
