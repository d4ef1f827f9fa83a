"""Generation: KV-cache decoding equals full recomputation, over images of different sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import generate
from vlmjax.data import fuyu_layout as fl
from vlmjax.models import fuyu

TINY = dict(vocab_size=64, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4)
SPEC = fl.LayoutSpec(patch_size=4, tokens=fl.Tokens(image=4, newline=5, bos=1, eos=2, boa=3))
STEPS = 8


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


EXAMPLES = [
    dict(image=_image(7, 10, 1), prompt=[10, 11]),  # 2 x 3 patches
    dict(image=_image(16, 4, 2), prompt=[12]),  # 4 x 1 patches: the longest prompt
    dict(image=None, prompt=[13, 14, 15]),  # text only: the most left padding
]


@pytest.fixture(scope="module")
def tiny():
    model = fuyu.FuyuDecoder(**TINY)
    batch = fl.prompt_batch(EXAMPLES, SPEC)
    variables = nn.meta.unbox(model.init(jax.random.key(1), **fuyu.model_inputs(batch)))
    # Larger weights than the 0.02-scale init, so that greedy decoding does not settle on
    # one token and a wrong position or cache slot changes the output.
    variables = jax.tree.map(lambda x: x * 3.0, variables)
    return model, variables, batch


def _recompute(model, variables, batch, steps):
    """Greedy decoding without a cache: every step runs the whole sequence again.

    The sequence lives in a fixed buffer [b, P + steps] (one compilation); slots not yet
    generated have segment 0 and come after every real token, so causality hides them.
    """
    b, prompt_len = batch["tokens"].shape
    grow = (
        lambda x, fill=0: np.concatenate(  # noqa: E731
            [x, np.full((b, steps) + x.shape[2:], fill, x.dtype)], axis=1
        )
    )
    buf = {k: grow(np.asarray(batch[k])) for k in fuyu.INPUT_KEYS}
    apply = jax.jit(model.apply)
    out = np.zeros((b, steps), np.int32)
    for s in range(steps):
        logits = np.asarray(apply(variables, **buf))
        out[:, s] = logits[:, prompt_len - 1 + s].argmax(-1)
        buf["tokens"][:, prompt_len + s] = out[:, s]
        buf["segment_ids"][:, prompt_len + s] = 1
        buf["positions"][:, prompt_len + s] = batch["positions"][:, -1] + 1 + s
    return out


@pytest.fixture(scope="module")
def recomputed(tiny):
    return _recompute(*tiny, STEPS)


def test_kv_cache_decoding_equals_full_recomputation(tiny, recomputed):
    model, variables, batch = tiny
    got = np.asarray(generate.generate(model, variables, batch, max_new_tokens=STEPS, eos_id=None))
    assert got.dtype == np.int32 and got.shape == (3, STEPS)
    np.testing.assert_array_equal(got, recomputed)
    assert all(len(set(row)) > 2 for row in recomputed.tolist())  # not one repeated token


def test_batched_equals_one_at_a_time(tiny, recomputed):
    """Neither the other rows nor the amount of left padding change a row's tokens."""
    model, variables, batch = tiny
    for i, example in enumerate(EXAMPLES):
        # More left padding than in the batch; one length for all, so one compilation.
        alone = fl.prompt_batch([example], SPEC, length=batch["tokens"].shape[1] + 3)
        got = generate.generate(model, variables, alone, max_new_tokens=STEPS, eos_id=None)
        np.testing.assert_array_equal(np.asarray(got)[0], recomputed[i])


def test_rows_stop_at_eos(tiny, recomputed):
    model, variables, batch = tiny
    # Row 2's second token, which every row produces at a different step (rows stop at
    # different times; the loop runs until the last one does).
    eos = int(recomputed[2, 1])
    stops = [row.index(eos) if eos in row else None for row in recomputed.tolist()]
    assert None not in stops and len(set(stops)) == 3, stops
    got = np.asarray(generate.generate(model, variables, batch, max_new_tokens=STEPS, eos_id=eos))
    for row, ref in zip(got.tolist(), recomputed.tolist(), strict=True):
        end = ref.index(eos) + 1 if eos in ref else STEPS
        assert row == ref[:end] + [SPEC.tokens.pad] * (STEPS - end)
    assert generate.trim(got, eos_id=eos) == [
        ref[:stop] for ref, stop in zip(recomputed.tolist(), stops, strict=True)
    ]


def test_sampling(tiny, recomputed):
    model, variables, batch = tiny
    run = lambda **kw: np.asarray(  # noqa: E731
        generate.generate(model, variables, batch, max_new_tokens=STEPS, eos_id=None, **kw)
    )
    # top_k=1 is greedy at any temperature; a fixed key reproduces a sample.
    np.testing.assert_array_equal(run(temperature=2.0, top_k=1), recomputed)
    a = run(temperature=1.5, rng=jax.random.key(3))
    np.testing.assert_array_equal(a, run(temperature=1.5, rng=jax.random.key(3)))
    assert (a != run(temperature=1.5, rng=jax.random.key(4))).any()

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    drawn = np.asarray(generate.sample_logits(logits, keys, temperature=1.0))
    np.testing.assert_allclose(
        np.bincount(drawn, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03
    )
    top2 = np.asarray(generate.sample_logits(logits, keys, temperature=1.0, top_k=2))
    assert set(top2.tolist()) == {0, 1}
    np.testing.assert_allclose((top2 == 0).mean(), 0.5 / 0.8, atol=0.03)
    np.testing.assert_array_equal(generate.sample_logits(logits[:2], keys), [0, 0])


def test_bad_arguments(tiny):
    model, variables, batch = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate.generate(model, variables, batch, max_new_tokens=0)
    with pytest.raises(ValueError, match="lacks.*positions"):
        generate.generate(
            model, variables, {k: v for k, v in batch.items() if k != "positions"}, max_new_tokens=2
        )
