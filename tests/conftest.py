"""Test setup: 8 simulated CPU devices (set before JAX starts) and a tiny shapes dataset."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and every process it starts (pytest
# workers, launchers, sweeps, SLURM jobs inherit the environment): the tests compile the same
# tiny programs again and again (measured: a 4-step shapes_vit:tiny run in a new process
# took 18 s, 7 s with the cache warm). Entries are keyed by the program, so a hit is exact.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="vlmjax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pytest  # noqa: E402

TINY_DATA = dict(image_size=32, num_train=4096, num_heldout=256)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A data dir holding the tiny shapes dataset, built once per test session."""
    from vlmjax.data import shapes

    path = str(tmp_path_factory.mktemp("tfds"))
    shapes.prepare(data_dir=path, **TINY_DATA)
    return path


@pytest.fixture(scope="session")
def shared_references(tmp_path_factory):
    """(kind, spec, options) -> tests/convert/reference.py's output dir, run once per
    distinct arguments per session (the converter parity and round-trip tests share the
    HF folders). Here, not in a tests/convert/conftest.py: tests import `conftest` by name,
    and a second conftest module would shadow this one."""
    import json

    import parity

    parity.python()  # skips without the reference interpreter
    built: dict[str, str] = {}

    def get(kind: str, spec: dict, options: list[str]) -> str:
        key = json.dumps([kind, spec, options], sort_keys=True)
        if key not in built:
            out = str(tmp_path_factory.mktemp(f"reference_{kind}"))
            built[key] = parity.run_reference(kind, spec, out, *options)
        return built[key]

    return get


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


# The longest files (summed test durations measured on the 2-core machine, 2026-12-02) go
# first: pytest-xdist's loadfile scheduling hands each worker one file at a time in
# collection order, and a long file left for last runs alone on one core.
LONG_FIRST = (
    "test_contrastive_accum.py", "test_contrastive.py", "test_train.py", "test_experiments.py",
    "test_slurm.py", "test_multiprocess.py", "convert/test_init_hf.py", "test_faults.py",
    "test_eval_runs.py", "test_captioning.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        names = [f"tests/{name}" for name in LONG_FIRST]
        return names.index(path) if path in names else len(names)

    items.sort(key=rank)  # stable: the order within each file is kept
