"""init_from=hf: a Fuyu folder (FuyuForCausalLM and its tokenizer, as tests/convert/reference.py
saves them) into task=captioning, against transformers:

  * the run lays examples out with the folder's tokenizer exactly as FuyuProcessor does
    (data.special_tokens="fuyu"), its sharded params are the converter's, and its model
    gives transformers' logits on the processor's inputs;
  * fine-tuned for 2 steps and exported, the folder loads in FuyuForCausalLM, whose
    teacher-forced loss on the run's examples is the run's own `captioning` evaluation.
"""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import parity
import pytest
import test_hf_fuyu
from flax import traverse_util

from vlmjax import config as config_lib
from vlmjax import convert, export, init_hf, tasks, train
from vlmjax import mesh as mesh_lib
from vlmjax.data import fuyu_layout as fl
from vlmjax.data import jsonl
from vlmjax.models import fuyu
from vlmjax.tasks import captioning

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASE = "persimmon"  # test_hf_fuyu.py's case: canvas 16 x 24, patch 4, vocabulary 64
TARGETS = ["w5 w6", "w7", "w1 w2 w3", "w4", "w9", "w11 w12", "w0", "w3 w8"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(shared_references, tmp_path_factory):
    """(folder, io.npz of the reference, jsonl of 8 records over its images)."""
    out = shared_references("fuyu", *test_hf_fuyu.arguments(CASE))
    io = dict(np.load(os.path.join(out, "io.npz")))
    if str(io["processor"]) != "transformers":
        pytest.skip("the parity Python has no Pillow, which FuyuProcessor needs")
    from PIL import Image

    root = tmp_path_factory.mktemp("fuyu_records")
    count = sum(1 for k in io if k.startswith("image_"))
    lines = []
    for i, target in enumerate(TARGETS):
        Image.fromarray(io[f"image_{i % count}"]).save(root / f"{i}.png")
        prompt = str(io["prompts"][i % count])
        lines.append(json.dumps({"image": str(root / f"{i}.png"), "prompt": prompt,
                                 "target": target}))  # fmt: skip
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return os.path.join(out, "model"), io, str(root / "records.jsonl")


def _config(folder: str, records: str, **overrides):
    config = config_lib.load(os.path.join(ROOT, "experiments", "finetune_fuyu_hf.py:" + folder))
    settings = {
        "data.source": f"jsonl:{records}",
        "data.max_image_size": 0,  # the test images' own sizes
        "data.seq_len": 64,
        "data.pack_rows": 8,
        "dtype": "float32",
        "batch_size": 8,
        "eval_batch_size": 8,
        "model.remat": "none",
        **overrides,
    }
    for key, value in settings.items():
        config_lib.override(config, key, str(value))
    with config.unlocked():
        config.evals = ml_collections.ConfigDict({"caption": dict(type="captioning", split="")})
    return config


def test_fuyu_folder_fills_a_captioning_run_laid_out_as_fuyu_processor(reference):
    folder, io, records = reference
    config = _config(folder, records)
    init_hf.resolve(config)
    assert config.data.tokenizer == folder and config.data.special_tokens == "fuyu"
    assert config.model.vocab_size == 64 and config.model.width == 32
    train.check_config(config)

    mesh = mesh_lib.make_mesh(-1, 2, 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config)
        run = train.setup(config, task, mesh)
        state = train._init_from(config, run, run.init_fn(jax.random.PRNGKey(0)))
    spec, tok = task.prepared.layout, task.prepared.tokenizer
    # reference.py's vocabulary: <s>=1 </s>=2 <0x04>=3 |SPEAKER|=4 |NEWLINE|=5.
    assert spec.tokens == fl.Tokens(image=4, newline=5, bos=1, eos=2, pad=2, boa=3)

    _, variables = convert.from_hf(folder)
    want = traverse_util.flatten_dict(variables["params"], sep="/")
    got = traverse_util.flatten_dict(state.params, sep="/")
    shardings = traverse_util.flatten_dict(run.shardings.params, sep="/")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)
        assert got[key].sharding == shardings[key], key

    # The processor's examples (the 30 x 20 image is the one it downscales to its canvas).
    canvas = test_hf_fuyu.CASES[CASE]["canvas"]
    seqs, kept = [], []
    for i in range(sum(1 for k in io if k.startswith("image_"))):
        image = io[f"image_{i}"]
        if image.shape[0] > canvas[0] or image.shape[1] > canvas[1]:
            continue
        seq = fl.layout(image, captioning.text_ids(tok, str(io["prompts"][i])), None, spec)
        np.testing.assert_array_equal(seq["tokens"], io[f"input_ids_{i}"], err_msg=f"ex {i}")
        np.testing.assert_array_equal(seq["patches"][seq["image_mask"]], io[f"pixel_values_{i}"])
        seqs.append(seq)
        kept.append(i)
    assert len(kept) == 4
    batch = fl.pack(seqs, seq_len=sum(len(s["tokens"]) for s in seqs), num_rows=1)
    params = jax.device_get(state.params)
    logits = np.asarray(jax.jit(task.model.apply)({"params": params}, **fuyu.model_inputs(batch)))
    worst = max(
        float(np.abs(logits[0][batch["segment_ids"][0] == n + 1] - io[f"logits_{i}"]).max())
        for n, i in enumerate(kept)
    )
    print(f"run's model vs transformers on FuyuProcessor's inputs: max abs logit diff {worst:.2e}")
    assert worst <= TOLERANCE


