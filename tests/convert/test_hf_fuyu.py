"""HF Fuyu -> fuyu.FuyuDecoder: logits and greedy generations match transformers, our
layout matches FuyuProcessor's, bfloat16 checkpoints load, and errors are clear.

The parity tests run tests/convert/reference.py under $VLMJAX_PARITY_PYTHON (see
test_hf_resnet.py); without torch/transformers they skip. FuyuProcessor needs Pillow: in a
parity env without it, reference.py builds the processor's layout itself, the logits and
generation tests still run, and the processor comparison skips with that reason.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from vlmjax import convert, generate
from vlmjax.convert import hf_fuyu
from vlmjax.convert import tensors as tensors_lib
from vlmjax.data import fuyu_layout
from vlmjax.models import fuyu

TOLERANCE = 1e-4  # max abs logit difference, float32

# reference.py's toy vocabulary: <unk>=0 (pad), <s>, </s>, <0x04> (BOA), |SPEAKER|,
# |NEWLINE|, "▁", then the words w0, w1, ... from id 7.
TOKENS = fuyu_layout.Tokens(image=4, newline=5, bos=1, eos=2, pad=0, boa=3)
FIRST_WORD = 7


def _text_config(**fields):
    base = dict(
        model_type="persimmon",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="relu2",
        qk_layernorm=True,
        # Larger than HF's 0.02 so that logits are O(1) and a mapping error shows.
        initializer_range=0.2,
        rope_parameters=dict(rope_type="default", rope_theta=25000.0, partial_rotary_factor=0.5),
        layer_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return dict(base, **fields)


CASES = {
    # Persimmon blocks (relu^2, qk-norm, half the head rotary) in float32. Image sizes:
    # not multiples of the patch (7x10, 5x9, 13x6), exactly the canvas (16x24), and larger
    # than the canvas (30x20: the processor downscales it to 16x10).
    "persimmon": dict(
        config=dict(patch_size=4, image_token_id=4, initializer_range=0.2),
        text=_text_config(),
        canvas=[16, 24],
        images=[[7, 10], [16, 24], [5, 9], [30, 20], [13, 6]],
        prompts=["w1 w2", "w3", "w4 w5 w6", "w7", "w8 w9"],
        max_new_tokens=6,
    ),
    # The other branches: a bfloat16 checkpoint, exact GELU, no qk-norm, full rotary,
    # tied embeddings (no lm_head tensor), patch size 3, theta 10000. The tie is set the
    # way transformers writes it: top-level tie_word_embeddings=true, and text_config's
    # left at its default (false), which transformers ignores.
    "gelu_bf16_tied": dict(
        config=dict(
            patch_size=3, image_token_id=4, initializer_range=0.2, tie_word_embeddings=True
        ),
        text=_text_config(
            vocab_size=48,
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            hidden_act="gelu",
            qk_layernorm=False,
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0
            ),
        ),
        canvas=[12, 12],
        images=[[7, 10], [12, 5]],
        prompts=["w1 w2", "w3"],
        max_new_tokens=5,
        dtype="bfloat16",
    ),
}


@pytest.fixture(scope="module")
def reference(shared_references):
    """case -> (output dir, io.npz contents), built once per session."""

    @functools.cache
    def get(case: str):
        out = shared_references("fuyu", *arguments(case))
        return out, dict(np.load(os.path.join(out, "io.npz")))

    return get


def arguments(case: str) -> tuple[dict, list[str]]:
    """(reference.py spec, options) of a case (test_roundtrip.py reuses them)."""
    c = CASES[case]
    spec = dict(
        config=dict(c["config"], text_config=c["text"]),
        canvas=c["canvas"],
        images=c["images"],
        prompts=c["prompts"],
        num_words=20,
        max_new_tokens=c["max_new_tokens"],
        dtype=c.get("dtype", "float32"),
    )
    return spec, []


def _examples(case: str, io: dict) -> list[dict]:
    """The reference's examples as fuyu_layout examples (prompt words -> toy ids)."""
    examples, i = [], 0
    while f"image_{i}" in io:
        words = str(io["prompts"][i]).split()
        prompt = [FIRST_WORD + int(w[1:]) for w in words]
        examples.append(dict(image=io[f"image_{i}"], prompt=prompt))
        i += 1
    return examples


