"""HF CLIPModel -> clip.CLIP: embeddings and logits parity with transformers, clear errors.

The parity tests run tests/convert/reference.py under $VLMJAX_PARITY_PYTHON (see
tests/convert/make_parity_env.sh), or under this interpreter if it has torch and
transformers; otherwise they skip.
"""

import json
import os

import numpy as np
import pytest

from vlmjax import convert
from vlmjax.convert import hf_clip
from vlmjax.convert import tensors as tensors_lib

TOLERANCE = 1e-4  # max abs difference of embeddings and logits, float32
IMAGE_SIZE = 32
OPTIONS = ["--image-size", str(IMAGE_SIZE), "--batch", "2", "--texts", "4"]

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=8,
)
# Another width and head count than the image tower, so a swapped tower fails on shapes.
# EOS is not the largest id and pads the rows (as CLIP's tokenizers do): only pooling at the
# first EOS finds it (reference.py's clip_input_ids).
TEXT = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    vocab_size=100,
    max_position_embeddings=16,
    bos_token_id=49,
    eos_token_id=50,
    pad_token_id=50,
)
CASES = {
    # OpenAI CLIP's activation; pooling at the first EOS (eos_token_id=50).
    "quick_gelu": dict(
        projection_dim=16,
        vision_config=dict(VISION, hidden_act="quick_gelu"),
        text_config=dict(TEXT, hidden_act="quick_gelu"),
    ),
    # Exact GELU, a legacy eos_token_id=2 (argmax pooling), other LayerNorm eps, and a logit
    # scale above CLIP's clamp of 100 (exp(5) = 148), which transformers does not clamp.
    "gelu": dict(
        projection_dim=16,
        logit_scale_init_value=5.0,
        vision_config=dict(VISION, hidden_act="gelu", layer_norm_eps=1e-3),
        text_config=dict(
            TEXT, hidden_act="gelu", eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-4
        ),
    ),
}


@pytest.fixture(scope="module")
def reference(shared_references):
    """case name -> reference.py's output dir (model/ and io.npz), built once per session."""
    return lambda case: shared_references("clip", CASES[case], OPTIONS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_embeddings_and_logits_match_transformers(reference, case):
    out = reference(case)
    model, variables = convert.from_hf(os.path.join(out, "model"))
    io = np.load(os.path.join(out, "io.npz"))
    got = model.apply(variables, io["pixel_values_nhwc"], io["input_ids"])
    logits = np.exp(got["log_scale"]) * np.asarray(got["zimg"]) @ np.asarray(got["ztxt"]).T

    diffs = {
        "image_embeds": np.abs(np.asarray(got["zimg"]) - io["image_embeds"]).max(),
        "text_embeds": np.abs(np.asarray(got["ztxt"]) - io["text_embeds"]).max(),
        "logits_per_image": np.abs(logits - io["logits_per_image"]).max(),
    }
    print(f"{case}: max abs diffs " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert got["zimg"].shape == (2, 16) and got["ztxt"].shape == (4, 16)
    assert logits.shape == io["logits_per_image"].shape == (2, 4)
    for name, diff in diffs.items():
        assert diff <= TOLERANCE, f"{case}: {name} max abs difference {diff:.3e} > {TOLERANCE}"
    # The logits are far from zero, so the check above is not vacuous.
    assert np.abs(io["logits_per_image"]).max() > 1.0


def test_config_mapping(reference):
    quick, _ = convert.from_hf(os.path.join(reference("quick_gelu"), "model"))
    assert quick.embed_dim == 16 and quick.max_scale == 100.0
    assert (quick.vision["width"], quick.vision["num_heads"], quick.vision["patch_size"]) == (
        32,
        2,
        8,
    )
    assert quick.vision["activation"] == quick.text["activation"] == "quick_gelu"
    assert (quick.text["width"], quick.text["num_heads"], quick.text["eos_id"]) == (24, 3, 50)
    assert quick.text["context_length"] == 16 and quick.text["eps"] == 1e-5

    legacy, variables = convert.from_hf(os.path.join(reference("gelu"), "model"))
    assert legacy.text["eos_id"] is None  # eos_token_id=2: argmax pooling, as transformers
    assert (legacy.vision["eps"], legacy.text["eps"]) == (1e-3, 1e-4)
    assert float(variables["params"]["log_scale"]) == pytest.approx(5.0)
    assert legacy.max_scale == pytest.approx(np.exp(5.0), rel=1e-6)


def test_every_tensor_and_leaf_is_accounted_for(reference):
    config, tensors = tensors_lib.read_folder(os.path.join(reference("quick_gelu"), "model"))
    model = hf_clip.model_from_config(config)

    extra = dict(tensors, **{"text_model.encoder.layers.0.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="were not converted.*extra.weight"):
        hf_clip.variables_from_tensors(config, extra, model)

    missing = {k: v for k, v in tensors.items() if k != "logit_scale"}
    with pytest.raises(KeyError, match="logit_scale"):
        hf_clip.variables_from_tensors(config, missing, model)

    # A deeper text tower in the config than in the checkpoint: layer 2 has no tensors.
    deeper = dict(config, text_config=dict(config["text_config"], num_hidden_layers=3))
    with pytest.raises(KeyError, match="text_model.encoder.layers.2"):
        hf_clip.variables_from_tensors(deeper, tensors, hf_clip.model_from_config(deeper))

    # A checkpoint whose projection has another width than projection_dim says.
    wrong = dict(config, projection_dim=8)
    with pytest.raises(ValueError, match="shape mismatches.*image_proj"):
        hf_clip.variables_from_tensors(wrong, tensors, hf_clip.model_from_config(wrong))


def _folder(path, **config) -> str:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({"x": np.zeros(1, np.float32)}, str(path / "model.safetensors"))
    return str(path)


def test_unsupported_models_fail_clearly(tmp_path):
    vision_only = _folder(
        tmp_path / "vision", model_type="clip_vision_model", architectures=["CLIPVisionModel"]
    )
    with pytest.raises(NotImplementedError, match="clip_vision_model.*supported:.*CLIPModel"):
        convert.from_hf(vision_only)
    classifier = _folder(
        tmp_path / "classifier", model_type="clip", architectures=["CLIPForImageClassification"]
    )
    with pytest.raises(NotImplementedError, match="CLIPForImageClassification"):
        convert.from_hf(classifier)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(vision_config=dict(hidden_act="relu")), "vision_config.hidden_act='relu'"),
        (dict(text_config=dict(hidden_act="silu")), "text_config.hidden_act='silu'"),
        (dict(vision_config=dict(num_channels=1)), "num_channels=1"),
        (dict(vision_config=dict(image_size=30, patch_size=8)), "not divisible"),
    ],
)
def test_unrepresentable_configs_fail_clearly(fields, message):
    with pytest.raises(ValueError, match=message):
        hf_clip.model_from_config(dict(model_type="clip", **fields))


def test_defaults_are_openai_vit_b32():
    model = hf_clip.model_from_config(dict(model_type="clip", architectures=["CLIPModel"]))
    assert model.embed_dim == 512
    assert (model.vision["width"], model.vision["depth"], model.vision["patch_size"]) == (
        768,
        12,
        32,
    )
    assert (model.text["vocab_size"], model.text["context_length"], model.text["eos_id"]) == (
        49408,
        77,
        49407,
    )
