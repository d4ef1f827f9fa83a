import jax
import pytest
from jax.sharding import PartitionSpec as P

from vlmjax import mesh as mesh_lib


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((2, -1, 1), (2, 4, 1)),
        ((2, 2, -1), (2, 2, 2)),
        ((1, 8, 1), (1, 8, 1)),
    ],
)
def test_mesh_shape_resolves_minus_one(sizes, expected):
    assert mesh_lib.mesh_shape(*sizes, num_devices=8) == expected


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, 1, 1), "needs 3 devices but 8 are available"),
        ((-1, -1, 1), "at most one axis may be -1"),
        ((3, -1, 1), "do not divide the 8"),
        ((0, 1, 1), "positive or -1"),
    ],
)
def test_bad_mesh_shapes_are_clear_errors(sizes, message):
    with pytest.raises(mesh_lib.MeshError, match=message):
        mesh_lib.mesh_shape(*sizes, num_devices=8)


def test_make_mesh_uses_all_devices_and_auto_axes():
    assert jax.device_count() == 8  # conftest's simulated devices
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_indivisible_batch_is_clear_error():
    mesh = mesh_lib.make_mesh(data=2, fsdp=4, tensor=1)
    assert mesh_lib.batch_size_per_process(64, mesh) == 64
    with pytest.raises(mesh_lib.MeshError, match="not divisible by the batch axes data\\*fsdp=8"):
        mesh_lib.batch_size_per_process(60, mesh)


def test_logical_shardings_follow_rules_and_fall_back_when_indivisible():
    import flax.linen as nn
    import jax.numpy as jnp

    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(
                16, kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp"))
            )(x)
            return nn.Dense(
                6,
                kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp", "classes")),
            )(x)

    mesh = mesh_lib.make_mesh(data=1, fsdp=2, tensor=4)
    boxed = jax.eval_shape(Toy().init, jax.random.key(0), jnp.ones((1, 8)))
    shardings = mesh_lib.logical_shardings(boxed, mesh)["params"]
    assert shardings["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["Dense_0"]["bias"].spec == P()  # not annotated -> replicated
    assert shardings["Dense_1"]["kernel"].spec == P("tensor")
    # 3 input features cannot split over fsdp=8: that dimension is replicated instead.
    mesh = mesh_lib.make_mesh(data=1, fsdp=8, tensor=1)
    boxed = jax.eval_shape(Toy().init, jax.random.key(0), jnp.ones((1, 3)))
    kernel = mesh_lib.logical_shardings(boxed, mesh)["params"]["Dense_0"]["kernel"]
    assert kernel.spec == P(None, "tensor")  # tensor has size 1 here


def test_fit_drops_axes_that_do_not_divide():
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh_lib._fit(P(("data", "fsdp"), "tensor"), (6, 3), mesh) == P("data")
    assert mesh_lib._fit(P(("data", "fsdp")), (8, 5), mesh) == P(("data", "fsdp"))
