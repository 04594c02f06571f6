"""Index vectors of GUFT's sparse stores: padding and resizing on the host, and the flat store
(indices into the concatenation of raveled leaves) with its gather, scatter and slot remap.

An index vector is int32 flat positions, padded with a sentinel at least the indexed size (an
out-of-range index: gathers read 0 there and scatters drop it) up to a static capacity of at
least one slot (orbax cannot save a zero-size array). :class:`guft_jax.guft.SparseStore` keeps
one per leaf; :func:`guft_jax.transforms.gradual_unfreeze` keeps one over all eligible leaves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths


def pad_host(idx: Any, capacity: int, fill: int) -> np.ndarray:
    """An int32 index vector of length ``capacity`` (numpy): ``idx`` first (truncated to the
    capacity), then ``fill``."""
    out = np.full((capacity,), fill, np.int32)
    n = min(capacity, len(idx))
    out[:n] = np.asarray(idx)[:n]
    return out


def pad_indices(idx: Any, capacity: int, fill: int) -> jax.Array:
    """:func:`pad_host` put on the device."""
    return jax.device_put(pad_host(idx, capacity, fill))


def mask_indices(mask_leaves: Sequence[Any], capacity: int | None = None) -> jax.Array:
    """The flat store of some bool leaves (host work): the ascending positions of their True
    entries in the concatenation, padded with its size to ``capacity`` (default: the count),
    at least one slot."""
    flat = np.concatenate([np.asarray(m, bool).reshape(-1) for m in mask_leaves])
    idx = np.flatnonzero(flat)
    return pad_indices(idx, max(1, len(idx) if capacity is None else capacity), flat.size)


def resize_host(tree: Any, sizes: dict[str, int], *, suffix: bool = False) -> Any:
    """:func:`guft_jax.optim.resize_leaves` done in numpy: zero-pads (or truncates) the 1-D
    leaves ``sizes`` names (by ``/``-joined path; ``suffix``: paths ending with one, as Adam's
    moments mirror the trainable tree) and leaves every other leaf untouched."""

    def fix(path, x):
        p = paths.key_to_str(path)
        hit = next(
            (n for q, n in sizes.items() if p == q or (suffix and p.endswith("/" + q))), None
        )
        if hit is None or getattr(x, "ndim", 0) != 1 or x.shape[0] == hit:
            return x
        out = np.zeros((hit,), x.dtype)
        n = min(hit, x.shape[0])
        out[:n] = np.asarray(x)[:n]
        return jax.device_put(out)

    return jax.tree_util.tree_map_with_path(fix, tree)


def concat(leaves: Sequence[jax.Array]) -> jax.Array:
    """The raveled leaves concatenated (in their common result dtype)."""
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def gather(leaves: Sequence[jax.Array], indices: jax.Array) -> jax.Array:
    """The entries of the flat store at ``indices`` (0 at padding slots)."""
    return jnp.take(concat(leaves), indices, mode="fill", fill_value=0)


def scatter(values: jax.Array, indices: jax.Array, like: Sequence[Any]) -> list:
    """``values`` at ``indices`` of the concatenation of ``like``'s leaves, ``-0.0`` elsewhere
    (an update that leaves every other entry bitwise unchanged), split back into leaves."""
    dtype = jnp.result_type(*like)
    n = sum(math.prod(np.shape(x)) for x in like)
    flat = jnp.full((n,), -0.0, dtype).at[indices].set(values.astype(dtype), mode="drop")
    out, off = [], 0
    for x in like:
        size = math.prod(np.shape(x))
        out.append(flat[off : off + size].reshape(np.shape(x)).astype(jnp.result_type(x)))
        off += size
    return out


def indices_to_masks(indices: jax.Array, shapes: Sequence[tuple]) -> list:
    """Bool masks (one per shape) of a flat store's indices; traced indices are fine."""
    n = sum(math.prod(s) for s in shapes)
    flat = jnp.zeros((n,), bool).at[indices].set(True, mode="drop")
    out, off = [], 0
    for s in shapes:
        out.append(flat[off : off + math.prod(s)].reshape(s))
        off += math.prod(s)
    return out


def remap_slots(inner_state: Any, old: jax.Array, new: jax.Array, *, n: int) -> Any:
    """Moves the per-entry leaves of ``inner_state`` (those under a ``"selected"`` key) from the
    slots of ``old`` to those of ``new`` (both ascending, padded with ``n``); new entries get 0."""
    pos = jnp.clip(jnp.searchsorted(old, new), 0, old.shape[0] - 1)
    hit = (old[pos] == new) & (new < n)

    def move(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if "selected" not in keys or np.shape(x) != old.shape:
            return x
        return jnp.where(hit, x[pos], jnp.zeros((), x.dtype))

    return jax.tree_util.tree_map_with_path(move, inner_state)
