"""convert.to_hf: HF folder -> from_hf -> to_hf gives the same tensors bitwise, and a
vlmjax model with random parameters, exported, loads in transformers (no missing or
unexpected keys) and gives our outputs; options HF cannot express fail before writing.

The HF folders are the parity tests' (tests/convert/conftest.py shares them); the exported
folders are all loaded by one reference.py subprocess.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
import test_hf_clip
import test_hf_fuyu
import test_hf_resnet
import test_hf_siglip
import test_hf_vit

from vlmjax import convert
from vlmjax.convert import hf_siglip
from vlmjax.convert import tensors as tensors_lib
from vlmjax.models import clip, convnets, fuyu, vit

TOLERANCE = 1e-4

FOLDERS = {  # name -> (test module's reference arguments, to_hf dtype)
    "clip": (("clip", test_hf_clip.CASES["quick_gelu"], test_hf_clip.OPTIONS), "float32"),
    "siglip": (("siglip", test_hf_siglip.SPEC, test_hf_siglip.OPTIONS), "float32"),
    "vit": (("vit", test_hf_vit.CASES["classifier"], test_hf_vit.OPTIONS), "float32"),
    "vit_model": (("vit", test_hf_vit.CASES["model"], test_hf_vit.OPTIONS), "float32"),
    "resnet": (("resnet", *test_hf_resnet.arguments("bottleneck")), "float32"),
    "fuyu": (("fuyu", *test_hf_fuyu.arguments("persimmon")), "float32"),
    # Tied embeddings (no lm_head) saved in bfloat16: written back tied, in bfloat16.
    "fuyu_tied_bf16": (("fuyu", *test_hf_fuyu.arguments("gelu_bf16_tied")), "bfloat16"),
}


def _raw(path: str) -> dict[str, np.ndarray]:
    return tensors_lib.load_safetensors(os.path.join(path, tensors_lib.SINGLE_FILE))


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_hf_to_vlmjax_to_hf_is_bitwise(shared_references, tmp_path, name):
    (kind, spec, options), dtype = FOLDERS[name]
    original = os.path.join(shared_references(kind, spec, options), "model")
    model, variables = convert.from_hf(original)
    convert.to_hf(model, variables, str(tmp_path), dtype=dtype)
    before, after = _raw(original), _raw(str(tmp_path))
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        got = after[key]
        assert (got.dtype, got.shape) == (value.dtype, value.shape), key
        if key.endswith("num_batches_tracked"):
            continue  # torch's BatchNorm step counter: ours has none, it is written as 0
        assert np.asarray(got).tobytes() == np.asarray(value).tobytes(), key
    # The written config describes the same model.
    again, _ = convert.from_hf(str(tmp_path))
    assert again == model


def _init(model, *inputs, seed: int = 0, **kw) -> dict:
    """Random variables with the shapes of `model.init` (abstract: no compute): every leaf
    random, so zero-initialised ones (biases, class token, head) are not zero; scales
    near 1 and BatchNorm variances positive, so activations stay O(1)."""
    from vlmjax import mesh

    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kw))
    leaves, tree = jax.tree.flatten_with_path(mesh.strip_boxes(abstract))
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        value = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        if "'scale'" in name or "'var'" in name:
            value = 1.0 + np.abs(value) if "'var'" in name else 1.0 + value
        out.append(value)
    return jax.tree.unflatten(tree, out)


VISION = dict(variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
TEXT = dict(vocab_size=64, context_length=8, width=24, depth=2, num_heads=3, mlp_dim=48)


def _models() -> dict:
    """name -> (HF class, model, variables, inputs for both sides)."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(3, 64, (3, 8)).astype(np.int32)
    cases = {}

    # CLIP with our defaults where HF has other ones: no class position row, a (random)
    # patch bias, argmax pooling (eos_id=None), quick_gelu.
    model = clip.CLIP(embed_dim=16, vision=VISION, text=TEXT)
    cases["clip"] = ("CLIPModel", model, _init(model, images, tokens), dict(tokens=tokens))

    siglip_config = dict(
        model_type="siglip",
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
            vocab_size=64,
            max_position_embeddings=8,
            projection_size=32,
        ),
    )
    model = hf_siglip.model_from_config(siglip_config)
    cases["siglip"] = ("SiglipModel", model, _init(model, images, tokens), dict(tokens=tokens))

    model = vit.ViT(num_classes=4, **VISION)  # no class position row, exact GELU, eps 1e-6
    cases["vit"] = ("ViTForImageClassification", model, _init(model, images), {})

    model = convnets.ResNet(num_classes=3, depth=18, stage_sizes=(1, 1), width=8)
    variables = _init(model, images, train=False)
    cases["resnet"] = ("ResNetForImageClassification", model, variables, {})

    model = fuyu.FuyuDecoder(
        vocab_size=64, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4, scan=True
    )
    length, dim = 10, 4 * 4 * 3
    fuyu_tokens = rng.integers(7, 64, (1, length)).astype(np.int32)
    image_mask = np.zeros((1, length), bool)
    image_mask[0, 1:5] = True  # four patches, then text
    fuyu_tokens[image_mask] = 4  # the image placeholder id, image_token_id below
    patches = np.where(image_mask[..., None], rng.normal(size=(1, length, dim)), 0)
    inputs = dict(
        tokens=fuyu_tokens,
        patches=patches.astype(np.float32),
        image_mask=image_mask,
        segment_ids=np.ones((1, length), np.int32),
        positions=np.arange(length, dtype=np.int32)[None],
    )
    variables = _init(model, **{k: jnp.asarray(v) for k, v in inputs.items()})
    cases["fuyu"] = ("FuyuForCausalLM", model, variables, inputs)
    return cases, images


