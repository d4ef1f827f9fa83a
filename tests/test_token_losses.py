"""Cross-entropy and next-token losses (vlmjax/losses.py) against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_numpy(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, 7)
    target = np.eye(5)[labels] * (1 - smoothing) + smoothing / 5
    expected = -(target * _log_softmax(logits.astype(np.float64))).sum(-1)
    got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), labels,
                               smoothing)  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=2e-2)  # bf16-rounded logits
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, smoothing), expected,
                               rtol=1e-5)  # fmt: skip
    assert losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels).dtype == jnp.float32


def test_next_token_loss_matches_numpy_and_its_gradient():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    targets = rng.integers(0, 9, (2, 6))
    mask = (rng.random((2, 6)) < 0.5).astype(np.int32)
    mask[0, 0] = 1
    nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[
        ..., 0
    ]
    expected = (nll * mask).sum() / mask.sum()
    accuracy = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
    loss, metrics = losses.next_token_loss(logits=logits, targets=targets, loss_mask=mask)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(accuracy)
    assert float(metrics["tokens"]) == mask.sum()
    np.testing.assert_allclose(losses.token_nll(logits, targets), nll, rtol=1e-5)
    # d loss / d logits = (softmax - one_hot) * mask / count, zero off the mask.
    grad = jax.grad(lambda x: losses.next_token_loss(logits=x, targets=targets, loss_mask=mask)[0])(
        logits
    )
    softmax = np.exp(_log_softmax(logits.astype(np.float64)))
    want = (softmax - np.eye(9)[targets]) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, want, atol=1e-6)
    empty, _ = losses.next_token_loss(logits=logits, targets=targets, loss_mask=0 * mask)
    assert float(empty) == 0.0
