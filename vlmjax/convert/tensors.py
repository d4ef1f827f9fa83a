"""Reading Hugging Face `save_pretrained` folders, and checking what a converter builds.

A converter pops every tensor it uses from a `TensorPool` and writes it into a nested dict
with `put`; `TensorPool.assert_consumed` then fails on any tensor nobody read (a renamed
layer would otherwise be dropped silently) and `check_tree` fails on any Flax leaf nobody
wrote or written with the wrong shape, by comparing against the model's own abstract `init`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from vlmjax import mesh

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"  # large models: {"weight_map": {name: file}}


# safetensors dtype names -> numpy dtypes. safetensors.numpy refuses the ones numpy lacks
# (bfloat16, float8), in which most published LLM checkpoints are stored; ml_dtypes (a JAX
# dependency) has them.
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NOT_IN_NUMPY = ("BF16", "F8_E4M3", "F8_E5M2")


def _safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """(header JSON, byte offset of the data) of a safetensors file: an 8-byte
    little-endian header size, the header, then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: array} of one safetensors file, bfloat16 and float8 tensors included.

    Files whose dtypes numpy has go through safetensors.numpy; the others are memory-mapped
    here and viewed as ml_dtypes arrays (read-only; `TensorPool.pop` copies to float32).
    """
    from safetensors.numpy import load_file  # imported here: only converters need it

    header, start = _safetensors_header(path)
    header.pop("__metadata__", None)
    if not any(info["dtype"] in _NOT_IN_NUMPY for info in header.values()):
        return load_file(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = data[start + begin : start + end]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors


def read_config(path: str) -> dict[str, Any]:
    """config.json of the `save_pretrained` folder `path`, as a dict (no tensors read)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory (expected a save_pretrained folder)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"no config.json in {path!r}: expected a Hugging Face save_pretrained folder"
        )
    with open(config_path) as f:
        return json.load(f)


def read_folder(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: array}) of a `save_pretrained` folder.

    Only safetensors (single file or sharded with an index) are read: pickled
    `pytorch_model.bin` files would need torch here and can run arbitrary code.
    """
    config = read_config(path)

    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        files = [SINGLE_FILE]
    elif os.path.isfile(os.path.join(path, SHARD_INDEX)):
        with open(os.path.join(path, SHARD_INDEX)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        found = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"no {SINGLE_FILE} or {SHARD_INDEX} in {path!r} (found {found}): only safetensors "
            f"checkpoints are read; re-save with save_pretrained(..., safe_serialization=True)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_safetensors(os.path.join(path, name)))
    return config, tensors


class TensorPool:
    """The checkpoint's tensors; `pop` hands each out once, `assert_consumed` checks all went."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str = "checkpoint"):
        self._tensors = dict(tensors)
        self._source = source

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def pop(self, name: str) -> np.ndarray:
        """The tensor `name` as float32 (removed from the pool)."""
        if name not in self._tensors:
            near = sorted(k for k in self._tensors if k.startswith(name.rsplit(".", 1)[0]))
            raise KeyError(
                f"tensor {name!r} not in the {self._source} (or read twice); "
                f"remaining names with its prefix: {near[:8]}"
            )
        return np.asarray(self._tensors.pop(name), np.float32)

    def discard(self, name: str) -> None:
        """Drops `name` if present: for tensors with no Flax counterpart."""
        self._tensors.pop(name, None)

    def assert_consumed(self) -> None:
        if self._tensors:
            left = sorted(self._tensors)
            raise ValueError(
                f"{len(left)} tensors of the {self._source} were not converted (the converter "
                f"does not know them, so the model would silently differ): {left[:12]}"
                + (" ..." if len(left) > 12 else "")
            )


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] (OIHW) -> Flax nn.Conv kernel [kh, kw, in, out]."""
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax nn.Dense kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def put(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
    """tree[path[0]][path[1]]... = value, creating dicts on the way; never overwrites."""
    *parents, leaf = path
    for key in parents:
        tree = tree.setdefault(key, {})
    if leaf in tree:
        raise ValueError(f"Flax leaf {'/'.join(path)} written twice")
    tree[leaf] = value


def check_tree(variables: dict, model: nn.Module, sample_input: jax.ShapeDtypeStruct, **kw):
    """Raises unless `variables` has exactly the leaves and shapes of `model.init`.

    `sample_input` only needs the right rank and channels; `init` runs abstractly
    (`jax.eval_shape`), so this costs no compute even for a large model.
    """
    abstract = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, **kw),
        sample_input,
    )
    expected = {
        jax.tree_util.keystr(p): x.shape
        for p, x in jax.tree_util.tree_leaves_with_path(mesh.strip_boxes(abstract))
    }
    got = {
        jax.tree_util.keystr(p): np.shape(x)
        for p, x in jax.tree_util.tree_leaves_with_path(variables)
    }
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    wrong = sorted(
        f"{k}: converted {got[k]}, model expects {expected[k]}"
        for k in expected.keys() & got.keys()
        if tuple(got[k]) != tuple(expected[k])
    )
    if missing or extra or wrong:
        raise ValueError(
            "converted variables do not match the model: "
            f"Flax leaves not filled {missing[:12]}; leaves the model does not have {extra[:12]}; "
            f"shape mismatches {wrong[:12]}"
        )


def abstract_images(channels: int, size: int = 64) -> jax.ShapeDtypeStruct:
    """An abstract NHWC image batch [1, size, size, channels] for `check_tree`."""
    return jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
