"""sparse_delta_matmul: forward equals the dense matmul, gradients equal the dense gradient
gathered at the selected entries, and padding slots are inert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import ops


def _setup(seed=0, d_in=6, d_out=5, cap=7, n_pad=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 4, d_in)).astype(np.float32)
    w0 = rng.normal(size=(d_in, d_out)).astype(np.float32)
    flat = rng.choice(d_in * d_out, size=cap - n_pad, replace=False)
    rows = np.concatenate([flat // d_out, np.full(n_pad, d_in)]).astype(np.int32)
    cols = np.concatenate([flat % d_out, np.zeros(n_pad)]).astype(np.int32)
    values = rng.normal(size=cap).astype(np.float32)
    return x, w0, rows, cols, values


def test_forward_matches_dense():
    x, w0, rows, cols, values = _setup()
    dense = w0.copy()
    for r, c, v in zip(rows, cols, values, strict=True):
        if r < w0.shape[0]:
            dense[r, c] += v
    y = ops.sparse_delta_matmul(x, w0, rows, cols, values)
    np.testing.assert_allclose(y, x @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gather_limit", [1.0, 0.0])  # the gather path and the dense-dW path
def test_gradients_match_dense_gather_and_padding_is_inert(gather_limit, monkeypatch):
    monkeypatch.setitem(ops.GATHER_MAX_DENSITY, jax.default_backend(), gather_limit)
    x, w0, rows, cols, values = _setup(seed=1)
    tgt = np.random.default_rng(2).normal(size=(3, 4, w0.shape[1])).astype(np.float32)

    def loss_sparse(x, values):
        return jnp.sum((ops.sparse_delta_matmul(x, w0, rows, cols, values) - tgt) ** 2)

    def loss_dense(x, w):
        return jnp.sum((x @ w - tgt) ** 2)

    valid = rows < w0.shape[0]
    w = jnp.asarray(w0).at[rows[valid], cols[valid]].add(values[valid])
    gx, gv = jax.grad(loss_sparse, argnums=(0, 1))(x, values)
    gx_ref, gw_ref = jax.grad(loss_dense, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gv[valid], gw_ref[rows[valid], cols[valid]], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(gv)[~valid] == 0.0)