def _spec(case: str, model: fuyu.FuyuDecoder) -> fuyu_layout.LayoutSpec:
    canvas = tuple(CASES[case]["canvas"])
    return fuyu_layout.hf_compatible(model.patch_size, TOKENS, canvas)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(reference, case):
    out, io = reference(case)
    model, variables = convert.from_hf(os.path.join(out, "model"))
    spec = _spec(case, model)
    examples = _examples(case, io)
    assert len(examples) >= 2
    # All examples packed into one row: also checks that segments do not see each other.
    seqs = [fuyu_layout.layout(e["image"], e["prompt"], None, spec) for e in examples]
    total = sum(len(s["tokens"]) for s in seqs)
    batch = fuyu_layout.pack(seqs, seq_len=total + 3, num_rows=1)
    logits = np.asarray(jax.jit(model.apply)(variables, **fuyu.model_inputs(batch)))[0]
    worst = 0.0
    for i in range(len(seqs)):
        got = logits[batch["segment_ids"][0] == i + 1]  # [L_i, vocab]
        expected = io[f"logits_{i}"]
        assert got.shape == expected.shape, f"example {i}: layout length differs from HF's"
        worst = max(worst, float(np.abs(got - expected).max()))
    scale = max(float(np.abs(io[f"logits_{i}"]).max()) for i in range(len(seqs)))
    print(f"{case}: max abs logit diff {worst:.2e} (logits up to {scale:.2f})")
    assert scale > 1.0, "logits too small for the comparison to mean much"
    assert worst <= TOLERANCE, f"{case}: max abs difference {worst:.3e} > {TOLERANCE}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_matches_fuyu_processor(reference, case):
    out, io = reference(case)
    if str(io["processor"]) != "transformers":
        pytest.skip(
            "the parity Python has no Pillow, which FuyuProcessor needs; reference.py built "
            "its layout by hand (logits still compared): pip install pillow there to compare"
        )
    config, _ = tensors_lib.read_folder(os.path.join(out, "model"))
    spec = _spec(case, hf_fuyu.model_from_config(config))
    for i, example in enumerate(_examples(case, io)):
        seq = fuyu_layout.layout(example["image"], example["prompt"], None, spec)
        np.testing.assert_array_equal(seq["tokens"], io[f"input_ids_{i}"], err_msg=f"ex {i}")
        # Same pixels, same order; normalisation in HF's order of operations, so exact.
        np.testing.assert_array_equal(seq["patches"][seq["image_mask"]], io[f"pixel_values_{i}"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(reference, case):
    out, io = reference(case)
    model, variables = convert.from_hf(os.path.join(out, "model"))
    examples = _examples(case, io)
    batch = fuyu_layout.prompt_batch(examples, _spec(case, model))  # left-padded, mixed sizes
    steps = CASES[case]["max_new_tokens"]
    tokens = np.asarray(generate.generate(model, variables, batch, max_new_tokens=steps))
    for i in range(len(examples)):
        expected = io[f"generated_{i}"].tolist()  # HF stops after EOS; ours pads after it
        assert tokens[i, : len(expected)].tolist() == expected, f"example {i}"
        assert (tokens[i, len(expected) :] == TOKENS.pad).all()


def test_scan_and_bfloat16_overrides(reference):
    out, io = reference("persimmon")
    config, tensors = tensors_lib.read_folder(os.path.join(out, "model"))
    model, variables = hf_fuyu.convert(config, tensors)
    scanned, scanned_vars = hf_fuyu.convert(config, tensors, scan=True)
    assert scanned_vars["params"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 64)
    example = _examples("persimmon", io)[0]
    seq = fuyu_layout.layout(example["image"], example["prompt"], None, _spec("persimmon", model))
    inputs = {k: jnp.asarray(seq[k][None]) for k in ("tokens", "patches", "image_mask")}
    np.testing.assert_allclose(
        scanned.apply(scanned_vars, **inputs), model.apply(variables, **inputs), atol=1e-5
    )
    half, _ = hf_fuyu.convert(config, tensors, dtype="bfloat16")
    got = np.asarray(half.apply(variables, **inputs))[0]
    # bfloat16 compute: close, not equal (a sanity check of the override, not a parity test).
    assert np.abs(got - io["logits_0"]).max() < 0.1 * np.abs(io["logits_0"]).max()


def test_every_tensor_and_leaf_is_accounted_for(reference):
    out, _ = reference("persimmon")
    config, tensors = tensors_lib.read_folder(os.path.join(out, "model"))
    model = hf_fuyu.model_from_config(config)
    extra = dict(tensors, **{"language_model.model.layers.0.mlp.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="were not converted.*extra.weight"):
        hf_fuyu.variables_from_tensors(config, extra, model)
    missing = {k: v for k, v in tensors.items() if "layers.1.self_attn.dense.bias" not in k}
    with pytest.raises(KeyError, match="layers.1.self_attn.dense.bias"):
        hf_fuyu.variables_from_tensors(config, missing, model)
    # The transformers-5 module names (as in a state_dict() saved by hand) load the same.
    renamed = {}
    for name, value in tensors.items():
        name = name.replace("language_model.model.", "model.language_model.")
        name = name.replace("language_model.lm_head.", "lm_head.")
        name = name.replace("vision_embed_tokens.", "model.vision_embed_tokens.")
        renamed[name] = value
    a = hf_fuyu.variables_from_tensors(config, renamed, model)
    b = hf_fuyu.variables_from_tensors(config, tensors, model)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
    "text, message",
    [
        (dict(hidden_act="silu"), "hidden_act='silu'"),
        (dict(rope_parameters=dict(rope_type="linear", factor=2.0)), "only plain rotary"),
        (dict(rope_parameters=dict(rope_type="default")), "no rope_theta"),
        (dict(hidden_size=32, num_attention_heads=4, head_dim=16), "head_dim"),
    ],
)
def test_unrepresentable_configs_fail_clearly(text, message):
    with pytest.raises((ValueError, NotImplementedError), match=message):
        hf_fuyu.model_from_config(dict(model_type="fuyu", text_config=text))


def test_config_mapping():
    # adept/fuyu-8b's flat config.json (text fields at the top level).
    model = hf_fuyu.model_from_config(
        dict(
            model_type="fuyu",
            hidden_size=4096,
            num_attention_heads=64,
            num_hidden_layers=36,
            intermediate_size=16384,
            vocab_size=262144,
            hidden_act="relu2",
            rope_theta=25000.0,
            partial_rotary_factor=0.5,
            qk_layernorm=True,
            patch_size=30,
        )
    )
    assert model.hparams() == fuyu.FuyuDecoder(variant="8b").hparams()
    assert (model.rope_theta, model.rotary_fraction, model.activation) == (25000.0, 0.5, "relu2")
    with pytest.raises(ValueError, match="overrides"):
        hf_fuyu.model_from_config(dict(rope_theta=1.0), width=8)


def _write_safetensors(path, arrays: dict[str, np.ndarray], dtype_names: dict[str, str]) -> None:
    """A safetensors file written by hand (safetensors.numpy cannot write bfloat16)."""
    header, blobs, offset = {}, [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = dict(
            dtype=dtype_names[name],
            shape=list(array.shape),
            data_offsets=[offset, offset + len(data)],
        )
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def test_bfloat16_and_float8_safetensors_are_read(tmp_path):
    values = np.array([[1.0, -2.5, 3.140625], [1e-3, 65280.0, -0.0]], np.float32)
    arrays = {
        "bf16": values.astype(ml_dtypes.bfloat16),
        "f8": np.array([0.5, -448.0], ml_dtypes.float8_e4m3fn),
        "f32": values,
        "i64": np.arange(3, dtype=np.int64),
    }
    names = {"bf16": "BF16", "f8": "F8_E4M3", "f32": "F32", "i64": "I64"}
    path = str(tmp_path / "model.safetensors")
    _write_safetensors(path, arrays, names)
    got = tensors_lib.load_safetensors(path)
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["bf16"].shape == (2, 3)
    read = np.asarray(got["bf16"], np.float32)
    np.testing.assert_array_equal(read, values.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(read[0], [1.0, -2.5, 3.140625])  # exact in bfloat16
    np.testing.assert_array_equal(got["f8"].astype(np.float32), [0.5, -448.0])
    np.testing.assert_array_equal(got["f32"], values)
    np.testing.assert_array_equal(got["i64"], [0, 1, 2])
    # TensorPool hands converters float32 whatever the file held.
    pool = tensors_lib.TensorPool(got)
    assert pool.pop("bf16").dtype == np.float32

    # A file numpy can represent still goes through safetensors.numpy, with the same result.
    from safetensors.numpy import save_file

    plain = str(tmp_path / "plain.safetensors")
    save_file({"f32": values}, plain)
    np.testing.assert_array_equal(tensors_lib.load_safetensors(plain)["f32"], values)


def test_tied_embeddings_as_transformers_writes_them(reference):
    """transformers puts the tie at the top level of config.json (text_config's stays false)
    and saves no lm_head tensor: the head is then the transposed token embedding."""
    out, _ = reference("gelu_bf16_tied")
    config, tensors = tensors_lib.read_folder(os.path.join(out, "model"))
    assert config["tie_word_embeddings"] is True
    assert config["text_config"].get("tie_word_embeddings", False) is False
    assert not any("lm_head" in name for name in tensors)
    _, variables = convert.from_hf(os.path.join(out, "model"))
    embedding = variables["params"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], embedding.T)
    # Untied at the top level (the text_config alone is ignored, as transformers does).
    untied = dict(config, tie_word_embeddings=False)
    untied["text_config"] = dict(config["text_config"], tie_word_embeddings=True)
    model = hf_fuyu.model_from_config(untied)
    with pytest.raises(KeyError, match="language_model.lm_head.weight.*not tied"):
        hf_fuyu.variables_from_tensors(untied, tensors, model)
