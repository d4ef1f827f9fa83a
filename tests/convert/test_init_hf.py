"""init_from=hf:FOLDER against transformers: a tiny CLIP folder as CLIPProcessor saves it
(tokenizer.json, processor config with OpenAI's mean/std, bicubic, resize 36 crop 32)
imported into a sharded contrastive run gives, through the zero-shot evaluator's own data
path on a jsonl set of non-square PNGs, the embeddings of CLIPModel + CLIPProcessor.

The reference runs tests/convert/reference_pipeline.py under $VLMJAX_PARITY_PYTHON (skipped
without it, as the other parity tests)."""

import json
import os
import subprocess

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import parity
import pytest

from vlmjax import config as config_lib
from vlmjax import evaluators, init_hf, tasks, train
from vlmjax import mesh as mesh_lib
from vlmjax.data import shapes
from vlmjax.evaluators import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
REFERENCE = os.path.join(HERE, "reference_pipeline.py")
TOLERANCE = 1e-4
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
CLASSES = ["circle", "square", "triangle"]
SIZES = [(45, 61), (80, 40), (33, 70), (64, 64), (36, 50), (50, 36), (70, 90), (40, 41)] * 2
# [h, w] of the labelled PNGs, mostly non-square
TEMPLATES = "a photo of a {}.|a large {}"
CLIP = dict(
    projection_dim=16,
    vision_config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    ),
    text_config=dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        max_position_embeddings=16,
    ),
)


def run_reference(kind: str, spec: dict, out: str) -> str:
    command = [parity.python(), REFERENCE, kind, json.dumps(spec), out]
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE)
    assert done.returncode == 0, f"reference_pipeline.py {kind} failed:\n{done.stderr[-3000:]}"
    return out


