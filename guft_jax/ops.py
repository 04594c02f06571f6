"""Low-level ops shared by the model and the methods: GUFT's sparse-delta matmul and attention.

:func:`sparse_delta_matmul` is ``y = x @ (W0 + S)`` with ``S`` a fixed-capacity sparse delta,
whose custom VJP forms the weight gradient only at the selected entries: a sampled dense-dense
product (SDDMM), ``dδ_k = Σ_t x[t, r_k] · dy[t, c_k]`` (the idea of SPT's SparseGradLinear and
LoSiA-Pro). Three interchangeable SDDMM implementations:

- ``"gather"``: entries in fixed-size chunks (a ``lax.map``); per chunk the token vectors
  ``xᵀ[r_k]`` and ``dyᵀ[c_k]`` are gathered as contiguous rows of the transposed activations
  and contracted in a fused multiply-reduce, so no ``(capacity, tokens)`` array is materialised.
- ``"dense"``: the full ``xᵀ dy`` weight gradient (one matmul) read at the entries; the right
  choice where a matrix unit makes the matmul nearly free (TPU) or the density is high.
- ``"block"``: the selection's sub-block. Saliency-selected entries cluster in few rows and
  columns, so the rows × columns they touch (``block=(brows, bcols)``, kept by GUFT per layer)
  form a small dense sub-matrix: the weight gradient there is one ``(R, T) @ (T, C)`` matmul of
  the gathered activation columns, read at the entries. "auto" takes it for a layer whose block
  is at most :data:`BLOCK_MAX_FRACTION` of the matrix.
- ``"pallas"``: a Pallas kernel (Triton lowering on GPU; ``interpret=True`` elsewhere, for tests)
  over blocks of row-sorted entries × token splits; each program streams token tiles of the
  gathered rows and accumulates in float32.

``"auto"`` picks per backend from :data:`AUTO_IMPL` (measured by ``benchmarks/ops_bench.py``).

:func:`attention` is multi-head dot-product attention through ``jax.nn.dot_product_attention``
(XLA, or cuDNN's fused flash attention on GPU) with an einsum reference.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

Array = jax.Array

SDDMM_IMPLS = ("auto", "gather", "dense", "pallas", "block")

# The SDDMM implementation "auto" uses per backend. CPU: measured by benchmarks/ops_bench.py on 2
# cores at 0.3% density, ViT-B/16 shapes (benchmarks/results/ops_bench.json): "gather" beats the
# dense dW matmul there. GPU: measured on one H200 (benchmarks/accelerator.sh, bf16, ViT-B/16
# shapes, batch 64, 0.3% random entries; benchmarks/results/ops_bench_accelerator.json): fwd+bwd
# vs the dense matmul (geomean) dense-dW 0.95, the Pallas/Triton kernel 1.35, gather 2.71, so
# "dense" stays. TPU: the MXU makes the dense dW matmul cheaper than any gather, and Mosaic has
# no vector gather from refs. Clustered selections take the "block" SDDMM on every backend.
AUTO_IMPL = {"cpu": "gather", "gpu": "dense", "tpu": "dense"}
DEFAULT_AUTO_IMPL = "dense"

# "auto" falls back from "gather" to the dense dW matmul for a layer whose capacity is more than
# this fraction of its weight entries. The gather's cost grows with the entries it visits (only
# the filled slots: padding is skipped), the matmul's with d_in·d_out; on 2 CPU cores (ViT-S
# shapes, 850 and 1576 tokens, benchmarks/ops_bench.py) they cross near 0.4-0.5% of filled
# entries, and GUFT's capacities hold about twice the entries they end up with (slack 2).
GATHER_MAX_DENSITY = 0.008

# "auto" with a ``block`` uses the block SDDMM where R·C <= this fraction of in·out (R, C: the
# block's row/column capacities). On 2 CPU cores its matmul + column gathers took 72 real
# DINOv2-S/14 kernels (blocks ~10% of each matrix) from 511 ms (dense dW) to 200 ms; a block
# near the whole matrix only adds the gathers to the dense dW.
BLOCK_MAX_FRACTION = 0.5

# With a block, per backend: True computes ``y = x W0 + scatter(x[:, rows] S_block)`` (and ``dx``
# likewise), so no densified weight exists in either pass and the backward keeps x's block
# columns only; False densifies ``W0 + S`` in each pass (XLA holds about one weight-sized copy per
# layer) and takes only the weight gradient on the block. Read while tracing. Measured on 2 CPU
# cores (benchmarks/guft_step_bench.py, DINOv2-S/14, 56 px, batch 50, real selection, one run):
# step / full 0.797 (True) vs 0.729 (False), peak / LoRA's 0.996 vs 1.167. CPU takes the faster
# one; accelerators take the one without weight copies (issue 16's memory target; not yet
# measured there: `STAGES=guft bash benchmarks/accelerator.sh`).
BLOCK_FORWARD = {"cpu": False, "gpu": True, "tpu": True}

# Entries per lax.map step of the "gather" impl: large enough to amortise the loop, small enough
# that a chunk's gathered rows stay in cache (measured: 32-512 within noise on 2 CPU cores).
GATHER_CHUNK = 256

# Pallas kernel tiling: entries per program, tokens per inner step, and how many token splits run
# as separate programs (partial sums added afterwards) so a GPU has enough programs in flight.
PALLAS_BLOCK_K = 64
PALLAS_BLOCK_T = 128
PALLAS_TOKEN_SPLITS = 8

_log = logging.getLogger(__name__)


def resolve_sddmm_impl(
    impl: str = "auto", backend: str | None = None, *, density: float | None = None
) -> str:
    """The concrete SDDMM implementation ``impl`` stands for on ``backend``.

    Args:
      impl: one of :data:`SDDMM_IMPLS`.
      backend: a JAX platform name; defaults to ``jax.default_backend()``.
      density: the layer's capacity as a fraction of its weight entries, if known: "auto"
        resolving to "gather" becomes "dense" above :data:`GATHER_MAX_DENSITY`.

    Returns:
      "gather", "dense" or "pallas".

    Raises:
      ValueError: for an unknown ``impl``.

    >>> resolve_sddmm_impl("dense")
    'dense'
    """
    if impl not in SDDMM_IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; allowed: {', '.join(SDDMM_IMPLS)}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    out = AUTO_IMPL.get(backend, DEFAULT_AUTO_IMPL)
    if out == "gather" and density is not None and density > GATHER_MAX_DENSITY:
        return "dense"
    return out


def sparse_delta_matmul(
    x: Array,
    w0: Array,
    rows: Array,
    cols: Array,
    values: Array,
    *,
    impl: str = "auto",
    block: tuple[Array, Array] | None = None,
) -> Array:
    """``x @ (w0 + S)`` where ``S`` holds ``values`` at ``(rows, cols)`` and is zero elsewhere.

    GUFT's sparse path. The backward pass computes ``dx``
    in full (``dy @ (w0 + S)ᵀ``, exactly the dense gradient) but the weight gradient only at the
    selected entries, ``d values_k = Σ_tokens x[:, rows_k] · dy[:, cols_k]`` (an SDDMM,
    accumulated in float32), so the dense ``(in, out)`` weight gradient matmul is replaced by
    ``capacity × tokens`` multiply-adds. Only ``x``, ``w0`` and the sparse triplet are saved for
    the backward (the densified weight is rebuilt there, not held). ``w0`` is frozen: its
    cotangent is zero. Padding slots use ``rows == w0.shape[0]`` (out of range): they are dropped
    from the scatter and get a zero gradient. Duplicate ``(row, col)`` pairs add up in the
    forward and each receives the full gradient of that weight entry.

    Args:
      x: ``(..., in)`` activations.
      w0: ``(in, out)`` frozen weight.
      rows: ``(capacity,)`` int32 row coordinates in ``[0, in]`` (``in`` = padding).
      cols: ``(capacity,)`` int32 column coordinates in ``[0, out)``.
      values: ``(capacity,)`` deltas (cast to ``w0.dtype`` in the forward).
      impl: the weight-gradient SDDMM: "auto" ("block" where ``block`` is given and small
        enough, else per backend, :data:`AUTO_IMPL`), "gather", "dense", "pallas" (a Triton
        kernel on GPU, interpret mode on CPU) or "block" (needs ``block``).
      block: ``(brows, bcols)``, int32, each sorted ascending and padded with ``in`` / ``out``:
        the rows and columns the valid entries lie in (:func:`block_sddmm`).

    Returns:
      ``(..., out)`` in the dtype of ``x @ w0``.

    Raises:
      ValueError: for an unknown ``impl`` or mismatched shapes.
      NotImplementedError: ``impl="pallas"`` on TPU.

    >>> x, w0 = jnp.ones((2, 3)), jnp.zeros((3, 4))
    >>> rows, cols = jnp.array([0, 3], jnp.int32), jnp.array([1, 0], jnp.int32)
    >>> sparse_delta_matmul(x, w0, rows, cols, jnp.array([2.0, 5.0]))[0].tolist()
    [0.0, 2.0, 0.0, 0.0]
    """
    if impl == "block" and block is None:
        raise ValueError('sparse_delta_matmul(impl="block") needs block=(brows, bcols)')
    if impl == "auto" and block is not None and _block_pays(block, w0):
        impl = "block"
    elif w0.ndim == 2 and rows.ndim == 1:
        impl = resolve_sddmm_impl(impl, density=rows.shape[0] / max(w0.size, 1))
    else:
        impl = resolve_sddmm_impl(impl)
    if impl != "block":
        block = None
    elif not BLOCK_FORWARD.get(jax.default_backend(), True):
        impl = "block_dw"  # densified passes, the weight gradient on the block
    if impl == "pallas" and jax.default_backend() == "tpu":
        raise NotImplementedError(
            'sparse_delta_matmul(impl="pallas") lowers through Triton (GPU) only; on TPU use '
            '"dense" (what "auto" picks there)'
        )
    if w0.ndim != 2 or x.shape[-1] != w0.shape[0]:
        raise ValueError(f"x {x.shape} @ w0 {w0.shape}: need w0 (in, out) with in = x.shape[-1]")
    if not (rows.shape == cols.shape == values.shape and rows.ndim == 1):
        raise ValueError(
            f"rows {rows.shape}, cols {cols.shape}, values {values.shape}: need equal 1-D shapes"
        )
    return _sparse_delta_matmul(impl, x, w0, rows, cols, values, block)


def _block_pays(block, w0) -> bool:
    brows, bcols = block
    return brows.shape[0] * bcols.shape[0] <= BLOCK_MAX_FRACTION * w0.size


def block_pays(block: tuple[Array, Array], w0: Array) -> bool:
    """Whether "auto" takes the block SDDMM for ``w0`` (static: the block's capacities).

    Args:
      block: ``(brows, bcols)`` as in :func:`sparse_delta_matmul`.
      w0: the ``(in, out)`` weight.

    Returns:
      True where ``R·C <= BLOCK_MAX_FRACTION · in·out``.
    """
    return _block_pays(block, w0)


def block_covers(shape: tuple[int, int], rows: Array, cols: Array, brows: Array, bcols: Array):
    """Whether every valid entry ``(rows, cols)`` lies inside the block ``brows × bcols``.

    A traced boolean: a caller whose block may be outgrown (fixed capacities, no retrace) takes
    the block SDDMM where it holds and another SDDMM where it does not (``lax.cond``).

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
    _, _, valid = _block_positions(shape, rows, cols, brows, bcols)
    padding = (rows >= shape[0]) | (cols >= shape[1])
    return jnp.all(valid | padding)


def _densify(w0: Array, rows: Array, cols: Array, values: Array) -> Array:
    return w0.at[rows, cols].add(values.astype(w0.dtype), mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_delta_matmul(impl, x, w0, rows, cols, values, block):
    return _fwd(impl, x, w0, rows, cols, values, block)[0]


def _fwd(impl, x, w0, rows, cols, values, block):
    if impl == "block":
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


def _bwd(impl, res, dy):
    x, w0, rows, cols, values, block = res
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
        return dx, jnp.zeros_like(w0), None, None, dvalues.astype(values.dtype), (None, None)
    dx = dy @ _densify(w0, rows, cols, values).T
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dvalues = sddmm(x2, dy2, rows, cols, impl="block" if impl == "block_dw" else impl, block=block)
    nb = None if block is None else (None, None)
    return dx, jnp.zeros_like(w0), None, None, dvalues.astype(values.dtype), nb


def _block_matrix(shape, rows, cols, values, brows, bcols):
    """The ``(R, C)`` dense block of ``S`` (duplicates add up, padding and strays dropped)."""
    ri, ci, valid = _block_positions(shape, rows, cols, brows, bcols)
    sb = jnp.zeros((brows.shape[0], bcols.shape[0]), values.dtype)
    return sb.at[ri, ci].add(jnp.where(valid, values, 0))


def _block_positions(shape, rows, cols, brows, bcols):
    """Each entry's (row, column) inside the block and whether it is a valid entry there."""
    ri = jnp.clip(jnp.searchsorted(brows, rows), 0, brows.shape[0] - 1)
    ci = jnp.clip(jnp.searchsorted(bcols, cols), 0, bcols.shape[0] - 1)
    valid = (rows < shape[0]) & (cols < shape[1]) & (brows[ri] == rows) & (bcols[ci] == cols)
    return ri, ci, valid


_sparse_delta_matmul.defvjp(_fwd, _bwd)


def sddmm(
    x: Array,
    dy: Array,
    rows: Array,
    cols: Array,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    block: tuple[Array, Array] | None = None,
) -> Array:
    """Sampled dense-dense product ``out_k = Σ_t x[t, rows_k] · dy[t, cols_k]`` in float32.

    This is ``(xᵀ @ dy)[rows, cols]`` without forming ``xᵀ @ dy`` (except for ``impl="dense"``):
    the weight gradient of ``y = x @ W`` at selected entries.

    Args:
      x: ``(tokens, in)``.
      dy: ``(tokens, out)``.
      rows: ``(K,)`` int32; entries with ``rows >= in`` or ``cols >= out`` give 0 (padding).
      cols: ``(K,)`` int32.
      impl: "auto", "gather", "dense", "pallas" or "block" (see the module docstring).
      interpret: Pallas interpret mode; default: on unless the backend is GPU.
      block: ``(brows, bcols)`` for ``impl="block"`` (:func:`block_sddmm`).

    Returns:
      ``(K,)`` float32.

    Raises:
      ValueError: for an unknown ``impl``.

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
        out = _sddmm_gather(x, dy, r, c, valid)
    else:
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        out = _sddmm_pallas(x, dy, r, c, interpret=interpret)
    return jnp.where(valid, out, 0.0)


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
    saliency-selected ones do.

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
    ri, ci, valid = _block_positions((d_in, d_out), rows, cols, brows, bcols)
    return jnp.where(valid, blk[ri, ci], 0.0)


def block_of(rows, cols, shape: tuple[int, int], capacity: tuple[int, int] | None = None):
    """Host helper: the sorted unique ``(brows, bcols)`` of numpy entries ``rows, cols`` (padding
    ``>= shape`` dropped), padded with ``shape[0]`` / ``shape[1]`` to ``capacity`` (default: no
    padding). Raises ValueError if a capacity is too small."""
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


def _sddmm_gather(x: Array, dy: Array, r: Array, c: Array, valid: Array) -> Array:
    k = r.shape[0]
    if k == 0:
        return jnp.zeros((0,), jnp.float32)
    chunk = min(GATHER_CHUNK, k)
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


def _sddmm_pallas(x: Array, dy: Array, r: Array, c: Array, *, interpret: bool) -> Array:
    k, t = r.shape[0], x.shape[0]
    if k == 0:
        return jnp.zeros((0,), jnp.float32)
    block_k = min(PALLAS_BLOCK_K, pl.next_power_of_2(k))
    block_t = min(PALLAS_BLOCK_T, pl.next_power_of_2(max(t, 1)))
    n_tiles = -(-t // block_t)
    # Token splits in [max/2, max] wasting the fewest padded tiles (12,608 tokens: 5 x 20 tiles).
    most = min(PALLAS_TOKEN_SPLITS, n_tiles)
    splits = min(range(max(1, most // 2), most + 1), key=lambda s: (s * -(-n_tiles // s), -s))
    tiles = -(-n_tiles // splits)
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


# --------------------------------------------------------------------------------------------
# Attention

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")

# What "auto" runs per backend (GPU: cuDNN first, see attention()). CPU: the einsum form measured
# faster than dot_product_attention's XLA path on 2 cores (ViT-B/16 shape, fwd+bwd, 1.1-1.8x;
# benchmarks/results/ops_bench.json "attention").
ATTENTION_AUTO = {"cpu": "einsum", "gpu": "xla", "tpu": "xla"}


def attention_einsum(q: Array, k: Array, v: Array) -> Array:
    """Reference multi-head attention: ``softmax(q kᵀ / √D) v`` with the softmax in float32.

    Args:
      q: ``(B, T, H, D)`` queries.
      k: ``(B, S, H, D)`` keys.
      v: ``(B, S, H, D)`` values.

    Returns:
      ``(B, T, H, D)`` in ``v.dtype``.
    """
    d = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(d).astype(q.dtype), k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attention(
    q: Array, k: Array, v: Array, *, impl: str = "auto", dtype: jnp.dtype | None = None
) -> Array:
    """Multi-head scaled dot-product attention (Vaswani et al., arXiv:1706.03762), fused.

    Goes through ``jax.nn.dot_product_attention`` (logits accumulated and softmax computed in
    float32 for 16-bit inputs), which on GPU can run cuDNN's flash attention: the ``(B, H, T, S)``
    probabilities are never written to memory. No masks, no dropout (ViT fine-tuning uses
    attention dropout 0; keep the einsum path where it is not).

    Args:
      q: ``(B, T, H, D)`` queries.
      k: ``(B, S, H, D)`` keys.
      v: ``(B, S, H, D)`` values.
      impl: "auto" (GPU: cuDNN for 16-bit inputs when its trace-time checks pass, else XLA;
        elsewhere :data:`ATTENTION_AUTO`), "xla" (``implementation=None``: JAX picks, XLA
        today), "cudnn" (raises where unsupported) or "einsum" (:func:`attention_einsum`, the
        reference).
      dtype: compute dtype q, k, v are cast to first (e.g. ``jnp.bfloat16``); ``None`` keeps them.

    Returns:
      ``(B, T, H, D)`` in the compute dtype.

    Raises:
      ValueError: for an unknown ``impl`` or shapes that are not ``(B, T, H, D)``.

    >>> q = jnp.ones((1, 3, 2, 4))
    >>> attention(q, q, q, impl="xla").shape
    (1, 3, 2, 4)
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; allowed: {', '.join(ATTENTION_IMPLS)}")
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need (B, T, H, D) each")
    if dtype is not None:
        q, k, v = (a.astype(dtype) for a in (q, k, v))
    backend = jax.default_backend()
    if impl == "auto":
        if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:  # cuDNN's support checks (version, head dim, GPU generation) run at trace time
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (NotImplementedError, RuntimeError, ValueError) as e:
                _log_once(f"attention: cuDNN flash attention unavailable ({e}); using XLA")
        impl = ATTENTION_AUTO.get(backend, "xla")
    if impl == "einsum":
        return attention_einsum(q, k, v)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, implementation=None)


@functools.lru_cache(maxsize=16)
def _log_once(message: str) -> None:
    _log.info(message)


def dense_delta_reference(w0: Array, rows: Array, cols: Array, values: Array) -> Array:
    """The densified weight ``w0 + S`` (padding entries dropped), as a plain array.

    >>> dense_delta_reference(jnp.zeros((2, 2)), jnp.array([1, 2]), jnp.array([0, 0]),
    ...                       jnp.array([3.0, 4.0])).tolist()
    [[0.0, 0.0], [3.0, 0.0]]
    """
    return _densify(jnp.asarray(w0), rows, cols, values)


__all__ = [
    "ATTENTION_AUTO",
    "ATTENTION_IMPLS",
    "AUTO_IMPL",
    "SDDMM_IMPLS",
    "attention",
    "attention_einsum",
    "BLOCK_MAX_FRACTION",
    "block_of",
    "block_sddmm",
    "dense_delta_reference",
    "resolve_sddmm_impl",
    "sddmm",
    "sparse_delta_matmul",
]
