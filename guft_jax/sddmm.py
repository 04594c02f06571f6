"""SDDMM kernels: the weight gradient ``(xᵀ @ dy)[rows, cols]`` at chosen entries only.

A sampled dense-dense product, ``out_k = Σ_t x[t, rows_k] · dy[t, cols_k]`` (the idea of SPT's
SparseGradLinear, arXiv:2303.08566, and of LoSiA-Pro, arXiv:2507.04487), in interchangeable
implementations:

- ``"gather"``: entries in fixed-size chunks; per chunk the token vectors ``xᵀ[r_k]`` and
  ``dyᵀ[c_k]`` are gathered as contiguous rows of the transposed activations and contracted in a
  fused multiply-reduce, so no ``(capacity, tokens)`` array is materialised.
- ``"dense"``: the full ``xᵀ dy`` (one matmul) read at the entries; the right choice where a
  matrix unit makes the matmul nearly free (TPU) or the density is high.
- ``"block"`` (:func:`block_sddmm`): saliency-selected entries cluster in few rows and columns,
  so the rows × columns they touch form a small dense sub-matrix: one ``(R, T) @ (T, C)`` matmul
  of the gathered activation columns, read at the entries.
- ``"pallas"``: a Pallas kernel (Triton lowering on GPU; ``interpret=True`` elsewhere, for
  tests) over blocks of row-sorted entries × token splits, accumulating in float32.

Which one ``"auto"`` means per backend is :data:`guft_jax.kernels.SDDMM_DEFAULTS`. Tile sizes
are a :class:`Tiling` argument with constant defaults.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from guft_jax import kernels

Array = jax.Array

SDDMM_IMPLS = ("auto", "gather", "dense", "pallas", "block")


class Tiling(NamedTuple):
    """Tile sizes of the "gather" and "pallas" SDDMMs (hashable: a static argument).

    Attributes:
      gather_chunk: entries per loop step of "gather": large enough to amortise the loop, small
        enough that a chunk's gathered rows stay in cache (32-512 within noise on 2 CPU cores).
      pallas_block_k: entries per Pallas program.
      pallas_block_t: tokens per inner step of a Pallas program.
      pallas_token_splits: token splits run as separate programs (partial sums added
        afterwards), so a GPU has enough programs in flight.
    """

    gather_chunk: int = 256
    pallas_block_k: int = 64
    pallas_block_t: int = 128
    pallas_token_splits: int = 8


DEFAULT_TILING = Tiling()


def resolve_sddmm_impl(
    impl: str = "auto",
    backend: str | None = None,
    *,
    density: float | None = None,
    gather_max_density: float | None = None,
) -> str:
    """The concrete SDDMM implementation ``impl`` stands for on ``backend``.

    Args:
      impl: one of :data:`SDDMM_IMPLS`.
      backend: a JAX platform name; defaults to ``jax.default_backend()``.
      density: the layer's capacity as a fraction of its weight entries, if known.
      gather_max_density: a "gather" becomes "dense" where ``density`` exceeds it. None:
        :data:`guft_jax.kernels.GATHER_MAX_DENSITY` where ``impl`` is "auto", no limit for an
        explicit "gather".

    Returns:
      "gather", "dense" or "pallas" ("block" stays "block").

    Raises:
      ValueError: for an unknown ``impl``.

    >>> resolve_sddmm_impl("dense")
    'dense'
    >>> resolve_sddmm_impl("auto", "cpu", density=0.5)
    'dense'
    """
    if impl not in SDDMM_IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; allowed: {', '.join(SDDMM_IMPLS)}")
    if gather_max_density is None:
        gather_max_density = kernels.GATHER_MAX_DENSITY if impl == "auto" else 1.0
    if impl == "auto":
        impl = kernels.default("sddmm", backend)
    if impl == "gather" and density is not None and density > gather_max_density:
        return "dense"
    return impl


def sddmm(
    x: Array,
    dy: Array,
    rows: Array,
    cols: Array,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    block: tuple[Array, Array] | None = None,
    tiling: Tiling = DEFAULT_TILING,
) -> Array:
    """Sampled dense-dense product ``out_k = Σ_t x[t, rows_k] · dy[t, cols_k]`` in float32.

    This is ``(xᵀ @ dy)[rows, cols]`` without forming ``xᵀ @ dy`` (except for ``impl="dense"``):
    the weight gradient of ``y = x @ W`` at selected entries.

    Args:
      x: ``(tokens, in)``.
      dy: ``(tokens, out)``.
      rows: ``(K,)`` int32; entries with ``rows >= in`` or ``cols >= out`` give 0 (padding).
      cols: ``(K,)`` int32.
      impl: "auto" (:data:`guft_jax.kernels.SDDMM_DEFAULTS`), "gather", "dense", "pallas" or
        "block" (see the module docstring).
      interpret: Pallas interpret mode; default: on unless the backend is GPU.
      block: ``(brows, bcols)`` for ``impl="block"`` (:func:`block_sddmm`).
      tiling: tile sizes of "gather" and "pallas".

    Returns:
      ``(K,)`` float32.

    Raises:
      ValueError: for an unknown ``impl``, or "block" without ``block``.

    >>> x, dy = jnp.arange(6.0).reshape(3, 2), jnp.ones((3, 2))
    >>> sddmm(x, dy, jnp.array([1, 2]), jnp.array([0, 0]), impl="gather").tolist()
    [9.0, 0.0]
    """
    if impl == "block":
        if block is None:
            raise ValueError('sddmm(impl="block") needs block=(brows, bcols)')
        return block_sddmm(x, dy, rows, cols, *block)
    impl = resolve_sddmm_impl(impl)
    d_in, d_out = x.shape[-1], dy.shape[-1]
    valid = (rows < d_in) & (cols < d_out)
    if impl == "dense":
        dw = jax.lax.dot_general(
            x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return dw.at[rows, cols].get(mode="fill", fill_value=0)
    r = jnp.where(valid, rows, 0).astype(jnp.int32)
    c = jnp.where(valid, cols, 0).astype(jnp.int32)
    if impl == "gather":
        out = _sddmm_gather(x, dy, r, c, valid, chunk=tiling.gather_chunk)
    else:
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        out = _sddmm_pallas(x, dy, r, c, interpret=interpret, tiling=tiling)
    return jnp.where(valid, out, 0.0)


@functools.partial(jax.jit, static_argnames="shape")
def block_sddmm(
    x: Array,
    dy: Array,
    rows: Array,
    cols: Array,
    brows: Array,
    bcols: Array,
    *,
    shape: tuple[int, int] | None = None,
) -> Array:
    """``(xᵀ @ dy)[rows, cols]`` through the sub-block ``brows × bcols``, in float32.

    The activations' columns ``x[:, brows]`` and ``dy[:, bcols]`` are gathered and contracted
    over tokens in one ``(R, T) @ (T, C)`` matmul; each entry reads its place in that block
    (found by binary search: ``brows`` and ``bcols`` are sorted). Cost ``T·R·C`` instead of the
    dense ``T·in·out``: a win when the entries cluster in few rows and columns, as
    saliency-selected ones do. Jitted under its own name, so a trace that takes it shows a
    ``block_sddmm`` call (:func:`guft_jax.kernels.count_calls`).

    Args:
      x: ``(tokens, in)``.
      dy: ``(tokens, out)``.
      rows, cols: ``(K,)`` int32 entries; ``rows >= in`` or ``cols >= out`` is padding (gives 0).
      brows: ``(R,)`` int32, sorted ascending, padded at the end with ``in``: every valid entry's
        row appears in it.
      bcols: ``(C,)`` int32, likewise for columns (padding ``out``).
      shape: ``(in, out)`` when ``x`` and ``dy`` are already the block's columns, ``(tokens, R)``
        and ``(tokens, C)`` (what the sparse-delta matmul's backward has).

    Returns:
      ``(K,)`` float32. An entry whose row or column is missing from the block gets 0 (a
      caller's broken contract, never a wrong nonzero).

    >>> x, dy = jnp.arange(6.0).reshape(3, 2), jnp.ones((3, 2))
    >>> block_sddmm(x, dy, jnp.array([1, 2]), jnp.array([0, 0]), jnp.array([1, 2]),
    ...             jnp.array([0, 2])).tolist()
    [9.0, 0.0]
    """
    if shape is None:
        d_in, d_out = x.shape[-1], dy.shape[-1]
        xs = jnp.take(x, brows, axis=1, mode="fill", fill_value=0)
        dys = jnp.take(dy, bcols, axis=1, mode="fill", fill_value=0)
    else:
        (d_in, d_out), xs, dys = shape, x, dy
    blk = jax.lax.dot_general(xs, dys, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    ri, ci, valid = block_positions((d_in, d_out), rows, cols, brows, bcols)
    return jnp.where(valid, blk[ri, ci], 0.0)


def block_positions(
    shape: tuple[int, int], rows: Array, cols: Array, brows: Array, bcols: Array
) -> tuple[Array, Array, Array]:
    """Each entry's (row, column) index inside the block and whether it is a valid entry there.

    Args:
      shape: ``(in, out)``; entries with ``rows >= in`` or ``cols >= out`` are padding.
      rows, cols: ``(K,)`` int32 entry coordinates.
      brows, bcols: the block's sorted rows and columns.

    Returns:
      ``(ri, ci, valid)``: ``(K,)`` indices into ``brows`` / ``bcols`` and a ``(K,)`` bool,
      True where the entry is not padding and ``(brows[ri], bcols[ci]) == (rows, cols)``.
    """
    ri = jnp.clip(jnp.searchsorted(brows, rows), 0, brows.shape[0] - 1)
    ci = jnp.clip(jnp.searchsorted(bcols, cols), 0, bcols.shape[0] - 1)
    valid = (rows < shape[0]) & (cols < shape[1]) & (brows[ri] == rows) & (bcols[ci] == cols)
    return ri, ci, valid


@functools.partial(jax.jit, static_argnums=0)
def block_covers(shape: tuple[int, int], rows: Array, cols: Array, brows: Array, bcols: Array):
    """Whether every valid entry ``(rows, cols)`` lies inside the block ``brows × bcols``.

    A traced boolean: a caller whose block may be outgrown (fixed capacities, no retrace) takes
    the block SDDMM where it holds and another SDDMM where it does not (``lax.cond``). Jitted
    under its own name (:func:`guft_jax.kernels.count_calls`).

    Args:
      shape: ``(in, out)``; entries with ``rows >= in`` (padding) are ignored.
      rows, cols: ``(capacity,)`` int32 entry coordinates.
      brows, bcols: the block's sorted rows and columns, padded with ``in`` / ``out``.

    Returns:
      A scalar bool array.

    >>> b = (jnp.array([0, 2, 3]), jnp.array([1, 4]))
    >>> bool(block_covers((3, 4), jnp.array([0, 3]), jnp.array([1, 0]), *b))
    True
    """
    _, _, valid = block_positions(shape, rows, cols, brows, bcols)
    padding = (rows >= shape[0]) | (cols >= shape[1])
    return jnp.all(valid | padding)


def block_of(rows, cols, shape: tuple[int, int], capacity: tuple[int, int] | None = None):
    """Host helper: the sorted unique rows and columns that numpy entries touch.

    Args:
      rows, cols: numpy entry coordinates; entries ``>= shape`` (padding) are dropped.
      shape: ``(in, out)``.
      capacity: ``(R, C)`` to pad to with ``in`` / ``out``; default: no padding.

    Returns:
      ``(brows, bcols)``, int32 numpy arrays.

    Raises:
      ValueError: a capacity smaller than the unique rows or columns.

    >>> [b.tolist() for b in block_of([2, 0, 2], [1, 1, 3], (4, 4), (3, 2))]
    [[0, 2, 4], [1, 3]]
    """
    rows, cols = np.asarray(rows), np.asarray(cols)
    ok = (rows < shape[0]) & (cols < shape[1])
    ur, uc = np.unique(rows[ok]), np.unique(cols[ok])
    cap = capacity or (len(ur), len(uc))
    if len(ur) > cap[0] or len(uc) > cap[1]:
        raise ValueError(f"block_of: {len(ur)} rows x {len(uc)} cols exceed capacity {cap}")
    br = np.full((cap[0],), shape[0], np.int32)
    bc = np.full((cap[1],), shape[1], np.int32)
    br[: len(ur)], bc[: len(uc)] = ur, uc
    return br, bc


def _sddmm_gather(x: Array, dy: Array, r: Array, c: Array, valid: Array, *, chunk: int) -> Array:
    k = r.shape[0]
    if k == 0:
        return jnp.zeros((0,), jnp.float32)
    chunk = min(chunk, k)
    n = -(-k // chunk)
    pad = n * chunk - k
    # Valid entries first (GUFT's slots already are: filled, then padding) so that the loop
    # stops after the last chunk holding one: unfilled capacity costs nothing.
    order = jnp.argsort(~valid, stable=True)
    rs = jnp.pad(r[order], (0, pad)).reshape(n, chunk)
    cs = jnp.pad(c[order], (0, pad)).reshape(n, chunk)
    used = (jnp.sum(valid, dtype=jnp.int32) + chunk - 1) // chunk
    # Rows of the transposed activations are contiguous token vectors: each gather is a run of
    # row copies that XLA fuses into the multiply-reduce of its chunk.
    xt, dyt = x.T, dy.T

    def one_chunk(i, out):
        a = xt.at[rs[i]].get(mode="promise_in_bounds").astype(jnp.float32)
        b = dyt.at[cs[i]].get(mode="promise_in_bounds").astype(jnp.float32)
        return out.at[i].set(jnp.sum(a * b, axis=1))

    out = jax.lax.fori_loop(0, used, one_chunk, jnp.zeros((n, chunk), jnp.float32))
    return jnp.zeros((k,), jnp.float32).at[order].set(out.reshape(-1)[:k], unique_indices=True)


def _sddmm_kernel(rows_ref, cols_ref, xt_ref, dyt_ref, out_ref, *, block_t, tiles):
    split = pl.program_id(1)
    r = rows_ref[...]
    c = cols_ref[...]

    def step(i, acc):
        t0 = pl.multiple_of((split * tiles + i) * block_t, block_t)
        # (block_k, block_t) gathers of row-sorted entries: neighbouring entries share rows of
        # xᵀ, and each row segment is a contiguous (coalesced) run of tokens.
        a = xt_ref[r, pl.ds(t0, block_t)].astype(jnp.float32)
        b = dyt_ref[c, pl.ds(t0, block_t)].astype(jnp.float32)
        return acc + jnp.sum(a * b, axis=1)

    out_ref[...] = jax.lax.fori_loop(0, tiles, step, jnp.zeros(r.shape, jnp.float32))


def _pallas_grid(k: int, t: int, tiling: Tiling) -> tuple[int, int, int, int]:
    """``(block_k, block_t, splits, tiles)`` for ``k`` entries over ``t`` tokens."""
    block_k = min(tiling.pallas_block_k, pl.next_power_of_2(k))
    block_t = min(tiling.pallas_block_t, pl.next_power_of_2(max(t, 1)))
    n_tiles = -(-t // block_t)
    # Token splits in [max/2, max] wasting the fewest padded tiles (12,608 tokens: 5 x 20 tiles).
    most = min(tiling.pallas_token_splits, n_tiles)
    splits = min(range(max(1, most // 2), most + 1), key=lambda s: (s * -(-n_tiles // s), -s))
    return block_k, block_t, splits, -(-n_tiles // splits)


def _sddmm_pallas(x: Array, dy: Array, r: Array, c: Array, *, interpret: bool, tiling: Tiling):
    k, t = r.shape[0], x.shape[0]
    if k == 0:
        return jnp.zeros((0,), jnp.float32)
    block_k, block_t, splits, tiles = _pallas_grid(k, t, tiling)
    t_pad = splits * tiles * block_t - t
    k_pad = -(-k // block_k) * block_k - k
    # Sorted by row so a block of entries touches few rows of xᵀ (cache reuse on GPU).
    order = jnp.argsort(r)
    rs = jnp.pad(r[order], (0, k_pad))
    cs = jnp.pad(c[order], (0, k_pad))
    # Zero-padded tokens contribute nothing, so the kernel needs no tail masks.
    xt = jnp.pad(x.T, ((0, 0), (0, t_pad)))
    dyt = jnp.pad(dy.T, ((0, 0), (0, t_pad)))
    kernel = functools.partial(_sddmm_kernel, block_t=block_t, tiles=tiles)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=2)
    partial_sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, k + k_pad), jnp.float32),
        grid=((k + k_pad) // block_k, splits),
        in_specs=[
            pl.BlockSpec((block_k,), lambda i, s: (i,)),
            pl.BlockSpec((block_k,), lambda i, s: (i,)),
            pl.no_block_spec,
            pl.no_block_spec,
        ],
        out_specs=pl.BlockSpec((None, block_k), lambda i, s: (s, i)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="guft_sddmm",
    )(rs, cs, xt, dyt)
    sorted_out = jnp.sum(partial_sums, axis=0)[:k]
    return jnp.zeros((k,), jnp.float32).at[order].set(sorted_out, unique_indices=True)


__all__ = [
    "SDDMM_IMPLS",
    "DEFAULT_TILING",
    "Tiling",
    "block_covers",
    "block_of",
    "block_positions",
    "block_sddmm",
    "resolve_sddmm_impl",
    "sddmm",
]