def corpus() -> list[str]:
    """Texts the BPE is trained on: shapes captions' words and the prompts here."""
    words = [*shapes.COLOURS, *shapes.KINDS, *CLASSES]
    lines = [f"a large {c} {k}" for c in shapes.COLOURS for k in shapes.KINDS]
    return lines + [f"a photo of a {w}." for w in words] + ["a small left right above below"]


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> str:
    """A tiny CLIP save_pretrained folder with its tokenizer and image processor."""
    out = str(tmp_path_factory.mktemp("hf_clip_folder"))
    spec = dict(
        clip=CLIP,
        corpus=corpus(),
        vocab_size=600,
        processor=dict(shortest_edge=36, crop=32, mean=OPENAI_MEAN, std=OPENAI_STD, resample=3),
    )
    return os.path.join(run_reference("folder", spec, out), "model")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, clip_folder):
    """(jsonl path, HF outputs) for PNGs of several sizes and the prompts of CLASSES."""
    from PIL import Image

    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    lines, paths = [], []
    for i, (h, w) in enumerate(SIZES):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[: h // 2] //= 3  # some structure, so resizing filters differ visibly
        Image.fromarray(image).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
        lines.append(json.dumps({"image": f"{i}.png", "label": i % len(CLASSES)}))
    (root / "set.jsonl").write_text("\n".join(lines) + "\n")
    prompts = [t.format(n) for n in CLASSES for t in TEMPLATES.split("|")]
    spec = dict(folder=clip_folder, images=paths, texts=prompts)
    out = run_reference("embed", spec, str(root / "ref"))
    return str(root / "set.jsonl"), dict(np.load(os.path.join(out, "io.npz"))), prompts


def _config(folder: str, jsonl: str):
    config = config_lib.load(os.path.join(ROOT, "experiments", "lit_from_hf.py") + ":" + folder)
    for key, value in {
        "data.source": f"jsonl:{jsonl}",
        "data.templates": TEMPLATES,
        "mesh.data": 2,
        "mesh.fsdp": 4,
    }.items():
        config_lib.override(config, key, str(value))
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(
            {"zs": dict(type="zeroshot", split="train", class_names=CLASSES, batch_size=4)}
        )
    return config


def test_zeroshot_embeddings_equal_transformers(clip_folder, labelled):
    jsonl, ref, prompts = labelled
    config = _config(clip_folder, jsonl)
    init_hf.resolve(config)
    # The preprocessing came from the folder's processor config.
    assert tuple(config.data.mean) == pytest.approx(OPENAI_MEAN)
    assert tuple(config.data.std) == pytest.approx(OPENAI_STD)
    assert config.data.interpolation == "bicubic"
    assert config.data.eval_crop_fraction == pytest.approx(32 / 36)
    assert config.data.image_size == 32 and config.data.tokenizer == clip_folder
    assert config.model.vision.width == 32 and config.model.text.width == 24
    train.check_config(config)

    mesh = mesh_lib.make_mesh(2, 4, 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config)
        run = train.setup(config, task, mesh)
        state = train._init_from(config, run, run.init_fn(jax.random.PRNGKey(0)))
        # Loaded shard by shard: the token table is split over fsdp, as the rules say.
        table = state.params["text_tower"]["token_embedding"]["embedding"]
        assert table.sharding == run.shardings.params["text_tower"]["token_embedding"]["embedding"]
        assert table.addressable_shards[0].data.size < table.size
        (zs,) = evaluators.build(config, task, mesh)
        ev = zs.evaluator
        variables = common.variables(state)
        count = common.num_examples(ev.source, 0)
        fetch = common.labelled_fetch(ev.data, ev.source, ev.label_key)
        images = ev.embed_images(variables, common.batches(count, fetch, ev.rows))["z"]
        texts = ev.embed_texts(
            variables,
            common.batches(len(prompts), lambda i: {"tokens": ev.prompt_tokens[i]}, ev.rows),
        )["z"]
        metrics = ev.run(state)

    # The same token ids up to each row's EOS (what the EOS-pooled text tower reads).
    eos = int(config.model.text.eos_id)
    for ours, theirs in zip(ev.prompt_tokens, ref["input_ids"], strict=True):
        end = list(theirs).index(eos) + 1
        np.testing.assert_array_equal(ours[:end], theirs[:end])
    image_diff = np.abs(images - ref["image_embeds"]).max()
    text_diff = np.abs(texts - ref["text_embeds"]).max()
    print(f"max abs diff: image embeds {image_diff:.2e}, text embeds {text_diff:.2e}")
    assert images.shape == ref["image_embeds"].shape == (len(SIZES), 16)
    assert image_diff <= TOLERANCE and text_diff <= TOLERANCE
    # The evaluator's accuracy is transformers' embeddings' zero-shot accuracy.
    assert metrics["accuracy"] == pytest.approx(hf_zero_shot_accuracy(ref))


def hf_zero_shot_accuracy(ref: dict) -> float:
    """Zero-shot accuracy from transformers' embeddings: each class the normalised mean of
    its prompts' embeddings, as the evaluator does."""
    z = ref["text_embeds"].reshape(len(CLASSES), len(TEMPLATES.split("|")), -1)
    classifier = (z / np.linalg.norm(z, axis=-1, keepdims=True)).mean(1)
    classifier /= np.linalg.norm(classifier, axis=-1, keepdims=True)
    labels = np.arange(len(SIZES)) % len(CLASSES)
    return float(((ref["image_embeds"] @ classifier.T).argmax(1) == labels).mean())


def test_contradicting_config_is_an_error_naming_both_values(clip_folder, labelled):
    jsonl, _, _ = labelled
    config = _config(clip_folder, jsonl)
    config_lib.override(config, "data.interpolation", "bilinear")  # the default: filled in
    with config.unlocked():
        config.model.embed_dim = 64
        config.model.vision = ml_collections.ConfigDict(dict(width=48, scan=False))
    config_lib.override(config, "data.std", "(0.2, 0.2, 0.2)")
    with pytest.raises(config_lib.ConfigError) as e:
        init_hf.resolve(config)
    message = str(e.value)
    assert "model.embed_dim=64 but the folder's model has 16" in message
    assert "model.vision.width=48 but the folder's model has 32" in message
    assert "data.std=(0.2, 0.2, 0.2)" in message and "0.26862954" in message
    assert "scan" not in message and "interpolation" not in message  # run options: no conflict

    wrong_task = _config(clip_folder, jsonl)
    config_lib.override(wrong_task, "task", "classification")
    with pytest.raises(config_lib.ConfigError, match="task='classification' but the folder"):
        init_hf.resolve(wrong_task)
    wrong_size = _config(clip_folder, jsonl)
    config_lib.override(wrong_size, "data.image_size", "64")
    with pytest.raises(config_lib.ConfigError, match="data.image_size=64 but .* crops to 32"):
        init_hf.resolve(wrong_size)
    missing = _config(clip_folder + "_missing", jsonl)
    with pytest.raises(config_lib.ConfigError, match="is not a directory"):
        init_hf.resolve(missing)


def _embeddings(config, state_fn, prompts):
    """(image embeddings [n, E], prompt embeddings [t, E], log_scale) of the state
    `state_fn(run, config)` through the zero-shot evaluator of `config`."""
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config)
        run = train.setup(config, task, mesh)
        state = state_fn(run, config)
        (zs,) = evaluators.build(config, task, mesh)
        ev, variables = zs.evaluator, common.variables(state)
        fetch = common.labelled_fetch(ev.data, ev.source, ev.label_key)
        count = common.num_examples(ev.source, ev.data.max_examples)
        images = ev.embed_images(variables, common.batches(count, fetch, ev.rows))["z"]
        rows = common.batches(len(prompts), lambda i: {"tokens": ev.prompt_tokens[i]}, ev.rows)
        texts = ev.embed_texts(variables, rows)["z"]
        return images, texts, float(np.asarray(variables["params"]["log_scale"]))


