"""A GUFT round's selection: the new top-k OR-merged into the mask so far (one compiled program
for the paper's global ranking; :func:`guft_jax.masks.topk_mask` for every other rule)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import masks as masks_lib


@functools.partial(jax.jit, static_argnames=("k", "exclude_selected"))
def topk_merge_global(scores: dict, prev: dict, *, k: int, exclude_selected: bool):
    """``select(..., allocation="global", normalize=None)`` as one program, and whether any
    score is nonzero.

    The same entries as :func:`guft_jax.masks.topk_mask` (its :func:`guft_jax.masks.order_key`;
    ties to the lower flat position, as ``lax.top_k``) without its ``top_k`` over every entry,
    which takes 15-25 s for k = 21,275 of 21M on 2 CPU cores: the k-th largest key is found bit
    by bit (32 counting passes), then the entries above it and the first ``k - #above`` equal to
    it are chosen."""
    keys = sorted(scores)
    parts = [
        jnp.ravel(masks_lib.order_key(scores[key], prev[key] if exclude_selected else None))
        for key in keys
    ]
    # int32 -> uint32 with the same order (sign bit flipped), so the bisection is unsigned.
    u = jax.lax.bitcast_convert_type(jnp.concatenate(parts), jnp.uint32) ^ jnp.uint32(1 << 31)

    def bit(i, t):
        cand = t | jax.lax.shift_left(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(u >= cand, dtype=jnp.int32) >= k, cand, t)

    t = jax.lax.fori_loop(0, 32, bit, jnp.uint32(0))
    above = u > t
    ties = u == t
    need = k - jnp.sum(above, dtype=jnp.int32)
    chosen = above | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= need))
    if k == 0:
        chosen = jnp.zeros_like(above)
    out, off = {}, 0
    for key in keys:
        size = math.prod(np.shape(scores[key]))
        new = chosen[off : off + size].reshape(np.shape(scores[key]))
        out[key] = jnp.logical_or(prev[key], new)
        off += size
    return out, any_nonzero(scores)


@jax.jit
def any_nonzero(tree: dict) -> jax.Array:
    """Whether any entry of a dict of arrays is nonzero (one program)."""
    return jnp.any(jnp.stack([jnp.any(v != 0) for v in tree.values()]))


def select(
    scores: dict,
    prev: dict,
    k: int,
    *,
    exclude_selected: bool,
    allocation: str,
    normalize,
    quotas: dict | None = None,
    row_dims: dict | None = None,
) -> dict:
    """The new top-k mask OR-merged into ``prev`` (``quotas``/``row_dims``: see
    :func:`guft_jax.masks.topk_mask`): the selection rule of both :func:`guft_jax.guft.guft`
    and :func:`guft_jax.transforms.gradual_unfreeze`. Traced ``scores`` / ``prev`` are fine.

    Raises:
      ValueError: as :func:`guft_jax.masks.topk_mask`.
    """
    kw = {} if allocation == "global" and normalize is None else dict(allocation=allocation)
    if normalize is not None:
        kw["normalize"] = normalize
    if quotas is not None:
        kw.update(quotas=quotas, row_dims=row_dims)
    new = masks_lib.topk_mask(scores, k, exclude=prev if exclude_selected else None, **kw)
    return masks_lib.merge_masks(prev, new)
