"""The contrastive task: CLIP training end to end, sharded steps, jsonl data, bad configs."""

import json
import os
import pickle

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import experiment
from PIL import Image

from vlmjax import cli, optim, tasks, train
from vlmjax import config as config_lib
from vlmjax import mesh as mesh_lib
from vlmjax.data import jsonl, shapes
from vlmjax.data import text as text_lib
from vlmjax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_TINY = os.path.join(ROOT, "experiments", "shapes_clip.py") + ":tiny"


def _config(data_dir, **overrides):
    return experiment("shapes_clip.py:tiny", data_dir, overrides)


def _run_steps(config, mesh, batches):
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        run = train.setup(config, tasks.build(config), mesh)
        state = run.init_fn(jax.random.PRNGKey(config.seed))
        metrics = []
        for host_batch in batches:
            batch = {k: jax.device_put(v, run.batch_sharding) for k, v in host_batch.items()}
            state, m = run.train_step(state, batch)
            metrics.append(jax.device_get(m))
        return jax.device_get(state.params), metrics


@pytest.mark.parametrize(
    "kind, impl, shape",
    # (Every kind x impl x mesh is checked at the loss level in test_losses.py.)
    [("softmax", "all_gather", (2, 2, 2)), ("sigmoid", "chunked", (2, 4, 1))],
)
def test_sharded_clip_step_equals_single_device(data_dir, kind, impl, shape):
    """Two CLIP steps on 8 devices equal the same steps on 1, for each loss and impl: the
    loss sees the whole global batch, not each device's rows."""
    overrides = {"loss.kind": kind, "loss.impl": impl, "batch_size": 16}
    if kind == "sigmoid":
        overrides.update({"model.sigmoid_bias": -10.0, "model.init_temperature": 0.1})
    config = _config(data_dir, **overrides)
    task = tasks.build(config)
    batches = [task.fake_batch(16) for _ in range(2)]
    batches[1] = {k: v[::-1].copy() for k, v in batches[1].items()}  # a different batch
    one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ref_params, ref_metrics = _run_steps(config, one, batches)
    params, metrics = _run_steps(config, mesh_lib.make_mesh(*shape), batches)
    for m, r in zip(metrics, ref_metrics, strict=True):
        np.testing.assert_allclose(m["train/loss"], r["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(m["train/temperature"], r["train/temperature"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert ref_metrics[0]["train/temperature"] == pytest.approx(
        0.1 if kind == "sigmoid" else 0.07, rel=1e-5
    )
    if kind == "sigmoid":
        assert "train/bias" in ref_metrics[0]


@pytest.mark.parametrize("impl", ["tiled"])  # (every impl: tests/test_contrastive_accum.py)
def test_accumulated_step_keeps_the_full_batch_loss(data_dir, impl):
    """grad_accum_steps=4 through the train loop: the same loss and update as one step over
    the whole batch (every pair's negatives), on 8 devices; the old per-micro-batch average
    of 4 losses over B/4 pairs each would differ."""
    overrides = {"batch_size": 32, "loss.impl": impl, "loss.tile": 3}
    batches = [tasks.build(_config(data_dir, **overrides)).fake_batch(32)]
    mesh = mesh_lib.make_mesh(2, 4, 1)
    ref_params, ref_metrics = _run_steps(_config(data_dir, **overrides), mesh, batches)
    accumulated = _config(data_dir, **overrides, **{"optimizer.grad_accum_steps": 4})
    params, metrics = _run_steps(accumulated, mesh, batches)
    np.testing.assert_allclose(metrics[0]["train/loss"], ref_metrics[0]["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics[0]["train/grad_norm"], ref_metrics[0]["train/grad_norm"],
                               rtol=1e-4)  # fmt: skip
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_resnet_image_tower_step_equals_single_device(data_dir):
    """CLIP with a ResNet image tower: BatchNorm statistics over the global batch, kept in
    model_state, the same on 8 devices as on 1."""
    config = _config(data_dir, **{"model.image_model": "resnet", "batch_size": 16})
    config.unlock()
    config.model.vision = dict(
        stage_sizes=(1, 1), width=8, block="basic", stem_kernel=3, stem_stride=1,
        stem_pool=False,
    )  # fmt: skip
    batches = [tasks.build(config).fake_batch(16)]
    one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])

    def run(mesh):
        with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
            setup = train.setup(config, tasks.build(config), mesh)
            state = setup.init_fn(jax.random.PRNGKey(0))
            batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in batches[0].items()}
            state, metrics = setup.train_step(state, batch)
            return jax.device_get((state.params, state.model_state, metrics["train/loss"]))

    params, stats, loss = run(mesh_lib.make_mesh(8, 1, 1))
    ref_params, ref_stats, ref_loss = run(one)
    assert "batch_stats" in stats
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_temperature_and_bias_are_not_decayed(data_dir):
    config = _config(data_dir, **{"model.sigmoid_bias": -10.0})
    task = tasks.build(config)
    shapes_ = jax.eval_shape(task.model.init, jax.random.key(0), *task.init_inputs)
    params = nn.meta.unbox(shapes_["params"])
    mask = optim.weight_decay_mask(params, config.optimizer.wd_params, False)
    assert mask["log_scale"] is False and mask["bias"] is False
    assert mask["image_proj"]["kernel"] is True and mask["text_proj"]["kernel"] is True
    assert mask["text_tower"]["encoder"]["layer_0"]["norm1"]["scale"] is False


