"""Exact top-k selection over a dict of score tensors (global, per-tensor, per-row) and OR-merge."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax.masks.eligibility import row_view
from guft_jax.masks.quotas import (
    check_traced_bound,
    given_quotas,
    largest_remainder,
    largest_remainder_traced,
)

ALLOCATIONS = ("global", "per_tensor", "per_row")
NORMALIZATIONS = (None, "mean")

# Order keys: int32 images of float32 scores that compare like the floats (NaN -> -inf) and
# leave one value, INT32_MIN, strictly below every score for entries that may never be chosen.
_EXCLUDED = np.iinfo(np.int32).min


def topk_mask(
    scores: dict[str, jax.Array],
    k: int,
    *,
    exclude: dict[str, jax.Array] | None = None,
    allocation: str = "global",
    normalize: str | None = None,
    row_dims: dict[str, tuple[int, int]] | None = None,
    quotas: dict[str, int] | None = None,
) -> dict[str, jax.Array]:
    """Exactly ``k`` of the highest-scoring entries of ``scores``, by a budget allocation rule
    (the module docstring states the rules and the order).

    Cost: at most two compiled programs per call (counting the selectable entries when
    ``exclude`` is given, then selecting with ``lax.top_k``). The per-tensor quotas are data, so
    a changing ``exclude`` does not recompile; ``"per_row"`` does not specialise on ``k``.

    Args:
      scores: ``{key: score array}``.
      k: the number of entries to select, ``0 ≤ k ≤ N``.
      exclude: ``{key: bool array}`` of entries never to choose; ``None`` excludes nothing.
      allocation: ``"global"`` (default), ``"per_tensor"`` or ``"per_row"``.
      normalize: ``None`` (default) or ``"mean"``.
      row_dims: ``{key: (d_in, d_out)}`` 2-D views for ``"per_row"`` (missing keys use
        :func:`row_view`).
      quotas: ``{key: k_t}``, explicit per-tensor budgets (SHiRA's ``r·(d_in + d_out)``, GPS's
        ``K·d_out``) summing to ``k``; ``None``: the largest-remainder split.

    Returns:
      ``{key: bool array}`` shaped like ``scores``, with exactly ``k`` True entries in total.

    Raises:
      ValueError: ``k`` out of range, an unknown ``allocation`` or ``normalize``, a
        ``row_dims`` entry whose product is not the tensor's size, or ``quotas`` that do not
        name every tensor, exceed one's selectable entries or do not sum to ``k``.

    >>> s = {"a": jnp.array([3.0, 1.0, 2.0]), "b": jnp.array([5.0, 0.0])}
    >>> {k: v.tolist() for k, v in topk_mask(s, 2, allocation="per_tensor").items()}
    {'a': [True, False, False], 'b': [True, False]}
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    keys = sorted(scores)
    sizes = [math.prod(np.shape(scores[key])) for key in keys]
    if not 0 <= k <= sum(sizes):
        raise ValueError(f"k: must be in [0, {sum(sizes)}] entries, got {k}")
    sel = _selectable(keys, sizes, exclude, k, is_traced(scores, exclude))
    if quotas is None and allocation == "global":
        return select_global(scores, exclude, k=k, normalize=normalize)
    q = _quota_vector(keys, sizes, exclude, k, allocation, quotas, sel)
    if allocation == "per_tensor":
        return select_per_tensor(scores, exclude, q, k=k)
    views = []
    for key, size in zip(keys, sizes, strict=True):
        view = tuple(int(d) for d in (row_dims or {}).get(key, ()))
        if not view:
            view = row_view(key, tuple(np.shape(scores[key])))
        if len(view) != 2 or math.prod(view) != size:
            raise ValueError(f"row_dims: {key!r} has {size} entries, (d_in, d_out) = {view}")
        views.append(view)
    return select_per_row(scores, exclude, q, views=tuple(views))


