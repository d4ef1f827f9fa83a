"""init_from=hf: into task=classification: a HF ViT classifier and a ResNet (its BatchNorm
statistics too) fill a sharded run's state; a head of another class count stays fresh (and
the log says so), every other array is the converter's, on the run's shardings. And a
SigLIP folder into task=contrastive."""

import logging
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from vlmjax import config as config_lib
from vlmjax import convert, init_hf, tasks, train
from vlmjax import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The specs of test_hf_vit.py / test_hf_resnet.py, so the session's reference folders are shared.
VIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    initializer_range=0.2,
    num_labels=5,
)
RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic")
CASES = {
    "vit": ("vit", VIT, ["--image-size", "32", "--batch", "2"]),
    "resnet": ("resnet", RESNET, ["--image-size", "32", "--batch", "2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_classifier_folder_fills_the_run_with_a_fresh_head(
    case, shared_references, data_dir, caplog
):
    kind, spec, options = CASES[case]
    folder = os.path.join(shared_references(kind, spec, options), "model")
    config = config_lib.load(os.path.join(ROOT, "experiments", "finetune_vit_hf.py:" + folder))
    overrides = {
        "model_name": kind,
        "data.data_dir": data_dir,
        "data.image_size": 32,
        "data.num_train": 4096,
        "data.num_heldout": 256,
        "mesh.fsdp": 2,
    }
    for key, value in overrides.items():
        config_lib.override(config, key, str(value))
    with config.unlocked():
        if kind == "vit":
            config.model.scan = False  # a run option: no contradiction with the folder
        config.optimizer.lr_multipliers = ()
    init_hf.resolve(config)
    train.check_config(config)
    assert config.model.num_classes == 6  # the run's (shapes' kinds), not the folder's

    mesh = mesh_lib.make_mesh(-1, 2, 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        run = train.setup(config, tasks.build(config), mesh)
        fresh = run.init_fn(jax.random.PRNGKey(0))
        with caplog.at_level(logging.INFO, logger="vlmjax"):
            state = train._init_from(config, run, fresh)
    assert "a fresh classifier head (6 classes" in caplog.text
    _, variables = convert.from_hf(folder)
    want = traverse_util.flatten_dict(variables, sep="/")
    got = traverse_util.flatten_dict({"params": state.params, **state.model_state}, sep="/")
    initial = traverse_util.flatten_dict({"params": fresh.params}, sep="/")
    shardings = traverse_util.flatten_dict(
        {"params": run.shardings.params, **run.shardings.model_state}, sep="/"
    )
    head = {k for k in got if k.startswith("params/head/")}
    assert head and got.keys() - head == {k for k in want if not k.startswith("params/head/")}
    for key in got.keys() - head:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)
        assert got[key].sharding == shardings[key], key
    for key in head:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(initial[key]))
    if kind == "resnet":
        assert any(k.startswith("batch_stats/") for k in got.keys() - head)
    # The recipe's EMA restarts at the imported params (its own buffers).
    for ema, param in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ema), np.asarray(param))
        assert ema.sharding == param.sharding


SIGLIP = dict(
    vision_config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
    text_config=dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        vocab_size=100,
        max_position_embeddings=16,
        projection_size=32,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    ),
)  # test_hf_siglip.py's SPEC


class _FolderTokenizer:
    """The ids of the SigLIP reference folder, which saves no tokenizer files."""

    vocab_size, eos_id, pad_id, bos_id = 100, 3, 1, 2


def test_siglip_folder_fills_a_contrastive_run(shared_references, monkeypatch):
    """Both towers, the temperature and the sigmoid bias come from the folder."""
    from vlmjax.data import text as text_lib

    options = ["--image-size", "32", "--batch", "2", "--texts", "3"]
    folder = os.path.join(shared_references("siglip", SIGLIP, options), "model")
    config = config_lib.load(os.path.join(ROOT, "experiments", "lit_from_hf.py:" + folder))
    config_lib.override(config, "loss.kind", "sigmoid")
    init_hf.resolve(config)
    assert config.data.tokenizer == folder and config.model.sigmoid_bias is not None
    monkeypatch.setattr(text_lib, "prepare_tokenizer", lambda *a, **k: _FolderTokenizer())
    mesh = mesh_lib.make_mesh(-1, 2, 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        run = train.setup(config, tasks.build(config), mesh)
        state = train._init_from(config, run, run.init_fn(jax.random.PRNGKey(0)))
    _, variables = convert.from_hf(folder)
    want = traverse_util.flatten_dict(variables["params"], sep="/")
    got = traverse_util.flatten_dict(state.params, sep="/")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)
    assert float(want["bias"]) != -10.0  # the folder's learnt bias, not the init value