def test_shapes_clip_learns_zero_shot_and_retrieval(data_dir, tmp_path):
    """The tiny CLIP run: retrieval far above chance, zero-shot metrics consistent; `vlmjax
    eval` on the checkpoint gives the same numbers. (300 steps learn colours, not yet the
    shape kinds the zero-shot labels are: the full run's figures are in BENCHMARKS.md.)"""
    config = _config(data_dir)
    workdir = str(tmp_path / "clip")
    metrics = train.train(config, workdir)
    # Overall zero-shot accuracy is the count-weighted mean of the novel and seen halves.
    with_novel = [
        r for r in (shapes.split_example("heldout", i, 32) for i in range(256)) if r["novel"]
    ]
    frac = len(with_novel) / 256
    assert metrics["eval/zeroshot/accuracy"] == pytest.approx(
        frac * metrics["eval/zeroshot/accuracy_novel"]
        + (1 - frac) * metrics["eval/zeroshot/accuracy_seen"],
        abs=1e-6,
    )
    assert metrics["eval/zeroshot/count"] == 256
    # 256 held-out pairs; chance recall@5 is about 5/256 even counting duplicate captions.
    r = "eval/retrieval/"
    assert metrics[r + "i2t_recall@5"] > 0.2 and metrics[r + "t2i_recall@5"] > 0.2, metrics
    assert metrics[r + "images"] == metrics[r + "captions"] == 256
    # Linear probes of the kind on the frozen image embeddings (at chance here, as zero-shot
    # is: these steps learn colours first; the probe itself is tested in test_evaluators.py).
    f = "eval/fewshot/"
    assert {f + f"{k}shot_accuracy" for k in (1, 5, 10, 25)} <= set(metrics), metrics
    assert metrics[f + "count"] == 256
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert all(0.0 < r["train/temperature"] < 1.0 for r in records if "train/temperature" in r)
    assert all(r["train/tflops_per_device"] > 0 for r in records if "train/loss" in r)
    step, again = train.evaluate_checkpoint(config_lib.load_workdir(workdir), workdir)
    assert step == config.total_steps
    for key, value in metrics.items():
        assert again[key] == pytest.approx(value, abs=1e-6), key
    # An eval-only file replaces the run's evaluators: the first 64 held-out scenes.
    evals = os.path.join(ROOT, "experiments", "evals", "shapes_heldout.py") + ":quick"
    assert cli.main(["eval", "--workdir", workdir, "--evals", evals]) == 0
    with open(os.path.join(workdir, f"eval_{step}.json")) as f:
        quick = json.load(f)["metrics"]
    assert quick["eval/zeroshot/count"] == quick["eval/retrieval/images"] == 64
    assert {"eval/fewshot/1shot_accuracy", "eval/fewshot/10shot_accuracy"} <= set(quick)
    # The word vocabulary was trained once on the captions and saved beside the data.
    saved = os.path.join(shapes.dataset_dir(data_dir, 32, 4096, 256), "word_tokenizer_caption.json")
    assert os.path.exists(saved)