def _ours(name: str, model, variables, images, extra) -> dict[str, np.ndarray]:
    if name in ("clip", "siglip"):
        got = jax.jit(model.apply)(variables, images, extra["tokens"])
        zimg, ztxt = np.asarray(got["zimg"]), np.asarray(got["ztxt"])
        logits = np.exp(np.asarray(got["log_scale"])) * zimg @ ztxt.T
        if got["bias"] is not None:
            logits = logits + np.asarray(got["bias"])
        return dict(image_embeds=zimg, text_embeds=ztxt, logits_per_image=logits)
    if name == "fuyu":
        return dict(logits=np.asarray(jax.jit(model.apply)(variables, **extra)))
    return dict(
        logits=np.asarray(
            jax.jit(model.apply, static_argnames="train")(variables, images, train=False)
        )
    )


def test_random_vlmjax_models_load_in_transformers_with_our_outputs(tmp_path):
    parity.python()  # skips without the reference interpreter
    cases, images = _models()
    folders, expected = [], {}
    for name, (hf_class, model, variables, extra) in cases.items():
        folder = tmp_path / name
        hf_config = {"image_token_id": 4} if name == "fuyu" else None
        convert.to_hf(model, variables, str(folder / "model"), hf_config=hf_config)
        if name == "fuyu":
            inputs = dict(
                input_ids=extra["tokens"].astype(np.int64),
                pixel_values=extra["patches"][extra["image_mask"]],  # [4, p*p*3] in order
            )
        else:
            inputs = dict(pixel_values_nchw=images.transpose(0, 3, 1, 2))
            if "tokens" in extra:
                inputs["input_ids"] = extra["tokens"].astype(np.int64)
        np.savez(folder / "inputs.npz", **inputs)
        folders.append(dict(dir=str(folder), **{"class": hf_class}))
        expected[name] = _ours(name, model, variables, images, extra)
    parity.run_reference("load", dict(folders=folders), str(tmp_path))

    for name in cases:
        info = json.loads((tmp_path / name / "loading_info.json").read_text())
        assert info.get("missing_keys") == [] and info.get("unexpected_keys") == [], (name, info)
        assert info.get("mismatched_keys", []) == [], (name, info)
        theirs = dict(np.load(tmp_path / name / "outputs.npz"))
        assert sorted(theirs) == sorted(expected[name])
        for key, value in expected[name].items():
            assert theirs[key].shape == value.shape, (name, key)
            diff = float(np.abs(theirs[key] - value).max())
            print(f"{name} {key}: max abs diff {diff:.2e}")
            assert diff <= TOLERANCE, (name, key, diff)
            assert np.abs(value).max() > 0.1, (name, key)


def test_options_hf_cannot_express_fail_before_writing(tmp_path):
    images = np.zeros((1, 32, 32, 3), np.float32)
    tokens = np.zeros((1, 8), np.int32)
    out = tmp_path / "out"
    # (The options are checked before any variable is read.)
    model = clip.CLIP(embed_dim=16, vision=VISION, text=dict(TEXT, pool="last"))
    with pytest.raises(ValueError, match="CLIPModel: text.pool='last'"):
        convert.to_hf(model, _init(model, images, tokens), str(out))
    model = vit.ViT(num_classes=4, pool="gap", **VISION)
    with pytest.raises(ValueError, match="ViTForImageClassification: pool='gap'"):
        convert.to_hf(model, _init(model, images), str(out))
    model = convnets.ResNet(num_classes=3, depth=18, stage_sizes=(1,), width=8, stem_pool=False)
    with pytest.raises(ValueError, match="stem_pool=False"):
        convert.to_hf(model, _init(model, images, train=False), str(out))
    legacy_eos = clip.CLIP(embed_dim=16, vision=VISION, text=dict(TEXT, eos_id=2))
    with pytest.raises(ValueError, match="text.eos_id=2"):
        convert.to_hf(legacy_eos, {}, str(out))
    siglip_like = clip.CLIP(embed_dim=16, vision=dict(VISION, pool="map"), text=TEXT)
    with pytest.raises(ValueError, match="SiglipModel: .*text.pool='eos'.*text.causal=True"):
        convert.to_hf(siglip_like, {}, str(out))
    assert not out.exists()


def test_missing_and_unknown_leaves_are_named(tmp_path):
    images = np.zeros((1, 32, 32, 3), np.float32)
    model = vit.ViT(num_classes=4, **VISION)
    variables = _init(model, images)
    missing = jax.tree.map(lambda x: x, variables)
    del missing["params"]["encoder"]["layer_1"]["mlp"]["fc2"]["bias"]
    with pytest.raises(KeyError, match="params/encoder/layer_1/mlp/fc2/bias"):
        convert.to_hf(model, missing, str(tmp_path / "a"))
    extra = jax.tree.map(lambda x: x, variables)
    extra["params"]["encoder"]["extra"] = {"kernel": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="no place in the HF model.*params/encoder/extra"):
        convert.to_hf(model, extra, str(tmp_path / "b"))
    with pytest.raises(TypeError, match="no HF exporter for AlexNet"):
        convert.to_hf(convnets.AlexNet(), {}, str(tmp_path / "c"))
