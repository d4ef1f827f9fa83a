"""HF ResNet -> convnets.ResNet: logits parity with transformers, and clear errors.

The parity tests need torch + transformers, which the main (3.12) env does not have: they
run tests/convert/reference.py under $VLMJAX_PARITY_PYTHON (tests/convert/make_parity_env.sh
builds one), or under this interpreter if it has both; otherwise they skip.
"""

import json
import os

import numpy as np
import pytest

from vlmjax import convert
from vlmjax.convert import hf_resnet

TOLERANCE = 1e-4  # max abs logit difference, float32

# (HF config fields, image size); odd sizes check torch's floor in strided output sizes.
CASES = {
    # ResNet-18-like, tiny: stage 1 keeps 8 channels (identity shortcut), stage 2 projects.
    "basic": (
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic"),
        32,
    ),
    # ResNet-50-like, tiny: 4x expansion, projections in both stages' first blocks.
    "bottleneck": (
        dict(embedding_size=8, hidden_sizes=[32, 64], depths=[2, 1], layer_type="bottleneck"),
        37,
    ),
    # A bare ResNetModel: no `resnet.` prefix, no head, pooled features out.
    "features": (
        dict(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], layer_type="basic"),
        29,
    ),
}


@pytest.fixture(scope="module")
def reference(shared_references):
    """case name -> reference.py's output dir (model/ and io.npz), built once per session."""
    return lambda case: shared_references("resnet", *arguments(case))


def arguments(case: str) -> tuple[dict, list[str]]:
    """(reference.py spec, options) of a case (test_roundtrip.py reuses them)."""
    fields, image_size = CASES[case]
    spec = dict(fields, head=False) if case == "features" else dict(fields, num_labels=5)
    return spec, ["--image-size", str(image_size)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(reference, case):
    out = reference(case)

    model, variables = convert.from_hf(os.path.join(out, "model"))
    io = np.load(os.path.join(out, "io.npz"))
    got = np.asarray(model.apply(variables, io["pixel_values_nhwc"], train=False))
    expected = io["outputs"]

    assert got.shape == expected.shape
    diff = float(np.abs(got - expected).max())
    print(f"{case}: max abs diff {diff:.2e} (outputs up to {np.abs(expected).max():.2f})")
    assert diff <= TOLERANCE, f"{case}: max abs difference {diff:.3e} > {TOLERANCE}"


def test_every_tensor_and_leaf_is_accounted_for(reference):
    from vlmjax.convert import tensors as tensors_lib

    config, tensors = tensors_lib.read_folder(os.path.join(reference("basic"), "model"))
    model = hf_resnet.model_from_config(config)

    extra = dict(tensors, **{"resnet.encoder.stages.0.layers.0.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="were not converted.*extra.weight"):
        hf_resnet.variables_from_tensors(config, extra, model)

    missing = {k: v for k, v in tensors.items() if not k.startswith("classifier.1.bias")}
    with pytest.raises(KeyError, match="classifier.1.bias"):
        hf_resnet.variables_from_tensors(config, missing, model)

    # A checkpoint without the shortcut our model has: a Flax leaf left empty.
    no_shortcut = {k: v for k, v in tensors.items() if ".1.layers.0.shortcut." not in k}
    with pytest.raises(ValueError, match="not filled.*stage2_block1.*proj_conv"):
        hf_resnet.variables_from_tensors(config, no_shortcut, model)


def _write_config(path, **config) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        convert.from_hf(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.from_hf(str(tmp_path))

    pickled = _write_config(tmp_path / "pickled", model_type="resnet")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*only safetensors"):
        convert.from_hf(pickled)


def test_unsupported_models_fail_clearly(tmp_path):
    from safetensors.numpy import save_file

    bert = _write_config(tmp_path / "bert", model_type="bert", architectures=["BertModel"])
    save_file({"x": np.zeros(1, np.float32)}, os.path.join(bert, "model.safetensors"))
    with pytest.raises(NotImplementedError, match="model_type='bert'.*supported: resnet"):
        convert.from_hf(bert)

    backbone = _write_config(
        tmp_path / "backbone", model_type="resnet", architectures=["ResNetBackbone"]
    )
    save_file({"x": np.zeros(1, np.float32)}, os.path.join(backbone, "model.safetensors"))
    with pytest.raises(NotImplementedError, match="ResNetBackbone"):
        convert.from_hf(backbone)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(downsample_in_bottleneck=True), "ResNet v1"),
        (dict(downsample_in_first_stage=True), "downsample_in_first_stage"),
        (dict(hidden_act="gelu"), "only has relu"),
        (dict(layer_type="preact"), "layer_type"),
        (dict(hidden_sizes=[256, 512, 1024, 1024]), r"needs embedding_size \* 2\*\*i \* 4"),
    ],
)
def test_unrepresentable_configs_fail_clearly(fields, message):
    with pytest.raises(ValueError, match=message):
        hf_resnet.model_from_config(dict(model_type="resnet", **fields))


def test_config_mapping():
    resnet50 = hf_resnet.model_from_config(dict(model_type="resnet", id2label={"0": "a"}))
    assert (resnet50.depth, resnet50.width, resnet50.num_classes) == (50, 64, 1)
    assert resnet50.architecture() == ("bottleneck", (3, 4, 6, 3))
    resnet18 = hf_resnet.model_from_config(
        dict(
            layer_type="basic",
            hidden_sizes=[64, 128, 256, 512],
            depths=[2, 2, 2, 2],
            architectures=["ResNetModel"],
        )
    )
    assert (resnet18.depth, resnet18.num_classes, resnet18.stage_sizes) == (18, 0, None)