def _write_jsonl(folder, split, n, fields=("caption",)):
    """n shapes scenes as PNG files plus a jsonl file listing them."""
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    path = os.path.join(folder, f"{split}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            ex = shapes.split_example("train" if split == "train" else "heldout", i, 32)
            name = f"img/{split}_{i}.png"
            Image.fromarray(ex["image"]).save(os.path.join(folder, name))
            record = {"image": name, **{k: ex[k] for k in fields}}
            f.write(json.dumps(record) + "\n")
    return path


def test_jsonl_source_reads_and_checks(tmp_path):
    path = _write_jsonl(str(tmp_path), "train", 3)
    source = jsonl.JsonlSource(path, required=("caption",))
    assert len(source) == 3
    record = source[1]
    expected = shapes.split_example("train", 1, 32)
    np.testing.assert_array_equal(record["image"], expected["image"])  # PNG is lossless
    assert record["caption"] == expected["caption"]
    assert source.field("caption")[2] == shapes.split_example("train", 2, 32)["caption"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "img/train_0.png", "caption": "a"}\n{"image": "x.png"}\n')
    # Lines are checked when read (training skips and counts them: tests/data/test_jsonl.py).
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field\(s\) \['caption'\]"):
        jsonl.JsonlSource(str(bad), required=("caption",))[1]
    bad.write_text('{"image": "img/train_0.png", "caption": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        jsonl.JsonlSource(str(bad))[1]
    bad.write_text('{"image": "missing.png", "caption": "a"}\n')
    with pytest.raises(ValueError, match="no image file"):
        jsonl.JsonlSource(str(bad))[0]


def test_train_on_jsonl_captions(tmp_path):
    """Own image-text data with no code: a jsonl train file and a jsonl eval file."""
    train_path = _write_jsonl(str(tmp_path), "train", 256)
    eval_path = _write_jsonl(str(tmp_path), "val", 64)
    config = config_lib.load(CLIP_TINY)
    for key, value in {
        "data.source": f"jsonl:{train_path}",
        "evals": f"{{'val': {{'type': 'retrieval', 'source': 'jsonl:{eval_path}'}}}}",
        "total_steps": 40,
        "eval_every": 40,
        "log_every": 10,
        "batch_size": 32,
        "eval_batch_size": 32,
    }.items():
        config_lib.override(config, key, str(value))
    workdir = str(tmp_path / "run")
    metrics = train.train(config, workdir)
    assert metrics["eval/val/images"] == 64
    assert metrics["eval/val/i2t_recall@10"] > 10 / 64, metrics
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
    assert losses[-1] < losses[0]

    # The word vocabulary trained at the start is kept in the workdir: after the captions
    # change, `vlmjax eval` still tokenizes with it and reproduces the run's final metrics.
    kept = os.path.join(workdir, "word_tokenizer_caption.json")
    vocab = tokenizer_lib.WordTokenizer.load(kept)
    with open(train_path) as f:
        records = [json.loads(line) for line in f]
    with open(train_path, "w") as f:
        for r in records:
            f.write(json.dumps({**r, "caption": "zebra " + r["caption"][::-1]}) + "\n")
    retrained = text_lib.prepare_tokenizer(config.data)  # outside a run: trained afresh
    assert "zebra" in retrained.tokens and "zebra" not in vocab.tokens
    _, again = train.evaluate_checkpoint(config, workdir)
    assert again == pytest.approx(metrics, abs=1e-6)
    assert text_lib.prepare_tokenizer(config.data, workdir=workdir) == vocab


def test_captions_from_labels_and_templates(data_dir):
    config = _config(data_dir, **{"data.caption_key": "", "data.templates": "a {} | the {} !"})
    record = {"label": np.int64(2)}
    names = list(shapes.KINDS)
    assert text_lib.captions_of(record, config.data, names) == ["a triangle", "the triangle !"]
    with pytest.raises(ValueError, match="exactly one"):
        text_lib.templates("no placeholder")
    nested = _config(data_dir, **{"data.caption_key": "captions/text"})
    record = {"captions": {"text": np.array([b"one", b"two"], dtype=object)}}
    assert text_lib.captions_of(record, nested.data, None) == ["one", "two"]


def test_bad_contrastive_configs(data_dir):
    with pytest.raises(config_lib.ConfigError, match="sigmoid_bias"):
        tasks.build(_config(data_dir, **{"loss.kind": "sigmoid"}))
    config = _config(data_dir)
    config.unlock()
    config.model.vision.widht = 3
    with pytest.raises(config_lib.ConfigError, match="model.vision.widht"):
        tasks.build(config)
    with pytest.raises(ValueError, match="valid impls"):
        tasks.build(_config(data_dir, **{"loss.impl": "ring"}))
    config = _config(data_dir)
    config.unlock()
    config.model.text.vocab_size = 5
    config.model.text.eos_id = 2
    config.model.text.pad_id = 0
    with pytest.raises(config_lib.ConfigError, match="smaller than the tokenizer"):
        tasks.build(config)
    config = _config(data_dir, **{"data.source": "jsonl:/nonexistent.jsonl"})
    with pytest.raises(FileNotFoundError, match="no JSON Lines file"):
        tasks.build(config)


def test_sentencepiece_tokenizer_trained_on_captions(data_dir):
    """data.tokenizer="sentencepiece:N": the pipeline's tokens decode to the data's
    captions, the text tower's vocabulary follows the model, and a step trains on them."""
    config = _config(data_dir, **{"data.tokenizer": "sentencepiece:64", "batch_size": 16})
    task = tasks.build(config)
    tok = task.prepared.tokenizer
    assert type(tok).__name__ == "SentencePieceTokenizer"
    assert pickle.loads(pickle.dumps(tok)) == tok  # data workers may receive a copy
    batch = next(iter(task.train_dataset(0, 1, 0)))
    length = task.prepared.context_length
    encoded = tok.encode(list(text_lib._train_captions(config.data)), length)
    tokens = batch["tokens"]
    assert tokens.shape == (16, length) and (tokens[:, 0] == tok.bos_id).all()
    assert {tuple(row) for row in tokens.tolist()} <= {tuple(row) for row in encoded.tolist()}
    assert task.model.text["vocab_size"] == tok.vocab_size
    one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, (metrics,) = _run_steps(config, one, [{"image": batch["image"], "tokens": tokens}])
    assert np.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
