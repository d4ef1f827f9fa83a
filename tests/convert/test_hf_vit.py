"""HF ViTForImageClassification / ViTModel -> vit.ViT: logits and pooled features match
transformers; clear errors for what it cannot represent.

The parity tests run tests/convert/reference.py under $VLMJAX_PARITY_PYTHON (see
tests/convert/make_parity_env.sh); without torch/transformers they skip.
"""

import os

import jax
import numpy as np
import pytest

from vlmjax import convert
from vlmjax.convert import hf_vit
from vlmjax.convert import tensors as tensors_lib

TOLERANCE = 1e-4  # max abs difference, float32
IMAGE_SIZE = 32
OPTIONS = ["--image-size", str(IMAGE_SIZE), "--batch", "2"]
BASE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=8,
    initializer_range=0.2,  # larger than HF's 0.02: O(1) logits, so a mapping error shows
)
CASES = {
    # HF's defaults: exact GELU, eps 1e-12, a 5-way head.
    "classifier": dict(BASE, num_labels=5),
    # A bare ViTModel with its tanh pooler, another eps and activation.
    "model": dict(
        BASE, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, **{"class": "ViTModel"}
    ),
}


@pytest.fixture(scope="module")
def reference(shared_references):
    return lambda case: shared_references("vit", CASES[case], OPTIONS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_transformers(reference, case):
    out = reference(case)
    model, variables = convert.from_hf(os.path.join(out, "model"))
    io = np.load(os.path.join(out, "io.npz"))
    got = np.asarray(jax.jit(model.apply)(variables, io["pixel_values_nhwc"]))
    expected = io["outputs"]
    assert got.shape == expected.shape == ((2, 5) if case == "classifier" else (2, 32))
    diff = float(np.abs(got - expected).max())
    print(f"{case}: max abs diff {diff:.2e} (values up to {np.abs(expected).max():.2f})")
    assert diff <= TOLERANCE
    assert np.abs(expected).max() > 0.1


def test_config_mapping(reference):
    classifier, _ = convert.from_hf(os.path.join(reference("classifier"), "model"))
    assert (classifier.num_classes, classifier.rep_size, classifier.eps) == (5, 0, 1e-12)
    assert (classifier.pool, classifier.cls_position, classifier.pre_norm) == ("cls", True, False)
    assert classifier.activation == "gelu"
    bare, variables = convert.from_hf(os.path.join(reference("model"), "model"))
    assert (bare.num_classes, bare.rep_size, bare.activation) == (0, 32, "gelu_tanh")
    assert variables["params"]["pos_embedding"]["pos_embedding"].shape == (1, 17, 32)


def test_model_without_pooler_gives_the_class_token(reference):
    """A ViTModel saved without its pooler converts with rep_size=0 (the class token)."""
    out = reference("model")
    config, tensors = tensors_lib.read_folder(os.path.join(out, "model"))
    no_pooler = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
    model, variables = hf_vit.convert(config, no_pooler)
    assert model.rep_size == 0
    io = np.load(os.path.join(out, "io.npz"))
    got = np.asarray(jax.jit(model.apply)(variables, io["pixel_values_nhwc"]))
    assert np.abs(got - io["cls_hidden"]).max() <= TOLERANCE


def test_every_tensor_and_leaf_is_accounted_for(reference):
    config, tensors = tensors_lib.read_folder(os.path.join(reference("classifier"), "model"))
    model = hf_vit.model_from_config(config)
    extra = dict(tensors, **{"vit.encoder.layer.0.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="were not converted.*extra.weight"):
        hf_vit.variables_from_tensors(config, extra, model)
    missing = {k: v for k, v in tensors.items() if k != "classifier.bias"}
    with pytest.raises(KeyError, match="classifier.bias"):
        hf_vit.variables_from_tensors(config, missing, model)
    wrong = dict(config, id2label={str(i): str(i) for i in range(7)})
    with pytest.raises(ValueError, match="shape mismatches.*head"):
        hf_vit.variables_from_tensors(wrong, tensors, hf_vit.model_from_config(wrong))


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(hidden_act="silu"), "hidden_act='silu'"),
        (dict(hidden_size=32, num_attention_heads=2, head_dim=8), "head_dim"),
        (dict(image_size=30, patch_size=8), "not divisible"),
        (dict(architectures=["ViTModel"], pooler_act="relu"), "pooler_act='relu'"),
    ],
)
def test_unrepresentable_configs_fail_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        hf_vit.model_from_config(dict(model_type="vit", **config))
