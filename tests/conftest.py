"""Test setup: 8 simulated CPU devices (set before JAX starts) and a tiny shapes dataset."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

TINY_DATA = dict(image_size=32, num_train=4096, num_heldout=256)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A data dir holding the tiny shapes dataset, built once per test session."""
    from vlmjax.data import shapes

    path = str(tmp_path_factory.mktemp("tfds"))
    shapes.prepare(data_dir=path, **TINY_DATA)
    return path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str, data_dir: str, overrides: dict | None = None):
    """experiments/`name` (e.g. "shapes_clip.py:tiny") reading `data_dir`, with {"a.b": value}
    overrides applied as the command line would."""
    from vlmjax import config as config_lib

    config = config_lib.load(os.path.join(ROOT, "experiments", name))
    config_lib.override(config, "data.data_dir", data_dir)
    for key, value in (overrides or {}).items():
        config_lib.override(config, key, str(value))
    return config


@pytest.fixture
def tiny_config(data_dir):
    """Factory: experiments/shapes_vit.py:tiny on the test data, with {"a.b": value} overrides."""
    return lambda overrides=None: experiment("shapes_vit.py:tiny", data_dir, overrides)
