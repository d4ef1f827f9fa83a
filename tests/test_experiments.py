"""Every experiment file builds (each variant it declares), and smoke variants train."""

import glob
import importlib.util
import os

import jax
import pytest

from vlmjax import config as config_lib
from vlmjax import tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def _variants(path):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "VARIANTS", ())


CASES = [(p, v) for p in EXPERIMENTS for v in (None, *_variants(p))]


@pytest.mark.parametrize(
    "path, variant", CASES, ids=[os.path.basename(p) + (f":{v}" if v else "") for p, v in CASES]
)
def test_experiment_builds(path, variant, request):
    """Config loads and locks; the model initialises abstractly (no data needed, except the
    captions a word vocabulary is trained on: those come from the tests' tiny shapes)."""
    config = config_lib.load(path + (f":{variant}" if variant else ""))
    if config.task == "contrastive" and config.data.tokenizer == "word":
        from conftest import TINY_DATA

        config_lib.override(config, "data.data_dir", request.getfixturevalue("data_dir"))
        for key in ("num_train", "num_heldout"):
            config_lib.override(config, f"data.{key}", str(TINY_DATA[key]))
    task = tasks.get(config.task)
    model = task.build_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *task.init_inputs(config))
    assert jax.tree.leaves(shapes)


SMOKE = [(p, "smoke") for p in EXPERIMENTS if "smoke" in _variants(p)]


@pytest.mark.parametrize("path, variant", SMOKE, ids=[os.path.basename(p) for p, _ in SMOKE])
def test_smoke_variant_trains(path, variant, tmp_path, data_dir):
    """The recipe's smoke variant runs end to end on the embedded data (CI's check that the
    full-size recipe's code path works where its dataset is absent)."""
    config = config_lib.load(f"{path}:{variant}")
    config_lib.override(config, "data.data_dir", data_dir)
    metrics = train.train(config, str(tmp_path / "run"))
    key = "eval/zeroshot_accuracy" if config.task == "contrastive" else "eval/accuracy"
    assert 0.0 <= metrics[key] <= 1.0
    assert os.path.exists(tmp_path / "run" / train.FINAL_METRICS)
