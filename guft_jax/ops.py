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
    gradient (it is frozen). Where the selected density exceeds a backend-dependent break-even
    (``GATHER_MAX_DENSITY``), the weight gradient is formed densely and read at the entries
    instead, which is faster there. Padding slots use ``rows == w0.shape[0]`` (out of range):
    they are dropped from the scatter and get a zero gradient.

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
    # Keep w0 (the frozen param, alive anyway) rather than the densified copy: the backward
    # re-applies the cheap scatter, so no extra dense weight per layer is held for the backward.
    return x @ _densify(w0, rows, cols, values), (x, w0, rows, cols, values)


# Above this density (selected entries / matrix entries) the weight gradient is computed densely
# and then read at the selected entries. Gathering a token-length column of x and of dy per entry
# is memory-bound. Measured with benchmarks/step_bench.py at GUFT's 0.34%: on 2 CPU cores it loses
# to one dense matmul already at ~0.07% density (2x400-element gathers of 6,304 tokens cost more
# than the 384x1536 dW matmul); on one H100 (ViT-B/16, batch 64, 12,608 tokens) the gather path's
# step was 2.1x full fine-tuning's, the dense-dW path's far less (benchmarks/results/).
GATHER_MAX_DENSITY = {"cpu": 0.0005, "gpu": 0.0005}
DEFAULT_GATHER_MAX_DENSITY = 0.05


def _use_gather(capacity: int, d_in: int, d_out: int) -> bool:
    limit = GATHER_MAX_DENSITY.get(jax.default_backend(), DEFAULT_GATHER_MAX_DENSITY)
    return capacity <= limit * d_in * d_out


def _bwd(res, dy):
    x, w0, rows, cols, values = res
    w = _densify(w0, rows, cols, values)
    dx = dy @ w.T
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    if _use_gather(rows.shape[0], *w.shape):
        # rows of the transposed activations are contiguous token vectors
        xr = jnp.take(x2.T, rows, axis=0, mode="fill", fill_value=0)
        dyc = jnp.take(dy2.T, cols, axis=0, mode="fill", fill_value=0)
        dvalues = jnp.sum(xr * dyc, axis=1)
    else:
        dw = x2.T @ dy2
        dvalues = dw.at[rows, cols].get(mode="fill", fill_value=0)
    return dx, jnp.zeros_like(w), None, None, dvalues


sparse_delta_matmul.defvjp(_fwd, _bwd)
