"""GUFT's sparse-delta matmul: ``x @ (W0 + S)`` whose backward forms ``dS`` only at ``S``'s entries.

:func:`sparse_delta_matmul` is ``y = x @ (W0 + S)`` with ``S`` a fixed-capacity sparse delta;
its custom VJP computes ``dx`` in full and the weight gradient only at the selected entries, an
SDDMM (:mod:`guft_jax.sddmm`). The kernel choices are explicit arguments: the SDDMM ``impl``,
whether a block is taken (``block_max_fraction``), how it runs (``block_forward``) and where
"gather" gives way to the dense dW matmul (``gather_max_density``); their per-backend defaults
are the read-only tables of :mod:`guft_jax.kernels`, and :func:`kernel_arguments` turns a
:class:`~guft_jax.kernels.KernelOptions` into these arguments.

The SDDMM kernels (``sddmm``, ``block_sddmm``, ``block_covers``, ``block_of``) and attention
(``attention``, ``attention_einsum``) are re-exported here from :mod:`guft_jax.sddmm` and
:mod:`guft_jax.attention`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# The ``x as x`` imports are re-exports (``ops.sddmm``, ``ops.attention``, ... keep working);
# they are documented in their own modules.
from guft_jax import kernels
from guft_jax.attention import ATTENTION_IMPLS as ATTENTION_IMPLS
from guft_jax.attention import attention as attention
from guft_jax.attention import attention_einsum as attention_einsum
from guft_jax.sddmm import DEFAULT_TILING, Tiling, block_positions, resolve_sddmm_impl
from guft_jax.sddmm import SDDMM_IMPLS as SDDMM_IMPLS
from guft_jax.sddmm import block_covers as block_covers
from guft_jax.sddmm import block_of as block_of
from guft_jax.sddmm import block_sddmm as block_sddmm
from guft_jax.sddmm import sddmm as sddmm

Array = jax.Array

BLOCK_MAX_FRACTION = kernels.BLOCK_MAX_FRACTION
GATHER_MAX_DENSITY = kernels.GATHER_MAX_DENSITY


def kernel_arguments(
    options: kernels.KernelOptions | Mapping[str, Any] | None = None, backend: str | None = None
) -> dict[str, Any]:
    """The keyword arguments of :func:`sparse_delta_matmul` that ``options`` stand for.

    Args:
      options: kernel choices (a mapping of their fields is accepted; ``"auto"`` fields: the
        backend's defaults); None: all defaults.
      backend: a JAX platform name; defaults to ``jax.default_backend()``.

    Returns:
      ``{"impl", "block_forward", "block_max_fraction", "gather_max_density"}``.

    >>> kernel_arguments(kernels.KernelOptions(sddmm="dense", block_forward="on"))["impl"]
    'dense'
    """
    options = kernels.resolve(options, backend)
    return {
        "impl": options.sddmm,
        "block_forward": options.block_forward == "on",
        "block_max_fraction": options.block_max_fraction,
        "gather_max_density": options.gather_max_density,
    }


def sparse_delta_matmul(
    x: Array,
    w0: Array,
    rows: Array,
    cols: Array,
    values: Array,
    *,
    impl: str = "auto",
    block: tuple[Array, Array] | None = None,
    block_forward: bool | None = None,
    block_max_fraction: float = BLOCK_MAX_FRACTION,
    gather_max_density: float | None = None,
    tiling: Tiling = DEFAULT_TILING,
) -> Array:
    """``x @ (w0 + S)`` where ``S`` holds ``values`` at ``(rows, cols)`` and is zero elsewhere.

    GUFT's sparse path. The backward computes ``dx`` in full (``dy @ (w0 + S)ᵀ``, exactly the
    dense gradient) but the weight gradient only at the selected entries, ``d values_k =
    Σ_tokens x[:, rows_k] · dy[:, cols_k]`` (an SDDMM, accumulated in float32). Only ``x``,
    ``w0`` and the sparse triplet are saved for the backward (the densified weight is rebuilt
    there, not held). ``w0`` is frozen: its cotangent is zero. Padding slots use
    ``rows == w0.shape[0]`` (out of range): they are dropped from the scatter and get a zero
    gradient. Duplicate ``(row, col)`` pairs add up in the forward and each receives the full
    gradient of that weight entry.

    Args:
      x: ``(..., in)`` activations.
      w0: ``(in, out)`` frozen weight.
      rows: ``(capacity,)`` int32 row coordinates in ``[0, in]`` (``in`` = padding).
      cols: ``(capacity,)`` int32 column coordinates in ``[0, out)``.
      values: ``(capacity,)`` deltas (cast to ``w0.dtype`` in the forward).
      impl: the weight-gradient SDDMM outside a block: "auto" (the backend's,
        :data:`guft_jax.kernels.SDDMM_DEFAULTS`), "gather", "dense", "pallas" (a Triton kernel
        on GPU, interpret mode on CPU) or "block" (always the block; needs ``block``).
      block: ``(brows, bcols)``, int32, each sorted ascending and padded with ``in`` / ``out``:
        the rows and columns the valid entries lie in (:func:`block_sddmm`). Taken where
        :func:`block_pays`.
      block_forward: with the block taken, True adds the block's part to ``x @ w0`` in both
        passes (no densified weight), False densifies and takes only the weight gradient on
        the block; None: :data:`guft_jax.kernels.BLOCK_FORWARD_DEFAULTS`.
      block_max_fraction: the block is taken where ``R·C <= block_max_fraction · in·out``.
      gather_max_density: "gather" becomes "dense" where ``capacity / (in·out)`` exceeds it;
        None: :data:`guft_jax.kernels.GATHER_MAX_DENSITY` for "auto", no limit for "gather".
      tiling: tile sizes of the "gather" and "pallas" SDDMMs.

    Returns:
      ``(..., out)`` in the dtype of ``x @ w0``.

    Raises:
      ValueError: for an unknown ``impl``, "block" without ``block``, or mismatched shapes.
      NotImplementedError: ``impl="pallas"`` on TPU.

    >>> x, w0 = jnp.ones((2, 3)), jnp.zeros((3, 4))
    >>> rows, cols = jnp.array([0, 3], jnp.int32), jnp.array([1, 0], jnp.int32)
    >>> sparse_delta_matmul(x, w0, rows, cols, jnp.array([2.0, 5.0]))[0].tolist()
    [0.0, 2.0, 0.0, 0.0]
    """
    if w0.ndim != 2 or x.shape[-1] != w0.shape[0]:
        raise ValueError(f"x {x.shape} @ w0 {w0.shape}: need w0 (in, out) with in = x.shape[-1]")
    if not (rows.shape == cols.shape == values.shape and rows.ndim == 1):
        raise ValueError(
            f"rows {rows.shape}, cols {cols.shape}, values {values.shape}: need equal 1-D shapes"
        )
    impl = _plan(impl, w0, rows, block, block_forward, block_max_fraction, gather_max_density)
    if impl not in ("block", "block_dw"):
        block = None
    return _sparse_delta_matmul((impl, tiling), x, w0, rows, cols, values, block)


def _plan(impl, w0, rows, block, block_forward, block_max_fraction, gather_max_density) -> str:
    """The implementation one layer runs: "gather", "dense", "pallas", "block" (no densified
    weight) or "block_dw" (densified passes, the weight gradient on the block)."""
    if impl == "block" and block is None:
        raise ValueError('sparse_delta_matmul(impl="block") needs block=(brows, bcols)')
    if impl == "block" or (
        block is not None and block_pays(block, w0, block_max_fraction=block_max_fraction)
    ):
        if block_forward is None:
            block_forward = kernels.default("block_forward") == "on"
        return "block" if block_forward else "block_dw"
    density = rows.shape[0] / max(w0.size, 1)
    impl = resolve_sddmm_impl(impl, density=density, gather_max_density=gather_max_density)
    if impl == "pallas" and jax.default_backend() == "tpu":
        raise NotImplementedError(
            'sparse_delta_matmul(impl="pallas") lowers through Triton (GPU) only; on TPU use '
            '"dense" (what "auto" picks there)'
        )
    return impl


def block_pays(
    block: tuple[Array, Array], w0: Array, *, block_max_fraction: float = BLOCK_MAX_FRACTION
) -> bool:
    """Whether the block SDDMM is taken for ``w0`` (static: the block's capacities).

    Args:
      block: ``(brows, bcols)`` as in :func:`sparse_delta_matmul`.
      w0: the ``(in, out)`` weight.
      block_max_fraction: the largest ``R·C / (in·out)`` taken; 0 never takes a block.

    Returns:
      True where ``R·C <= block_max_fraction · in·out`` and ``block_max_fraction > 0``.

    >>> block_pays((jnp.zeros(2), jnp.zeros(3)), jnp.zeros((4, 4)))
    True
    """
    brows, bcols = block
    size = brows.shape[0] * bcols.shape[0]
    return block_max_fraction > 0 and size <= block_max_fraction * w0.size


def _densify(w0: Array, rows: Array, cols: Array, values: Array) -> Array:
    return w0.at[rows, cols].add(values.astype(w0.dtype), mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_delta_matmul(plan, x, w0, rows, cols, values, block):
    return _fwd(plan, x, w0, rows, cols, values, block)[0]


def _fwd(plan, x, w0, rows, cols, values, block):
    if plan[0] == "block":
        # x @ w0 plus the block's part, scattered into its columns: no dense copy of the weight
        # in either pass, and the backward keeps only x's block columns (not x).
        xs = jnp.take(x, block[0], axis=-1, mode="fill", fill_value=0)
        sb = _block_matrix(w0.shape, rows, cols, values.astype(w0.dtype), *block)
        y = x @ w0
        y = y.at[..., block[1]].add((xs @ sb).astype(y.dtype), mode="drop", indices_are_sorted=True)
        return y, (xs, w0, rows, cols, values, block)
    # Keep w0 (the frozen param, alive anyway) rather than the densified copy: the backward
    # re-applies the cheap scatter.
    return x @ _densify(w0, rows, cols, values), (x, w0, rows, cols, values, block)


def _bwd(plan, res, dy):
    impl, tiling = plan
    x, w0, rows, cols, values, block = res
    nb = None if block is None else (None, None)
    if impl == "block":
        xs = x  # (..., R): the block's columns of x, saved by the forward
        dys = jnp.take(dy, block[1], axis=-1, mode="fill", fill_value=0)
        sb = _block_matrix(w0.shape, rows, cols, values.astype(w0.dtype), *block)
        dx = dy @ w0.T
        dx = dx.at[..., block[0]].add((dys @ sb.T).astype(dx.dtype), mode="drop",
                                      indices_are_sorted=True)  # fmt: skip
        dvalues = block_sddmm(
            xs.reshape(-1, xs.shape[-1]), dys.reshape(-1, dys.shape[-1]), rows, cols, *block,
            shape=w0.shape,
        )  # fmt: skip
        return dx, jnp.zeros_like(w0), None, None, dvalues.astype(values.dtype), nb
    dx = dy @ _densify(w0, rows, cols, values).T
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    if impl == "block_dw":
        dvalues = block_sddmm(x2, dy2, rows, cols, *block)
    else:
        dvalues = sddmm(x2, dy2, rows, cols, impl=impl, tiling=tiling)
    return dx, jnp.zeros_like(w0), None, None, dvalues.astype(values.dtype), nb


def _block_matrix(shape, rows, cols, values, brows, bcols):
    """The ``(R, C)`` dense block of ``S`` (duplicates add up, padding and strays dropped)."""
    ri, ci, valid = block_positions(shape, rows, cols, brows, bcols)
    sb = jnp.zeros((brows.shape[0], bcols.shape[0]), values.dtype)
    return sb.at[ri, ci].add(jnp.where(valid, values, 0))


_sparse_delta_matmul.defvjp(_fwd, _bwd)


def dense_delta_reference(w0: Array, rows: Array, cols: Array, values: Array) -> Array:
    """The densified weight ``w0 + S`` (padding entries dropped), as a plain array.

    >>> dense_delta_reference(jnp.zeros((2, 2)), jnp.array([1, 2]), jnp.array([0, 0]),
    ...                       jnp.array([3.0, 4.0])).tolist()
    [[0.0, 0.0], [3.0, 0.0]]
    """
    return _densify(jnp.asarray(w0), rows, cols, values)


__all__ = [
    "BLOCK_MAX_FRACTION",
    "GATHER_MAX_DENSITY",
    "block_pays",
    "dense_delta_reference",
    "kernel_arguments",
    "sparse_delta_matmul",
]
