"""Writing Hugging Face `save_pretrained` folders from our variables (the exporters' side).

An exporter pops every Flax leaf it maps from a `LeafPool` and fills a {HF name: array}
dict with `put`; `LeafPool.assert_consumed` then fails on any leaf nobody wrote out (a
parameter the HF class has no place for would otherwise be dropped silently). Scanned
layers (`.../layers/...` stacked on a leading axis by nn.scan) are read as the unscanned
`layer_{i}` leaves, so exporters handle one layout. Slicing and transposing are exact:
exported tensors are bitwise our parameters, rearranged.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np

from vlmjax import mesh
from vlmjax.convert import tensors as tensors_lib

# numpy dtype -> safetensors dtype name (the inverse of tensors.SAFETENSORS_DTYPES).
_NAMES = {np.dtype(v): k for k, v in tensors_lib.SAFETENSORS_DTYPES.items()}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


class LeafPool:
    """Our variables as {"collection/module/.../leaf": numpy array}; `pop` hands each out once.

    `variables` is a model's {"params": ..., "batch_stats": ...} tree (numpy or jax arrays,
    `nn.Partitioned` boxes allowed). Stacked scan layers are split into `layer_{i}` leaves.
    """

    def __init__(self, variables: dict, source: str = "vlmjax variables"):
        flat = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(mesh.strip_boxes(variables)):
            flat[tuple(_key_name(k) for k in path)] = np.asarray(leaf)
        self._leaves: dict[str, np.ndarray] = {}
        for path, leaf in flat.items():
            if "layers" in path:
                # nn.scan's layout: .../layers/<leaf> [depth, ...] -> .../layer_{i}/<leaf>
                at = path.index("layers")
                for i in range(leaf.shape[0]):
                    name = (*path[:at], f"layer_{i}", *path[at + 1 :])
                    self._leaves["/".join(name)] = leaf[i]
            else:
                self._leaves["/".join(path)] = leaf
        self._source = source

    def __contains__(self, path: str) -> bool:
        return path in self._leaves

    def pop(self, path: str) -> np.ndarray:
        """The leaf at "collection/module/.../name" (removed from the pool)."""
        if path not in self._leaves:
            parent = path.rsplit("/", 1)[0]
            near = sorted(k for k in self._leaves if k.startswith(parent))
            raise KeyError(
                f"Flax leaf {path!r} not in the {self._source} (or read twice); "
                f"remaining leaves with its prefix: {near[:8]}"
            )
        return self._leaves.pop(path)

    def assert_consumed(self) -> None:
        if self._leaves:
            left = sorted(self._leaves)
            raise ValueError(
                f"{len(left)} leaves of the {self._source} have no place in the HF model "
                f"(exporting would silently drop them): {left[:12]}"
                + (" ..." if len(left) > 12 else "")
            )


def contiguous(value: np.ndarray) -> np.ndarray:
    """`value` in C order, 0-d arrays kept 0-d (np.ascontiguousarray makes them [1])."""
    value = np.asarray(value)
    return value if value.flags.c_contiguous else value.copy(order="C")


def put(tensors: dict[str, np.ndarray], name: str, value: np.ndarray) -> None:
    """tensors[name] = value (contiguous); never overwrites."""
    if name in tensors:
        raise ValueError(f"HF tensor {name!r} written twice")
    tensors[name] = contiguous(value)


def linear_weight(kernel: np.ndarray) -> np.ndarray:
    """Flax nn.Dense kernel [in, out] -> torch Linear weight [out, in]."""
    return contiguous(kernel.T)


def conv_weight(kernel: np.ndarray) -> np.ndarray:
    """Flax nn.Conv kernel [kh, kw, in, out] -> torch Conv2d weight [out, in, kh, kw]."""
    return contiguous(np.transpose(kernel, (3, 2, 0, 1)))


def save_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of `tensors` (any dtype of tensors.SAFETENSORS_DTYPES, bfloat16
    included, which safetensors.numpy cannot write), with the {"format": "pt"} metadata
    transformers checks for. The header is padded to 8 bytes, as the safetensors library
    writes it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        array = contiguous(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, not one safetensors has")
        data = array.tobytes()  # little-endian on every platform JAX runs on
        header[name] = dict(
            dtype=_NAMES[array.dtype],
            shape=list(array.shape),
            data_offsets=[offset, offset + len(data)],
        )
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


def cast(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Floating tensors in `dtype` ("float32", "bfloat16", "float16"); others unchanged."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    target = np.dtype(EXPORT_DTYPES[dtype])
    # (np.issubdtype misses ml_dtypes' bfloat16 and float8, hence the names.)
    floats = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
    return {
        k: v.astype(target) if _NAMES.get(np.dtype(v.dtype)) in floats else v
        for k, v in tensors.items()
    }


def write_folder(
    out_dir: str, config: dict[str, Any], tensors: dict[str, np.ndarray], dtype: str = "float32"
) -> None:
    """out_dir/config.json and out_dir/model.safetensors (creating out_dir).

    `config` gets "dtype" (what transformers 5 writes; the tensors' dtype) and
    "transformers_version" is left out (we do not know which version reads it).
    """
    tensors = cast(tensors, dtype)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, "dtype": dtype}, f, indent=2, sort_keys=True)
        f.write("\n")
    save_safetensors(os.path.join(out_dir, tensors_lib.SINGLE_FILE), tensors)
