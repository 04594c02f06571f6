"""Low-level ops shared by the model and the methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def sparse_delta_matmul(x: Array, w0: Array, rows: Array, cols: Array, values: Array) -> Array:
    """``x @ (w0 + S)`` where ``S`` holds ``values`` at ``(rows, cols)`` and is zero elsewhere.

    The backward pass computes ``dx`` in full but the weight gradient only at the selected entries,
    ``d values_k = sum_tokens x[:, rows_k] * dy[:, cols_k]``, so no dense ``(in, out)`` weight
    gradient is formed (the idea of SPT's SparseGradLinear and LoSiA-Pro). ``w0`` receives no
    gradient (it is frozen). Padding slots use ``rows == w0.shape[0]`` (out of range): they are
    dropped from the scatter and get a zero gradient.

    Args:
      x: ``(..., in)`` activations.
      w0: ``(in, out)`` frozen weight.
      rows, cols: ``(capacity,)`` int32 coordinates.
      values: ``(capacity,)`` deltas.
    Returns:
      ``(..., out)``.
    """
    return x @ _densify(w0, rows, cols, values)


def _densify(w0: Array, rows: Array, cols: Array, values: Array) -> Array:
    w0 = jnp.asarray(w0)
    return w0.at[rows, cols].add(jnp.asarray(values).astype(w0.dtype), mode="drop")


def _fwd(x, w0, rows, cols, values):
    w = _densify(w0, rows, cols, values)
    return x @ w, (x, w, rows, cols)


def _bwd(res, dy):
    x, w, rows, cols = res
    dx = dy @ w.T
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    xr = jnp.asarray(x2).at[:, rows].get(mode="fill", fill_value=0)
    dyc = jnp.asarray(dy2).at[:, cols].get(mode="fill", fill_value=0)
    dvalues = jnp.einsum("tk,tk->k", xr, dyc)
    return dx, jnp.zeros_like(w), None, None, dvalues


sparse_delta_matmul.defvjp(_fwd, _bwd)