def _hf_loss(logits: list[np.ndarray], seqs: list[dict]) -> float:
    """Mean next-token NLL over the target tokens (and EOS) of every example, as the
    captioning evaluator sums it."""
    nll, count = 0.0, 0
    for z, seq in zip(logits, seqs, strict=True):
        z = z.astype(np.float64)
        log_p = z - z.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        at = seq["loss_mask"] > 0
        nll -= log_p[at, seq["targets"][at]].sum()
        count += int(at.sum())
    return nll / count


def test_finetuned_fuyu_exports_to_transformers_with_the_runs_loss(reference, tmp_path):
    folder, _, records = reference
    config = _config(
        folder, records, total_steps=2, eval_every=2, checkpoint_every=2, log_every=1,
        **{"optimizer.warmup_steps": 1, "optimizer.learning_rate": 0.01,
           "mesh.data": 2, "mesh.fsdp": 4},
    )  # fmt: skip
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        final = [r for r in map(json.loads, f) if "eval/caption/loss" in r][-1]
    assert final["step"] == 2

    out = str(tmp_path / "exported")
    step, notes = export.export(config_lib.load_workdir(workdir), workdir, out)
    assert step == 2 and {"tokenizer.json", "preprocessor_config.json"} <= set(notes)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["image_token_id"] == 4  # the tokenizer's |SPEAKER|

    # Each record laid out by the run's own task, run through FuyuForCausalLM loaded from
    # the export and from the folder the run started from.
    task = tasks.build(config_lib.load_workdir(workdir), workdir)
    spec = task.prepared.layout
    seqs, folders = [], []
    source = jsonl.JsonlSource(records, required=captioning.RECORD_FIELDS)
    for i in range(len(source)):
        record = source[i]
        prompt, target = (
            captioning.text_ids(task.prepared.tokenizer, t)
            for t in captioning.record_texts(record, captioning.RECORD_FIELDS)
        )
        seq = fl.layout(captioning.record_image(record, "image"), prompt, target, spec)
        seqs.append(seq)
        for name, model_dir in (("exported", out), ("imported", folder)):
            entry = tmp_path / f"{name}_{i}"
            entry.mkdir()
            os.symlink(model_dir, entry / "model")
            np.savez(
                entry / "inputs.npz",
                input_ids=seq["tokens"][None].astype(np.int64),
                pixel_values=seq["patches"][seq["image_mask"]],
            )
            folders.append(dict(dir=str(entry), **{"class": "FuyuForCausalLM"}))  # fmt: skip
    # And FuyuProcessor built from the export's tokenizer and preprocessor files.
    with open(records) as f:
        listed = [json.loads(line) for line in f]
    processor = dict(folder=out, images=[r["image"] for r in listed],
                     prompts=[r["prompt"] for r in listed], out=str(tmp_path))  # fmt: skip
    spec_load = dict(folders=folders, fuyu_processor=processor)
    parity.run_reference("load", spec_load, str(tmp_path))
    theirs = dict(np.load(tmp_path / "processor.npz"))
    for i in range(len(seqs)):
        prompt_only = fl.layout(
            captioning.record_image(source[i], "image"),
            captioning.text_ids(task.prepared.tokenizer, listed[i]["prompt"]),
            None,
            spec,
        )
        np.testing.assert_array_equal(prompt_only["tokens"], theirs[f"input_ids_{i}"])
        np.testing.assert_array_equal(
            prompt_only["patches"][prompt_only["image_mask"]], theirs[f"pixel_values_{i}"]
        )
    info = json.loads((tmp_path / "exported_0" / "loading_info.json").read_text())
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors

    def hf_loss(name: str) -> float:
        logits = [np.load(tmp_path / f"{name}_{i}" / "outputs.npz")["logits"][0]
                  for i in range(len(seqs))]  # fmt: skip
        return _hf_loss(logits, seqs)

    exported, imported = hf_loss("exported"), hf_loss("imported")
    print(f"loss: run's eval {final['eval/caption/loss']:.6f}, transformers on the export "
          f"{exported:.6f}, on the folder it started from {imported:.6f}")  # fmt: skip
    assert exported == pytest.approx(final["eval/caption/loss"], abs=TOLERANCE)
    assert exported < imported - 0.05  # the 2 steps trained on these records


def test_image_token_id_must_be_the_tokenizers_speaker(reference, tmp_path):
    import shutil

    folder, _, records = reference
    copy = str(tmp_path / "folder")
    shutil.copytree(folder, copy)
    with open(os.path.join(copy, "config.json")) as f:
        hf_config = json.load(f)
    hf_config["image_token_id"] = 5
    with open(os.path.join(copy, "config.json"), "w") as f:
        json.dump(hf_config, f)
    with pytest.raises(config_lib.ConfigError, match=r"image_token_id=5 but its tokenizer's"):
        init_hf.resolve(_config(copy, records))