def _selectable(keys, sizes, exclude, k, traced: bool) -> list[int] | None:
    """Selectable entries per tensor (``sizes`` without ``exclude``; None when traced), checked
    against ``k``."""
    if exclude is None:
        return sizes
    if traced:
        return None
    got = jax.device_get(_selectable_counts({key: exclude[key] for key in keys}))
    sel = [int(got[key]) for key in keys]
    if k > sum(sel):
        raise ValueError(f"k: must be in [0, {sum(sel)}] selectable entries, got {k}")
    return sel


def _quota_vector(keys, sizes, exclude, k, allocation, quotas, sel) -> jax.Array:
    """The per-tensor budgets as an int32 vector in ``keys`` order (explicit ``quotas``, or the
    largest-remainder split of the selectable counts ``sel``, in the program when None)."""
    if quotas is not None:
        return jnp.asarray(given_quotas(quotas, keys, sel or sizes, k, allocation), jnp.int32)
    if sel is None:
        check_traced_bound(k, sum(sizes))
        counts = _selectable_counts({key: exclude[key] for key in keys})
        return largest_remainder_traced(k, jnp.stack([counts[key] for key in keys]))
    return jnp.asarray(largest_remainder(k, sel), jnp.int32)


def is_traced(*trees: Any) -> bool:
    """Whether any leaf of ``trees`` is a tracer (inside ``jit``/``vmap``/...)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees))


@jax.jit
def _selectable_counts(exclude: dict) -> dict:
    return {key: jnp.sum(~ex.astype(bool), dtype=jnp.int32) for key, ex in exclude.items()}


def order_key(x: jax.Array, ex: jax.Array | None = None) -> jax.Array:
    """int32 keys that order like float32 ``x`` (NaN -> -inf, -0.0 -> 0.0), ``ex``-cluded entries
    -> INT32_MIN (below every score): the order of :func:`topk_mask`."""
    x = x.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    x = jnp.where(x == 0, jnp.float32(0), x)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    # Negative floats: flip the magnitude bits so that larger magnitude -> smaller int.
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    if ex is not None:
        key = jnp.where(ex.astype(bool), jnp.int32(_EXCLUDED), key)
    return key


def _mean_normalized(x: jax.Array, ex: jax.Array | None) -> jax.Array:
    x = x.astype(jnp.float32)
    ok = jnp.isfinite(x) if ex is None else jnp.isfinite(x) & ~ex.astype(bool)
    mean = jnp.sum(jnp.where(ok, x, 0)) / jnp.maximum(jnp.sum(ok), 1)
    return x / jnp.where(mean > 0, mean, 1)


@functools.partial(jax.jit, static_argnames=("k", "normalize"))
def select_global(scores: dict, exclude: dict | None, *, k: int, normalize: str | None) -> dict:
    """:func:`topk_mask`'s ``"global"`` allocation as one compiled program (arguments checked by
    the caller)."""
    # One compiled program, one top_k over the concatenated keys: no sort of the whole vector.
    keys = sorted(scores)
    parts = []
    for key in keys:
        ex = None if exclude is None else exclude[key]
        x = _mean_normalized(scores[key], ex) if normalize == "mean" else scores[key]
        parts.append(jnp.ravel(order_key(x, ex)))
    flat = jnp.concatenate(parts)
    chosen = jnp.zeros(flat.shape, bool)
    if k:
        chosen = chosen.at[jax.lax.top_k(flat, k)[1]].set(True)
    out, off = {}, 0
    for key in keys:
        size = math.prod(np.shape(scores[key]))
        out[key] = chosen[off : off + size].reshape(np.shape(scores[key]))
        off += size
    return out


@functools.partial(jax.jit, static_argnames=("k",))
def select_per_tensor(scores: dict, exclude: dict | None, quotas: jax.Array, *, k: int) -> dict:
    """:func:`topk_mask`'s ``"per_tensor"`` allocation: the top ``quotas[i]`` of each tensor (in
    sorted-key order) as one compiled program; the quotas are data (no recompile)."""
    out = {}
    for i, key in enumerate(sorted(scores)):
        shape = np.shape(scores[key])
        key_ = jnp.ravel(order_key(scores[key], None if exclude is None else exclude[key]))
        # k_t ≤ min(size, k): a static top_k of that width holds the tensor's top k_t in order.
        cap = min(key_.size, k)
        chosen = jnp.zeros(key_.shape, bool)
        if cap:
            idx = jax.lax.top_k(key_, cap)[1]
            chosen = chosen.at[idx].set(jnp.arange(cap) < quotas[i])
        out[key] = chosen.reshape(shape)
    return out


@functools.partial(jax.jit, static_argnames=("views",))
def select_per_row(scores: dict, exclude: dict | None, quotas: jax.Array, *, views: tuple) -> dict:
    """:func:`topk_mask`'s ``"per_row"`` allocation (water-filling over the output units of each
    tensor's ``(d_in, d_out)`` view in ``views``) as one compiled program."""
    # k is not static here (quotas are data): one compile per tree structure, whatever k.
    out = {}
    for i, key in enumerate(sorted(scores)):
        shape = np.shape(scores[key])
        d_in, d_out = views[i]
        ex = None if exclude is None else exclude[key]
        rows = order_key(scores[key], ex).reshape(d_in, d_out).T  # (output unit, its inputs)
        k_t = quotas[i]
        cap_r = jnp.sum(rows != _EXCLUDED, axis=1, dtype=jnp.int32)  # selectable per row
        # Water-filling level q: f(q) = Σ_r min(c_r, q) from a histogram of the capacities.
        hist = jnp.zeros(d_in + 1, jnp.int32).at[cap_r].add(1)
        below = jnp.cumsum(hist) - hist  # rows with c_r < q
        mass = jnp.cumsum(hist * jnp.arange(d_in + 1)) - hist * jnp.arange(d_in + 1)
        f = mass + jnp.arange(d_in + 1) * (d_out - below)
        q = jnp.sum(f <= k_t) - 1
        base = jnp.minimum(cap_r, q)
        left = k_t - jnp.sum(base)
        vals, idx = jax.lax.top_k(rows, d_in)  # each row's entries, best first
        # A row with c_r > q has a (q+1)-th selectable entry; q = d_in only when no row does.
        nxt = vals[:, jnp.minimum(q, d_in - 1)]
        cand = jnp.where(cap_r > q, nxt, jnp.int32(_EXCLUDED))
        order = jax.lax.top_k(cand, d_out)[1]
        extra = (
            jnp.zeros(d_out, jnp.int32).at[order].set((jnp.arange(d_out) < left).astype(jnp.int32))
        )
        n_r = base + extra
        sel = jnp.zeros((d_out, d_in), bool)
        sel = sel.at[jnp.arange(d_out)[:, None], idx].set(jnp.arange(d_in)[None, :] < n_r[:, None])
        out[key] = sel.T.reshape(shape)
    return out


def budget(ratio: float, n_eligible: int) -> int:
    """``k = round(ratio · N_eligible)`` (Python's round-half-even)."""
    return int(round(ratio * n_eligible))


@jax.jit
def merge_masks(a: dict, b: dict) -> dict:
    """Element-wise OR (``jnp.logical_or``) of two masks with the same keys."""
    return {k: jnp.logical_or(a[k], b[k]) for k in a}


@jax.jit
def per_leaf_counts(mask: dict) -> dict:
    """``{key: int32 count of True entries}`` of a mask, as one compiled program."""
    return {k: jnp.sum(m, dtype=jnp.int32) for k, m in mask.items()}


def count(mask: dict) -> int:
    """The number of True entries of a mask."""
    return int(sum(int(v) for v in jax.device_get(per_leaf_counts(mask)).values()))
