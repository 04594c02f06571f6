"""guft_jax.saliency.compute with targets that are not class indices (issue 23: they were cast
to int32, so regression targets and soft labels reached the loss truncated)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import saliency


def _problem(target_shape):
    rng = np.random.default_rng(0)
    theta = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.uniform(0.1, 0.9, size=(10, *target_shape)).astype(np.float32)  # truncates to 0
    return theta, x, y


def _regression(theta, x, y):
    pred = x @ theta["w"] + theta["b"]
    if y.ndim == 1:  # a scalar target per example
        return (jnp.sum(pred, -1) - y) ** 2
    return -jnp.sum(y * jax.nn.log_softmax(pred), -1)  # soft labels (B, C)


@pytest.mark.parametrize("target_shape", [(), (3,)], ids=["regression", "soft_labels"])
@pytest.mark.parametrize("mode", ["batch", "example"])
def test_float_targets_reach_the_loss_unchanged(target_shape, mode):
    theta, x, y = _problem(target_shape)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # the last one is padded
    g, info = saliency.compute(_regression, theta, batches, mode=mode, chunk=2)
    ref = jax.tree.map(jnp.zeros_like, theta)
    for xb, yb in batches:
        if mode == "batch":
            parts = [jax.grad(lambda t, xb=xb, yb=yb: jnp.mean(_regression(t, xb, yb)))(theta)]
        else:
            parts = [
                jax.grad(
                    lambda t, i=i, xb=xb, yb=yb: _regression(t, xb[i : i + 1], yb[i : i + 1])[0]
                )(theta)
                for i in range(len(xb))
            ]
        for gb in parts:
            ref = jax.tree.map(lambda a, b: a + jnp.abs(b), ref, gb)
    assert info["num_examples"] == 10 and info["num_batches"] == 3
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_integer_labels_still_arrive_as_int32():
    seen = []

    def loss(theta, x, y):
        seen.append(y.dtype)
        return jnp.sum(x, -1) * theta["s"] + 0 * y

    batches = [(np.ones((2, 3), np.float32), np.array([1, 2], np.int64))]
    saliency.compute(loss, {"s": jnp.ones(())}, batches)
    assert seen == [jnp.int32]
