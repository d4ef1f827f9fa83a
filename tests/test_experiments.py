"""Every experiment file builds (each variant it declares), and smoke variants train."""

import glob
import importlib.util
import json
import os

import jax
import pytest

from vlmjax import config as config_lib
from vlmjax import evaluators, tasks, train
from vlmjax.data import text as text_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def _variants(path):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "VARIANTS", ())


CASES = [(p, v) for p in EXPERIMENTS for v in (None, *_variants(p))]


class _PretrainedTokenizer:
    """Stands in for tokenizer files a recipe names but this machine lacks (the model only
    needs the vocabulary size and special ids to initialise)."""

    def __init__(self, text: dict):
        self.vocab_size, self.eos_id = text["vocab_size"], text["eos_id"]
        self.pad_id, self.bos_id = text["pad_id"], text["eos_id"] - 1


@pytest.mark.parametrize(
    "path, variant", CASES, ids=[os.path.basename(p) + (f":{v}" if v else "") for p, v in CASES]
)
def test_experiment_builds(path, variant, request, monkeypatch):
    """Config loads and locks; the model initialises abstractly (no data needed, except the
    captions a word vocabulary is trained on: those come from the tests' tiny shapes)."""
    config = config_lib.load(path + (f":{variant}" if variant else ""))
    spec = config.data.tokenizer
    if spec not in ("word",) and not spec.startswith("sentencepiece:"):
        if not os.path.exists(os.path.expanduser(spec)):
            fake = _PretrainedTokenizer(config.model.text.to_dict())
            monkeypatch.setattr(text_lib, "prepare_tokenizer", lambda *a, **k: fake)
    if config.task != "classification" and config.data.tokenizer == "word":
        from conftest import TINY_DATA

        config_lib.override(config, "data.data_dir", request.getfixturevalue("data_dir"))
        for key in ("num_train", "num_heldout"):
            config_lib.override(config, f"data.{key}", str(TINY_DATA[key]))
    task = tasks.build(config)
    shapes = jax.eval_shape(task.model.init, jax.random.key(0), *task.init_inputs)
    assert jax.tree.leaves(shapes)
    # Every recipe evaluates, and its evaluators' types and keys are valid (their data may
    # not be on this machine: that is checked when a run starts).
    assert config.evals
    for name, settings in config.evals.to_dict().items():
        evaluators.check_settings(name, settings, config)


SMOKE = [(p, "smoke") for p in EXPERIMENTS if "smoke" in _variants(p)]


@pytest.mark.parametrize("path, variant", SMOKE, ids=[os.path.basename(p) for p, _ in SMOKE])
def test_smoke_variant_trains(path, variant, tmp_path, data_dir):
    """The recipe's smoke variant runs end to end on the embedded data (CI's check that the
    full-size recipe's code path works where its dataset is absent)."""
    config = config_lib.load(f"{path}:{variant}")
    config_lib.override(config, "data.data_dir", data_dir)
    metrics = train.train(config, str(tmp_path / "run"))
    scores = [v for k, v in metrics.items() if k.endswith(("/accuracy", "/exact_match"))]
    assert scores and all(0.0 <= v <= 1.0 for v in scores), metrics
    assert os.path.exists(tmp_path / "run" / train.FINAL_METRICS)


def test_shapes_clip_resnet_variant_trains(tmp_path, data_dir):
    """shapes_clip.py:resnet starts, logs FLOPs for its ResNet tower, evaluates and saves
    (it used to stop at its first log step: the FLOPs formula built a ViT from ResNet keys)."""
    from conftest import experiment

    overrides = {
        "total_steps": 3, "log_every": 1, "eval_every": 0, "checkpoint_every": 3,
        "batch_size": 16, "data.num_train": 4096, "data.num_heldout": 256,
        "optimizer.warmup_steps": 1, "evals.fewshot.shots": (1, 2),
        **{f"evals.{name}.max_examples": 32 for name in ("zeroshot", "retrieval", "fewshot")},
    }  # fmt: skip
    config = experiment("shapes_clip.py:resnet", data_dir, overrides)
    workdir = tmp_path / "run"
    metrics = train.train(config, str(workdir))
    assert 0.0 <= metrics["eval/zeroshot/accuracy"] <= 1.0
    with open(workdir / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f if "train/loss" in line]
    assert len(logged) == 3 and all(r["train/tflops_per_device"] > 0 for r in logged)
    assert os.path.exists(workdir / "checkpoints" / "3")
