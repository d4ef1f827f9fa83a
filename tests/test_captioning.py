"""The captioning/VQA task: a tiny decoder end to end, packing, jsonl data, generation, and
bad configs."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import experiment
from PIL import Image

from vlmjax import cli, predict, tasks, train
from vlmjax import config as config_lib
from vlmjax import mesh as mesh_lib
from vlmjax.data import fuyu_layout as fl
from vlmjax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "shapes_decoder.py") + ":tiny"


def _config(data_dir, **overrides):
    return experiment("shapes_decoder.py:tiny", data_dir, overrides)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    """The tiny decoder trained once (300 steps of 32 examples on 8 devices)."""
    config = _config(data_dir)
    workdir = str(tmp_path_factory.mktemp("decoder") / "run")
    return config, workdir, train.train(config, workdir)


def test_tiny_decoder_answers_far_above_the_majority_baseline(tiny_run):
    config, workdir, metrics = tiny_run
    # Always answering the most frequent train answer ("1", normalised from "one") is right
    # on 19 of the 256 held-out questions; one answer per question type would reach ~0.33.
    assert metrics["eval/vqa/majority_baseline"] == pytest.approx(19 / 256)
    assert metrics["eval/vqa/count"] == 256
    assert metrics["eval/vqa/exact_match"] > 0.4, metrics
    novel, seen = metrics["eval/vqa/exact_match_novel"], metrics["eval/vqa/exact_match_seen"]
    assert novel > 0.35 and seen > 0.35
    assert metrics["eval/caption/token_accuracy"] > 0.6, metrics
    assert 1.0 < metrics["eval/caption/perplexity"] < 3.0, metrics
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_records = [r for r in records if "train/loss" in r]
    assert train_records[-1]["train/loss"] < train_records[0]["train/loss"] - 0.5
    # 32 examples of 26-35 tokens in 24 rows of 64 tokens.
    assert all(0.5 < r["train/packing_efficiency"] < 0.75 for r in train_records)
    # The word vocabulary covers captions, questions and answers, saved beside the data and
    # kept in the workdir.
    name = "word_tokenizer_caption+question+answer.json"
    directory = shapes.dataset_dir(config.data.data_dir, 32, 4096, 256)
    assert os.path.exists(os.path.join(directory, name))
    assert os.path.exists(os.path.join(workdir, name))


def test_generate_command_on_any_image_size(tiny_run, tmp_path, capsys):
    """`vlmjax generate` answers for an image whose sides are not multiples of the patch
    size, as the model does in-process on the same (padded) image."""
    config, workdir, _ = tiny_run
    example = shapes.split_example("heldout", 0, 32)
    image = np.asarray(Image.fromarray(example["image"]).resize((45, 37)))  # 37 x 45 pixels
    path = str(tmp_path / "picture.png")
    Image.fromarray(image).save(path)
    question = example["question"].capitalize()
    assert cli.main(["generate", "--workdir", workdir, "--image", path, "--prompt", question]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    expected = predict.generate_from_workdir(config, workdir, image, question, max_new_tokens=32)
    assert printed == expected
    answers = set(shapes.COLOURS + shapes.KINDS + shapes.SIZES + shapes.RELATIONS)
    answers |= {"yes", "no", "one", "two"}
    assert printed in answers, printed
    # Sampling runs too (any temperature, top-k), and an empty prompt asks for a caption.
    argv = ["generate", "--workdir", workdir, "--image", path, "--temperature", "0.7"]
    assert cli.main([*argv, "--top_k", "3", "--max_new_tokens", "12"]) == 0
    assert capsys.readouterr().out.strip().startswith("a ")


def _tiny_model_and_params(config):
    """The tiny model with random parameters (numpy: compiling the jitted init takes ~8 s on
    CPU, mostly its random-number kernels), larger than the init scale so that attending
    to another segment would show in the outputs."""
    task = tasks.build(config)
    model = task.model
    abstract = jax.eval_shape(model.init, jax.random.key(0), *task.init_inputs)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: rng.normal(0.0, 0.2, x.shape).astype(x.dtype), nn.meta.unbox(abstract)["params"]
    )
    return task, params


def test_packed_and_unpacked_give_each_example_the_same_loss(data_dir):
    """Through the task's loss: every example's mean target NLL is the same alone in a row
    as packed with others (segments never attend to each other, positions restart)."""
    config = _config(data_dir)
    task, params = _tiny_model_and_params(config)
    ds = task.train_dataset(0, 1, 0)
    spec = task.prepared.layout
    # The examples of the first batch, recovered from its packed rows.
    packed = next(iter(ds))
    sequences = []
    for row in range(packed["tokens"].shape[0]):
        for segment in range(1, packed["segment_ids"][row].max() + 1):
            keep = packed["segment_ids"][row] == segment
            sequences.append({k: packed[k][row][keep] for k in fl.BATCH_KEYS if k != "segment_ids"})
    assert len(sequences) == config.batch_size
    unpacked = {
        k: np.concatenate([fl.pack([s], 64, 1, spec.tokens.pad)[k] for s in sequences])
        for k in fl.BATCH_KEYS
    }

    @jax.jit
    def losses(batch, masks):
        """(each example's loss, the batch loss, metrics): each example's loss is the task's
        loss with the loss mask kept on that example's segment only (vmapped over the masks;
        the logits do not depend on them, so they are computed once)."""

        def loss(mask):
            batch_ = {**batch, "loss_mask": mask}
            return task.loss_fn(params, {}, batch_, jax.random.key(0))

        total, (metrics, _) = loss(batch["loss_mask"])
        return jax.vmap(lambda m: loss(m)[0])(masks), total, metrics

    def per_segment_masks(batch):
        segments = batch["segment_ids"]  # [R, T]
        rows = np.arange(len(segments))[:, None]
        return np.stack(
            [
                batch["loss_mask"] * ((rows == r) & (segments == s))
                for r in range(len(segments))
                for s in range(1, segments[r].max() + 1)
            ]
        )

    each_packed, total_packed, metrics = losses(packed, per_segment_masks(packed))
    each_unpacked, total_unpacked, _ = losses(unpacked, per_segment_masks(unpacked))
    np.testing.assert_allclose(each_packed, each_unpacked, rtol=2e-5)
    np.testing.assert_allclose(total_packed, total_unpacked, rtol=2e-5)
    assert float(metrics["packing_efficiency"]) == pytest.approx(fl.efficiency(packed))
    assert fl.efficiency(packed) > fl.efficiency(unpacked) + 0.1


def test_data_position_gives_the_same_batches(data_dir):
    """Batch k of a stream started at 0 equals batch 0 of one started at k * batch_size;
    two processes together take the same examples as one."""
    config = _config(data_dir)
    task = tasks.build(config)
    first = task.train_dataset(0, 1, 0)
    batches = [b for _, b in zip(range(3), iter(first), strict=False)]
    resumed = next(iter(task.train_dataset(0, 1, 2 * config.batch_size)))
    for key in fl.BATCH_KEYS:
        np.testing.assert_array_equal(resumed[key], batches[2][key])
    assert any(not np.array_equal(batches[0]["tokens"], b["tokens"]) for b in batches[1:])
    halves = [next(iter(task.train_dataset(i, 2, 0))) for i in range(2)]
    assert all(h["tokens"].shape == (12, 64) for h in halves)

    def segments(batch):  # the multiset of example token sequences of a batch
        rows = range(batch["tokens"].shape[0])
        return sorted(
            tuple(batch["tokens"][r][batch["segment_ids"][r] == s])
            for r in rows
            for s in range(1, batch["segment_ids"][r].max() + 1)
        )

    assert sorted(segments(halves[0]) + segments(halves[1])) == segments(batches[0])


def _write_jsonl(folder, name, n, seed):
    """n shapes scenes, resized to assorted sizes, as PNG files + a prompt/target jsonl:
    a third are captions (empty prompt), the rest questions."""
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    path = os.path.join(folder, f"{name}.jsonl")
    sizes = [(32, 32), (45, 37), (20, 48), (64, 40)]  # (width, height); 64 is downscaled
    with open(path, "w") as f:
        for i in range(n):
            ex = shapes.split_example("train", seed + i, 32)
            image = Image.fromarray(ex["image"]).resize(sizes[i % len(sizes)])
            file = f"img/{name}_{i}.png"
            image.save(os.path.join(folder, file))
            if i % 3 == 0:
                record = {"image": file, "prompt": "", "target": ex["caption"]}
            else:
                record = {"image": file, "prompt": ex["question"], "target": ex["answer"]}
            f.write(json.dumps(record) + "\n")
    return path


def test_train_on_jsonl_prompts_and_targets(tmp_path):
    """Own data with no code: image/prompt/target lines, images of any size."""
    train_path = _write_jsonl(str(tmp_path), "train", 96, seed=0)
    eval_path = _write_jsonl(str(tmp_path), "val", 16, seed=1000)
    config = config_lib.load(TINY)
    overrides = {
        "data.source": f"jsonl:{train_path}",
        "evals": f"{{'val': {{'type': 'captioning', 'source': 'jsonl:{eval_path}'}}, "
        f"'val_qa': {{'type': 'vqa', 'source': 'jsonl:{eval_path}'}}}}",
        "data.max_image_size": 48,
        "data.seq_len": 96,
        "data.pack_rows": 16,
        "total_steps": 30,
        "log_every": 5,
        "eval_every": 30,
        "checkpoint_every": 30,
        "optimizer.warmup_steps": 5,
    }
    for key, value in overrides.items():
        config_lib.override(config, key, str(value))
    workdir = str(tmp_path / "run")
    metrics = train.train(config, workdir)
    assert set(metrics) == {
        "eval/val/token_accuracy",
        "eval/val/loss",
        "eval/val/perplexity",
        "eval/val_qa/exact_match",
        "eval/val_qa/count",
    }
    assert metrics["eval/val_qa/count"] == 16
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
    assert losses[-1] < losses[0] - 0.5, losses


def test_bad_captioning_configs(data_dir):
    config = _config(data_dir)
    config.unlock()
    config.model.widht = 3
    with pytest.raises(config_lib.ConfigError, match="model.widht"):
        tasks.build(config)
    with pytest.raises(config_lib.ConfigError, match="model_name='vit'"):
        tasks.build(_config(data_dir, model_name="vit"))
    config = _config(data_dir)
    config.unlock()
    config.model.vocab_size = 10
    with pytest.raises(config_lib.ConfigError, match="vocab_size=10 is smaller"):
        tasks.build(config)
    with pytest.raises(config_lib.ConfigError, match="caption_fraction"):
        tasks.build(_config(data_dir, **{"data.caption_fraction": 1.5}))
    # FuyuProcessor's layout needs its tokens in the vocabulary (a word vocabulary has none).
    with pytest.raises(config_lib.ConfigError, match=r"needs '\|SPEAKER\|' in the tokenizer"):
        tasks.build(_config(data_dir, **{"data.special_tokens": "fuyu"}))
    with pytest.raises(config_lib.ConfigError, match="special_tokens='hf' must be one of"):
        tasks.build(_config(data_dir, **{"data.special_tokens": "hf"}))
    # 32 examples of >= 26 tokens cannot fit 8 rows of 64.
    small = tasks.build(_config(data_dir, **{"data.pack_rows": 8}))
    with pytest.raises(ValueError, match=r"cannot pack 32 examples .* into 8 rows of 64"):
        next(iter(small.train_dataset(0, 1, 0)))
    # Rows must split over the batch shards: 20 rows become 24 on 8 devices (padding only).
    uneven = tasks.build(_config(data_dir, **{"data.pack_rows": 20}))
    with jax.set_mesh(mesh_lib.make_mesh(8, 1, 1)):
        assert next(iter(uneven.train_dataset(0, 1, 0)))["tokens"].shape == (24, 64)
    with jax.set_mesh(mesh_lib.make_mesh(4, 1, 1, devices=jax.devices()[:4])):
        assert next(iter(uneven.train_dataset(0, 1, 0)))["tokens"].shape == (20, 64)
    short = tasks.build(_config(data_dir, **{"data.seq_len": 24}))
    with pytest.raises(ValueError, match="does not fit seq_len=24"):
        next(iter(short.train_dataset(0, 1, 0)))
