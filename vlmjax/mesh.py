"""The device mesh (`data`, `fsdp`, `tensor`) and the one table of logical-axis rules.

Model code names logical axes only (`embed`, `mlp`, `heads`, ...). The rules below map them
to mesh axes, so data parallelism, FSDP and tensor parallelism are choices of mesh shape,
never edits of a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameters use plain names; activations use `act_*` names so that the batch dimension can
# take `fsdp` while parameter `embed` dims also take `fsdp` (a mesh axis may appear only once
# per array).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),
    ("length", None),
    ("classes", None),
    ("patch", None),
    ("conv_in", "fsdp"),  # convolution kernels [kh, kw, in, out]
    ("conv_out", "tensor"),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),  # decoder logits [b, l, vocab]: split like the head's kernel
)


class MeshError(ValueError):
    """A mesh shape or batch size that cannot work on the available devices."""


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one `-1` entry to the remaining devices and checks the product."""
    sizes = [data, fsdp, tensor]
    spec = f"mesh.data={data}, mesh.fsdp={fsdp}, mesh.tensor={tensor}"
    if sizes.count(-1) > 1:
        raise MeshError(f"{spec}: at most one axis may be -1 (all remaining devices)")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"{spec}: axis sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"{spec}: the fixed axes ({known} devices) do not divide the {num_devices} "
                f"available devices; choose sizes whose product divides {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"{spec} needs {math.prod(sizes)} devices but {num_devices} are available; "
            f"make data*fsdp*tensor equal {num_devices} or set one axis to -1"
        )
    return tuple(sizes)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over all (or the given) devices with Auto axis types.

    Auto, not jax's newer Explicit default: Flax linen's logically partitioned init relies
    on sharding constraints being hints, which Explicit axes turn into assertions.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
    """Checks that the global batch splits over the batch axes and processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise MeshError(
            f"batch_size={global_batch} is not divisible by the batch axes "
            f"data*fsdp={shards}; use a multiple of {shards}"
        )
    processes = jax.process_count()
    if global_batch % processes:
        raise MeshError(f"batch_size={global_batch} is not divisible by {processes} processes")
    return global_batch // processes


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data` x `fsdp`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. 10 classes on tensor=4).

    Such a dimension is replicated instead; jit refuses uneven shardings of its outputs.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    while fitted and fitted[-1] is None:  # P(None) and P() mean the same; keep one spelling
        fitted.pop()
    return PartitionSpec(*fitted)


def strip_boxes(tree):
    """Replaces `nn.Partitioned` boxes by their values without adding sharding constraints
    (`nn.meta.unbox` constrains, which fails on abstract values outside jit)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box
    )


def logical_shardings(abstract_boxed, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of (possibly `nn.Partitioned`) abstract values.

    Leaves without logical annotations are replicated. The returned tree matches the
    unboxed tree (boxes replaced by their values).
    """
    logical = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    shapes = strip_boxes(abstract_boxed)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, np.shape(x), mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
