"""LoSiA's products (arXiv:2507.04487): a frozen matrix plus its subnet blocks, and the subnet
matmul with a custom VJP.

Both LoSiA methods leave the frozen params as they are (``apply`` only swaps in the
head) and replace ``vit.Linear.matmul`` of every target through a flax interceptor by
:func:`subnet_matmul`, ``y = x @ W`` with a custom VJP: ``dx = dy @ Wᵀ`` exactly, and

- LoSiA (``losia``): the dense weight gradient ``xᵀ dy`` of every layer (what autograd's full
  ``p.grad`` costs in the official code), read at the block;
- LoSiA-Pro (``losia_pro``, the official ``SelectiveLinearFunction``): only the block's,
  ``dB = x[:, R]ᵀ @ dy[:, C]`` (``(in, out)`` orientation: rows index ``x``'s features),
  ``2·tokens·p²·in·out`` instead of ``2·tokens·in·out`` FLOPs, and the dense ``xᵀ dy`` only
  for the layer that records importance (``lax.cond``).

The effective matrix is rebuilt by one scatter in the forward and again in the backward (no
dense copy is held between them). A custom VJP rather than autodiff through merged kernels for
LoSiA too: with the latter, XLA:CPU wrote each MLP gradient transposed (a slow strided copy per
layer), and the step cost 1.27× full fine-tuning's; with the custom VJP it costs less than full
fine-tuning's (``python -m benchmarks.step_bench --group losia``, docs/speed.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def effective_matrix(w0, rows, cols, block, res_rows=None, res_cols=None, res_vals=None):
    """``w0`` (an ``(in, out)`` matrix) with each retired block and ``block`` added at its
    ``rows × cols``, in one scatter-add (rows equal to ``in`` mark an empty retired slot and are
    dropped). The one definition that the forward, ``merge`` and artifact loading share: with
    the same ring shape they give bitwise equal matrices."""
    block = block.astype(w0.dtype)
    if res_rows is None or res_rows.shape[0] == 0:
        return w0.at[rows[:, None], cols[None, :]].add(block, mode="drop")
    r = jnp.concatenate([res_rows, rows[None]])[:, :, None]
    c = jnp.concatenate([res_cols, cols[None]])[:, None, :]
    v = jnp.concatenate([res_vals.astype(w0.dtype), block[None]])
    shape = v.shape
    return w0.at[jnp.broadcast_to(r, shape), jnp.broadcast_to(c, shape)].add(v, mode="drop")


def _dims_in(x):
    return x.reshape(-1, x.shape[-1])


# The backward's form, a static ``(dense, tap)``: ``dense`` computes the full ``xᵀ dy`` of every
# call and reads the block from it (LoSiA: autograd's full weight gradient in the official code),
# otherwise only ``x[:, R]ᵀ dy[:, C]`` (LoSiA-Pro); ``tap``: a probe receives ``xᵀ dy`` when
# ``record`` (else zeros). Only LoSiA-Pro without a probe saves ``x[:, R]`` instead of ``x``.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _subnet_matmul(form, x, w0, rows, cols, block, retired, probe, record):
    del form, probe, record
    return x @ effective_matrix(w0, rows, cols, block, *retired)


def _subnet_fwd(form, x, w0, rows, cols, block, retired, probe, record):
    dense, tap = form
    y = x @ effective_matrix(w0, rows, cols, block, *retired)
    saved = x if dense or tap else jnp.take(x, rows, axis=-1)
    return y, (saved, w0, rows, cols, block, retired, record)


def _subnet_bwd(form, res, dy):
    dense, tap = form
    saved, w0, rows, cols, block, retired, record = res
    dx = (dy @ effective_matrix(w0, rows, cols, block, *retired).T).astype(saved.dtype)
    dy2 = _dims_in(dy)
    contract = (((0,), (0,)), ((), ()))
    full = lambda: jax.lax.dot_general(
        _dims_in(saved), dy2, contract, preferred_element_type=jnp.float32
    )
    dprobe = None
    if dense:
        dw = full()
        dblock = dw[rows[:, None], cols[None, :]]
        if tap:
            dprobe = jnp.where(record, dw, 0.0)
    else:
        xr = _dims_in(jnp.take(saved, rows, axis=-1) if tap else saved)
        dblock = jax.lax.dot_general(
            xr, jnp.take(dy2, cols, axis=-1), contract, preferred_element_type=jnp.float32
        )
        if tap:
            dprobe = jax.lax.cond(record, full, lambda: jnp.zeros(w0.shape, jnp.float32))
    dblock = dblock.astype(block.dtype)
    return dx, None, None, None, dblock, (None,) * len(retired), dprobe, None


_subnet_matmul.defvjp(_subnet_fwd, _subnet_bwd)


def subnet_matmul(
    x: jax.Array,
    w0: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    block: jax.Array,
    retired: tuple = (),
    *,
    probe: jax.Array | None = None,
    record: jax.Array | bool = False,
    dense_grad: bool = False,
) -> jax.Array:
    """LoSiA-Pro's product ``x @ W`` with ``W = effective_matrix(w0, rows, cols, block,
    *retired)`` and a custom VJP (the official ``SelectiveLinearFunction``).

    The backward gives ``dx = dy @ Wᵀ`` (exact), ``d block = x[:, rows]ᵀ @ dy[:, cols]``
    (float32 accumulation), no gradient for ``w0``, the indices or the retired blocks, and, when
    ``probe`` is given, ``d probe = xᵀ dy`` if ``record`` else zeros (a dense-gradient tap: the
    probe's value is not used in the forward). Without a probe only ``x[:, rows]`` is saved for
    the backward; with one, ``x``.

    Args:
      x: ``(..., in)`` activations.
      w0: ``(in, out)`` frozen matrix.
      rows, cols: ``(kr,)``, ``(kc,)`` int32 subnet indices.
      block: ``(kr, kc)`` trainable values.
      retired: ``()`` or ``(res_rows (H, kr), res_cols (H, kc), res_vals (H, kr, kc))``.
      probe: optional ``(in, out)`` leaf whose cotangent receives the dense weight gradient.
      record: traced bool: whether this product's dense gradient goes to ``probe``.

    >>> x, w0 = jnp.ones((2, 4)), jnp.zeros((4, 3))
    >>> y = subnet_matmul(x, w0, jnp.array([1]), jnp.array([2]), jnp.full((1, 1), 5.0))
    >>> y[0].tolist()
    [0.0, 0.0, 5.0]
    """
    if w0.ndim != 2 or x.shape[-1] != w0.shape[0]:
        raise ValueError(f"x {x.shape} @ w0 {w0.shape}: need w0 (in, out) with in = x.shape[-1]")
    if block.shape != rows.shape + cols.shape:
        raise ValueError(f"block {block.shape} != rows {rows.shape} x cols {cols.shape}")
    form = (bool(dense_grad), probe is not None)
    probe = jnp.zeros((0,), jnp.float32) if probe is None else probe
    record = jnp.asarray(record, bool)
    return _subnet_matmul(form, x, w0, rows, cols, block, tuple(retired), probe, record)
