"""Fuyu layout: patches, newline positions, masks, packing and left-padded prompts."""

import numpy as np
import pytest

from vlmjax.data import fuyu_layout as fl

TOKENS = fl.Tokens(image=4, newline=5, bos=1, eos=2, pad=0, boa=3)
SPEC = fl.LayoutSpec(patch_size=4, tokens=TOKENS)
PAD_PIXEL = (1 / 255 - 0.5) / 0.5  # raw pixel 1, normalised: HF's padding


def _image(h, w, seed=0, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(8, 12, 3), (4, 4, 1), (12, 8, 2)])
def test_patchify_unpatchify_round_trip(shape):
    image = _image(*shape[:2], c=shape[2])
    patches = fl.patchify(image, 4)
    rows, cols = shape[0] // 4, shape[1] // 4
    assert patches.shape == (rows * cols, 4 * 4 * shape[2])
    np.testing.assert_array_equal(fl.unpatchify(patches, rows, cols, 4), image)
    # Row order, each patch flattened (row, column, channel): patch k is the block at
    # (k // cols, k % cols).
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        block = image[4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
        np.testing.assert_array_equal(patches[k], block.reshape(-1))
    with pytest.raises(ValueError, match="whole number"):
        fl.patchify(image[:, :3], 4)


def test_normalise_and_padding():
    np.testing.assert_allclose(fl.normalise(np.array([0, 255, 1], np.uint8)), [-1, 1, PAD_PIXEL])
    image = _image(5, 6)
    patches, rows, cols = fl.image_patches(image, SPEC)
    assert (rows, cols) == (2, 2)
    grid = fl.unpatchify(patches, rows, cols, 4)  # [8, 8, 3]
    np.testing.assert_array_equal(grid[:5, :6], fl.normalise(image))
    np.testing.assert_allclose(grid[5:], PAD_PIXEL)  # bottom rows
    np.testing.assert_allclose(grid[:, 6:], PAD_PIXEL)  # right columns


# (height, width) -> (rows, cols) with patch 4: multiples and non-multiples.
SIZES = {(4, 4): (1, 1), (7, 10): (2, 3), (8, 12): (2, 3), (13, 5): (4, 2), (1, 17): (1, 5)}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_newlines_image_mask_and_loss_mask(size):
    rows, cols = SIZES[size]
    prompt, target = [10, 11, 12], [20, 21]
    seq = fl.layout(_image(*size), prompt, target, SPEC)
    n_image = rows * (cols + 1)
    expected = [4] * cols + [5]
    expected = expected * rows + [1, 10, 11, 12, 3, 20, 21, 2]
    np.testing.assert_array_equal(seq["tokens"], expected)
    newlines = np.flatnonzero(seq["tokens"] == 5)
    np.testing.assert_array_equal(newlines, [(cols + 1) * r + cols for r in range(rows)])
    np.testing.assert_array_equal(
        np.flatnonzero(seq["image_mask"]), np.flatnonzero(seq["tokens"] == 4)
    )
    # Patches sit at image positions only, in row order.
    patches, _, _ = fl.image_patches(_image(*size), SPEC)
    np.testing.assert_array_equal(seq["patches"][seq["image_mask"]], patches)
    assert not seq["patches"][~seq["image_mask"]].any()
    # Position i predicts token i + 1; the loss covers the predictions of 20, 21 and EOS,
    # made at BOA, 20 and 21.
    np.testing.assert_array_equal(seq["targets"][:-1], seq["tokens"][1:])
    boa = n_image + 4
    assert seq["tokens"][boa] == 3
    np.testing.assert_array_equal(np.flatnonzero(seq["loss_mask"]), [boa, boa + 1, boa + 2])
    np.testing.assert_array_equal(seq["targets"][seq["loss_mask"] > 0], [20, 21, 2])


def test_prompt_only_text_only_and_no_boa():
    prompt = fl.layout(_image(4, 8), [10], None, SPEC)
    np.testing.assert_array_equal(prompt["tokens"], [4, 4, 5, 1, 10, 3])
    assert not prompt["loss_mask"].any()
    text = fl.layout(None, [10], [20], SPEC)
    np.testing.assert_array_equal(text["tokens"], [1, 10, 3, 20, 2])
    assert not text["image_mask"].any() and text["patches"].shape == (5, 48)
    no_boa = fl.LayoutSpec(patch_size=4, tokens=fl.Tokens(boa=None, bos=7, eos=8, image=9))
    np.testing.assert_array_equal(fl.layout(None, [10], [20], no_boa)["tokens"], [7, 10, 20, 8])
    # A tokenizer without BOS (T5-style SentencePiece): the prompt follows the image.
    no_bos = fl.LayoutSpec(patch_size=4, tokens=fl.Tokens(boa=None, bos=None, eos=8, image=9))
    seq = fl.layout(_image(4, 8), [10], [20], no_bos)
    np.testing.assert_array_equal(seq["tokens"], [9, 9, fl.Tokens().newline, 10, 20, 8])
    # Position i predicts token i + 1: the prompt's last token predicts the target.
    np.testing.assert_array_equal(seq["targets"][3:5], [20, 8])
    np.testing.assert_array_equal(seq["loss_mask"], [0, 0, 0, 1, 1, 0])
    with pytest.raises(ValueError, match="uint8 image"):
        fl.layout(np.zeros((4, 4, 3), np.float32), [1], None, SPEC)
    with pytest.raises(ValueError, match="placeholder"):
        fl.layout(_image(4, 4), [4], None, SPEC)


def test_hf_canvas_resize():
    spec = fl.hf_compatible(patch_size=4, tokens=TOKENS, canvas=(16, 24))
    small = _image(7, 10)
    np.testing.assert_array_equal(fl.resize_to_canvas(small, (16, 24)), small)
    big = _image(30, 20)
    assert fl.resize_to_canvas(big, (16, 24)).shape == (16, 10, 3)  # scale 16/30
    _, rows, cols = fl.image_patches(big, spec)
    assert (rows, cols) == (4, 3)
    # Without a canvas (our default) the image keeps its size.
    assert fl.image_patches(big, SPEC)[1:] == (8, 5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        fl.hf_compatible(patch_size=7)


def _examples():
    return [
        dict(image=_image(7, 10, seed=1), prompt=[10, 11], target=[20]),  # 8 + 4 + 2 = 14
        dict(image=_image(4, 4, seed=2), prompt=[12], target=[21, 22, 23]),  # 2 + 3 + 4 = 9
        dict(image=None, prompt=[13], target=[24]),  # 5
        dict(image=_image(13, 5, seed=3), prompt=[14], target=[25]),  # 12 + 3 + 2 = 17
    ]


def test_pack_first_fit_segments_and_positions():
    seqs = [fl.layout(e["image"], e["prompt"], e["target"], SPEC) for e in _examples()]
    lengths = [len(s["tokens"]) for s in seqs]
    assert lengths == [14, 9, 5, 17]
    batch = fl.pack(seqs, seq_len=24)
    # First fit: row 0 takes 14 + 9 = 23; the 5 does not fit its last slot, so row 1 holds
    # 5 + 17 = 22.
    assert batch["tokens"].shape == (2, 24)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 14 + [2] * 9 + [0])
    np.testing.assert_array_equal(batch["segment_ids"][1], [1] * 5 + [2] * 17 + [0] * 2)
    np.testing.assert_array_equal(batch["positions"][1, :5], np.arange(5))
    np.testing.assert_array_equal(batch["positions"][1, 5:22], np.arange(17))
    np.testing.assert_array_equal(batch["tokens"][1, 5:22], seqs[3]["tokens"])
    np.testing.assert_array_equal(batch["patches"][1, 5:22], seqs[3]["patches"])
    np.testing.assert_array_equal(batch["loss_mask"][0, 14:23], seqs[1]["loss_mask"])
    assert batch["tokens"][0, 23] == TOKENS.pad and not batch["loss_mask"][:, -2:].any()
    assert fl.efficiency(batch) == pytest.approx(45 / 48)
    assert set(batch) == set(fl.BATCH_KEYS)

    with pytest.raises(ValueError, match="does not fit seq_len=16"):
        fl.pack(seqs, seq_len=16)
    with pytest.raises(ValueError, match="does not fit in 1 rows"):
        fl.pack(seqs, seq_len=24, num_rows=1)
    assert fl.pack(seqs, seq_len=24, num_rows=3)["tokens"].shape == (3, 24)


def test_packed_batches_stream_every_example_once():
    examples = _examples() * 3
    batches = list(fl.packed_batches(examples, SPEC, seq_len=24, batch_size=2))
    assert all(b["tokens"].shape == (2, 24) for b in batches)
    found = []
    for b in batches:
        for row in range(2):
            for seg in range(1, b["segment_ids"][row].max() + 1):
                found.append(b["tokens"][row][b["segment_ids"][row] == seg].tolist())
    expected = [
        fl.layout(e["image"], e["prompt"], e["target"], SPEC)["tokens"].tolist() for e in examples
    ]
    # Batch by batch, row by row: here that is the input order (4 examples per batch).
    assert found == expected
    real = sum(len(t) for t in expected)
    assert np.mean([fl.efficiency(b) for b in batches]) == pytest.approx(real / (len(batches) * 48))


def test_prompt_batch_is_left_padded():
    examples = [dict(image=_image(7, 10), prompt=[10, 11]), dict(image=None, prompt=[12])]
    batch = fl.prompt_batch(examples, SPEC)
    first = fl.layout(examples[0]["image"], [10, 11], None, SPEC)["tokens"]
    assert batch["tokens"].shape == (2, len(first))
    np.testing.assert_array_equal(batch["tokens"][0], first)
    np.testing.assert_array_equal(batch["tokens"][1], [0] * (len(first) - 3) + [1, 12, 3])
    np.testing.assert_array_equal(batch["segment_ids"][1], [0] * (len(first) - 3) + [1] * 3)
    np.testing.assert_array_equal(batch["positions"][1, -3:], [0, 1, 2])
    assert fl.prompt_batch(examples, SPEC, length=20)["tokens"].shape == (2, 20)
    with pytest.raises(ValueError, match="shorter than the longest"):
        fl.prompt_batch(examples, SPEC, length=5)
