"""Per-kernel row × column blocks of GUFT's sparse store, and the intercepted matmul that takes
the weight gradient on them (:func:`guft_jax.ops.block_sddmm`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import kernels as kernels_lib
from guft_jax import masks as masks_lib
from guft_jax import ops, paths
from guft_jax.guft.indices import pad_indices

# Block capacities, fixed at the first round: BLOCK_SLACK x its rows (columns) x sqrt(K / k₁),
# the growth the rest of the schedule allows (unique rows grow slower than entries), kept within
# the kernel options' block_max_fraction of the matrix so the block SDDMM still pays. (A
# first-round slack of 2 without the schedule's growth was tried: two later rounds overflowed 41
# and 26 of 72 DINOv2-S/14 kernels.)
BLOCK_SLACK = 1.5


def is_kernel(key: str) -> bool:
    """Whether an eligible leaf's key names a kernel (an intercepted matmul's weight)."""
    return paths.path_of(key).endswith("/kernel")


def store_dims(key: str, shape) -> tuple[int, int]:
    """``(in, out)`` of the 2-D matrix a ViT kernel multiplies with (:func:`vit.kernel_as_matrix`),
    which is what the sparse store's flat indices are taken over."""
    return masks_lib.kernel_view(paths.path_of(key), tuple(shape))


def block_capacity(
    need: tuple[int, int],
    dims: tuple[int, int],
    growth: float,
    floor: int = 16,
    *,
    slack: float = BLOCK_SLACK,
    max_fraction: float | None = None,
) -> tuple[int, int]:
    """A kernel's block capacities ``(R, C)`` for the whole schedule, fixed at the first round.

    Args:
      need: the first round's unique rows and columns.
      dims: the matrix's ``(in, out)``.
      growth: ``K / k₁``, the budget over the first round's (1 for a single round).
      floor: the least capacity per axis (a kernel the first round leaves empty).
      slack: the spare factor over the need (:data:`BLOCK_SLACK`).
      max_fraction: the largest block as a fraction of the matrix (default:
        :data:`guft_jax.kernels.BLOCK_MAX_FRACTION`; GUFT passes its kernel options').

    Returns:
      ``min(dim, max(floor, ceil(slack · need · sqrt(growth))))`` per axis, scaled down toward
      ``need`` where ``R·C`` would exceed ``max_fraction`` of the matrix.
    """
    caps = [
        min(d, max(n, floor, 1, math.ceil(slack * n * math.sqrt(growth))))
        for n, d in zip(need, dims, strict=True)
    ]
    frac = kernels_lib.BLOCK_MAX_FRACTION if max_fraction is None else max_fraction
    limit = frac * dims[0] * dims[1]
    if caps[0] * caps[1] > limit:
        f = math.sqrt(limit / (caps[0] * caps[1]))
        caps = [max(n, math.floor(c * f)) for n, c in zip(need, caps, strict=True)]
    return caps[0], caps[1]


def rows_cols(idx: np.ndarray, dims: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The sorted unique rows and columns of a kernel's flat indices ``idx`` (padding skipped)
    in its ``(in, out)`` matrix (host work)."""
    n_in, n_out = dims
    ok = idx < n_in * n_out
    return np.unique(idx[ok] // n_out), np.unique(idx[ok] % n_out)


def padded_block(rows, cols, dims: tuple[int, int], caps: tuple[int, int]) -> tuple[dict, bool]:
    """A kernel's block ``{"rows", "cols"}``: ``rows`` / ``cols`` padded with ``in`` / ``out`` to
    ``caps``, and whether it holds them all (rows or columns past a capacity are left out; the
    step then skips the block)."""
    out = {"rows": pad_indices(rows, caps[0], dims[0]), "cols": pad_indices(cols, caps[1], dims[1])}
    return out, len(rows) <= caps[0] and len(cols) <= caps[1]


def empty_blocks(eligible: dict, floor: int) -> dict:
    """Empty blocks per kernel (every slot padding), of capacity ``min(dim, floor)`` like the
    entries' (a floor that holds every round never retraces)."""
    out = {}
    for k, s in eligible.items():
        if is_kernel(k):
            n_in, n_out = store_dims(k, s)
            out[k] = {
                "rows": jnp.full((min(n_in, floor),), n_in, jnp.int32),
                "cols": jnp.full((min(n_out, floor),), n_out, jnp.int32),
            }
    return out


def delta_matmul(x, w, idx, values, blk, kernel_args: dict):
    """``x @ (w + δ)`` of one intercepted layer (:func:`guft_jax.ops.sparse_delta_matmul` with
    ``kernel_args``, :func:`guft_jax.ops.kernel_arguments`). With a block that pays, the block
    SDDMM runs while the block holds every entry and the block-free one once a later round has
    outgrown it: a run-time switch, so the step keeps its one trace."""
    rows, cols = idx // w.shape[1], idx % w.shape[1]
    frac = kernel_args["block_max_fraction"]
    if blk is None or not ops.block_pays((blk["rows"], blk["cols"]), w, block_max_fraction=frac):
        return ops.sparse_delta_matmul(x, w, rows, cols, values, **kernel_args)
    block = (blk["rows"], blk["cols"])
    return jax.lax.cond(
        ops.block_covers(w.shape, rows, cols, *block),
        lambda a: ops.sparse_delta_matmul(*a, block=block, **kernel_args),
        lambda a: ops.sparse_delta_matmul(*a, **kernel_args),
        (x, w, rows, cols, values),
    )


def interceptor(delta: dict, selected: dict, blocks: dict, kernel_args: dict):
    """A ``flax.linen.intercept_methods`` function replacing ``vit.Linear.matmul`` of every layer
    whose kernel has a delta with :func:`delta_matmul` (``selected``: the kernels' flat indices,
    ``blocks``: their blocks, may lack a kernel; ``kernel_args``: the ops' kernel choices)."""
    table = {
        tuple(paths.path_of(k).split("/")[:-1]): (selected[k], d, blocks.get(k))
        for k, d in delta.items()
        if is_kernel(k)
    }

    def icpt(next_fun, args, kwargs, context):
        hit = context.method_name == "matmul" and tuple(context.module.path) in table
        if not hit:
            return next_fun(*args, **kwargs)
        x, w = args
        idx, values, blk = table[tuple(context.module.path)]
        return delta_matmul(x, w, idx, values.astype(w.dtype), blk, kernel_args)

    return icpt
