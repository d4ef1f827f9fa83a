"""HF SiglipModel -> clip.CLIP (SigLIP form): embeddings and logits (with the logit bias)
match transformers; clear errors for what it cannot represent.

The parity tests run tests/convert/reference.py under $VLMJAX_PARITY_PYTHON (see
tests/convert/make_parity_env.sh), or under this interpreter if it has torch and
transformers; otherwise they skip.
"""

import os

import jax
import numpy as np
import pytest

from vlmjax import convert
from vlmjax.convert import hf_siglip
from vlmjax.convert import tensors as tensors_lib

TOLERANCE = 1e-4  # max abs difference of embeddings and logits, float32
IMAGE_SIZE = 32
OPTIONS = ["--image-size", str(IMAGE_SIZE), "--batch", "2", "--texts", "3"]

# A text width other than the vision one, so that a swapped tower fails on shapes; the
# text head projects to the vision width (SigLIP compares the two directly). The vision
# tower uses exact GELU and another eps, so both activation and eps mappings are read.
SPEC = dict(
    vision_config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
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
)


@pytest.fixture(scope="module")
def reference(shared_references):
    """reference.py's output dir (model/ and io.npz), built once per session."""
    return shared_references("siglip", SPEC, OPTIONS)


def test_embeddings_and_logits_match_transformers(reference):
    model, variables = convert.from_hf(os.path.join(reference, "model"))
    io = np.load(os.path.join(reference, "io.npz"))
    got = jax.jit(model.apply)(variables, io["pixel_values_nhwc"], io["input_ids"])
    zimg, ztxt = np.asarray(got["zimg"]), np.asarray(got["ztxt"])
    logits = np.exp(got["log_scale"]) * zimg @ ztxt.T + got["bias"]
    diffs = {
        "image_embeds": np.abs(zimg - io["image_embeds"]).max(),
        "text_embeds": np.abs(ztxt - io["text_embeds"]).max(),
        "logits_per_image": np.abs(logits - io["logits_per_image"]).max(),
    }
    print("siglip: max abs diffs " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert zimg.shape == (2, 32) and ztxt.shape == (3, 32) and logits.shape == (2, 3)
    for name, diff in diffs.items():
        assert diff <= TOLERANCE, f"{name} max abs difference {diff:.3e} > {TOLERANCE}"
    # The bias is part of the logits and not zero, so a dropped bias would fail above.
    assert float(got["bias"]) < -1.0 and np.abs(io["logits_per_image"]).max() > 1.0


def test_config_mapping(reference):
    model, variables = convert.from_hf(os.path.join(reference, "model"))
    assert model.embed_dim == 32
    assert (model.image_projection, model.text_projection) == ("none", "linear_bias")
    assert model.sigmoid_bias is not None
    v, t = model.vision, model.text
    assert (v["pool"], v["activation"], v["eps"], v["pre_norm"]) == ("map", "gelu", 1e-5, False)
    assert (t["pool"], t["causal"], t["activation"], t["eps"]) == (
        "final",
        False,
        "gelu_tanh",
        1e-6,
    )
    assert (t["width"], t["context_length"], t["pad_id"]) == (24, 16, 1)
    params = variables["params"]
    assert params["text_proj"]["kernel"].shape == (24, 32) and params["bias"].shape == ()
    assert params["image_tower"]["map_head"]["attn"]["query"]["kernel"].shape == (32, 2, 16)


def test_every_tensor_and_leaf_is_accounted_for(reference):
    config, tensors = tensors_lib.read_folder(os.path.join(reference, "model"))
    model = hf_siglip.model_from_config(config)
    extra = dict(tensors, **{"vision_model.head.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="were not converted.*head.extra.weight"):
        hf_siglip.variables_from_tensors(config, extra, model)
    missing = {k: v for k, v in tensors.items() if k != "logit_bias"}
    with pytest.raises(KeyError, match="logit_bias"):
        hf_siglip.variables_from_tensors(config, missing, model)
    deeper = dict(config, vision_config=dict(config["vision_config"], num_hidden_layers=3))
    with pytest.raises(KeyError, match="vision_model.encoder.layers.2"):
        hf_siglip.variables_from_tensors(deeper, tensors, hf_siglip.model_from_config(deeper))


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(vision_config=dict(vision_use_head=False)), "vision_use_head"),
        (dict(text_config=dict(projection_size=16)), "projection_size=16 differs"),
        (dict(vision_config=dict(hidden_act="silu")), "vision_config.hidden_act='silu'"),
        (dict(vision_config=dict(image_size=30, patch_size=8)), "not divisible"),
    ],
)
def test_unrepresentable_configs_fail_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        hf_siglip.model_from_config(dict(model_type="siglip", **config))


def test_siglip2_naflex_is_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "siglip2"}')
    with pytest.raises(NotImplementedError, match="NaFlex.*fixed-resolution.*'siglip'"):
        convert.from_hf(str(tmp_path))


def test_defaults_are_siglip_base():
    model = hf_siglip.model_from_config(dict(model_type="siglip"))
    assert model.embed_dim == 768
    assert (model.vision["width"], model.vision["patch_size"]) == (768, 16)
    assert (model.text["vocab_size"], model.text["context_length"]) == (32000, 64)
    assert model.vision["activation"] == model.text["activation"] == "gelu_tanh"