def test_finetune_from_folder_and_export_match_transformers(
    clip_folder, labelled, data_dir, tmp_path
):
    """LiT from the folder on `shapes`: the first evaluation (step 1, learning rate 0 in
    warmup) is the imported model's zero-shot (transformers' on the same PNGs); stopped
    there and resumed after the folder's weights changed, it continues from its own
    checkpoint; after step 2 (with an EMA) `vlmjax export` writes a folder whose CLIPModel
    + CLIPProcessor give our eval's embeddings and logits."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from vlmjax import cli, convert, export

    folder = str(tmp_path / "folder")  # a copy: its weights are replaced below
    shutil.copytree(clip_folder, folder)
    config = config_lib.load(os.path.join(ROOT, "experiments", "lit_from_hf.py:" + folder))
    for key, value in {
        "data.data_dir": data_dir,
        "data.num_train": 4096,
        "data.num_heldout": 256,
        "batch_size": 16,
        "total_steps": 2,
        "log_every": 1,
        "eval_every": 1,
        "checkpoint_every": 2,
        "optimizer.warmup_steps": 1,
        "optimizer.learning_rate": 0.05,
        "optimizer.ema_decay": 0.5,
    }.items():
        config_lib.override(config, key, str(value))
    jsonl, reference, prompts = labelled
    zs = dict(
        type="zeroshot", source=f"jsonl:{jsonl}", split="train", class_names=CLASSES,
        templates=TEMPLATES, batch_size=8,
    )  # fmt: skip
    with config.unlocked():
        config.evals = ml_collections.ConfigDict({"zs": zs})
    workdir = str(tmp_path / "run")
    train.train(config, workdir, stop_at=1)
    # The folder's weights change; the resumed run must continue from its own step 1.
    weights = os.path.join(folder, "model.safetensors")
    save_file({k: np.asarray(v + 1.0) for k, v in load_file(weights).items()}, weights)
    train.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = next(r for r in map(json.loads, f) if "eval/zs/accuracy" in r)
    # The imported model's zero-shot on the labelled set, as transformers computes it.
    assert first["step"] == 1
    assert first["eval/zs/accuracy"] == pytest.approx(hf_zero_shot_accuracy(reference))

    # Export (the CLI path) and compare with transformers on the labelled PNGs.
    out = str(tmp_path / "exported")
    assert cli.main(["export", "--workdir", workdir, "--out", out]) == 0
    written = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= written
    assert "tokenizer.json" in written  # copied from the folder the run started from
    paths = [os.path.join(os.path.dirname(jsonl), f"{i}.png") for i in range(len(SIZES))]
    spec = dict(folder=out, images=paths, texts=prompts)
    ref_dir = run_reference("embed", spec, str(tmp_path / "ref_export"))
    theirs = dict(np.load(os.path.join(ref_dir, "io.npz")))
    evaluated = config_lib.load_workdir(workdir)  # its evals read the labelled PNGs

    def restored(run, cfg):
        from vlmjax import checkpoint

        mngr = checkpoint.manager(workdir, max_to_keep=None)
        state = checkpoint.restore(mngr, checkpoint.abstract(run.abstract, run.shardings))
        mngr.close()
        gaps = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state.ema, state.params)
        assert max(jax.tree.leaves(gaps)) > 1e-3  # the EMA is what both sides evaluate
        # The locked image tower is still the imported one, not the changed folder's.
        imported = convert.from_hf(clip_folder)[1]["params"]["image_tower"]
        for got, want in zip(
            jax.tree.leaves(state.params["image_tower"]), jax.tree.leaves(imported), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(got), want)
        return state

    images, texts, log_scale = _embeddings(evaluated, restored, prompts)
    logits = np.exp(log_scale) * images @ texts.T
    diffs = {
        "image_embeds": np.abs(images - theirs["image_embeds"]).max(),
        "text_embeds": np.abs(texts - theirs["text_embeds"]).max(),
        "logits_per_image": np.abs(logits - theirs["logits_per_image"]).max(),
    }
    print("exported run vs transformers, max abs diff:", diffs)
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
    assert np.abs(theirs["logits_per_image"]).max() > 1.0
    assert export.preprocessor_config(evaluated.data)["resample"] == 3  # bicubic kept
