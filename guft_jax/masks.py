"""Boolean parameter masks (True = trainable): global top-k selection, OR-merge, reports.

Masks here are dicts ``{key: bool array}`` over the *eligible* leaves (``key`` is the leaf's
``/``-joined path with ``/`` -> ``.``), the layout GUFT keeps in its state.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths

SEP = "."


def leaf_key(path: str) -> str:
    return path.replace("/", SEP)


def key_path(key: str) -> str:
    return key.replace(SEP, "/")


def eligible_leaves(
    params: Any, include: list[str] | str | None = None, exclude: list[str] | str | None = None
) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the eligible leaves: every backbone leaf (never the head) matching an
    ``include`` regex (all if None) and no ``exclude`` regex.

    Raises:
      ValueError: a regex matches nothing, or nothing is eligible.
    """
    sel = paths.select(params, include, exclude, field="guft.include")
    out = {}
    for (p, x), m in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(sel), strict=True
    ):
        path = paths.key_to_str(p)
        if m and not path.startswith("head/"):
            out[leaf_key(path)] = tuple(x.shape)
    if not out:
        raise ValueError("guft.include: no eligible parameter (the head is never eligible)")
    return out


def topk_mask(
    scores: dict[str, jax.Array], k: int, *, exclude: dict[str, jax.Array] | None = None
) -> dict[str, jax.Array]:
    """The exactly-``k`` globally largest entries of ``scores`` across all tensors.

    Ties are broken by position in the concatenation of the tensors in sorted-key order (the lower
    flat index wins; ``lax.top_k`` guarantees this). One ``top_k`` over the flat vector, no full
    sort repeated. Entries where ``exclude`` is True are never chosen (GUFT's ``exclude_selected``).

    Raises:
      ValueError: ``k`` is negative or larger than the number of selectable entries.
    """
    keys = sorted(scores)
    n_sel = sum(math.prod(scores[key].shape) for key in keys)
    if exclude is not None:
        n_sel -= int(_count_true({key: exclude[key] for key in keys}))
    if not 0 <= k <= n_sel:
        raise ValueError(f"k: must be in [0, {n_sel}] selectable entries, got {k}")
    return _topk_flat(scores, k, exclude)


@jax.jit
def _count_true(mask: dict) -> jax.Array:
    return sum(jnp.sum(m, dtype=jnp.int32) for m in mask.values())


@functools.partial(jax.jit, static_argnums=1)
def _topk_flat(scores: dict, k: int, exclude: dict | None) -> dict:
    # One compiled program (not one eager op per tensor): a mask recompute costs one compile.
    keys = sorted(scores)
    flat = jnp.concatenate([jnp.ravel(scores[key]).astype(jnp.float32) for key in keys])
    if exclude is not None:
        ex = jnp.concatenate([jnp.ravel(exclude[key]) for key in keys])
        flat = jnp.where(ex, -jnp.inf, flat)
    flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat)
    _, idx = jax.lax.top_k(flat, k)
    chosen = jnp.zeros(flat.shape, bool).at[idx].set(True)
    out, off = {}, 0
    for key in keys:
        size = math.prod(scores[key].shape)
        out[key] = chosen[off : off + size].reshape(scores[key].shape)
        off += size
    return out


def budget(ratio: float, n_eligible: int) -> int:
    """``k = round(ratio · N_eligible)`` (Python's round-half-even)."""
    return int(round(ratio * n_eligible))


@jax.jit
def merge_masks(a: dict, b: dict) -> dict:
    """Element-wise OR (``jnp.logical_or``) of two masks with the same keys."""
    return {k: jnp.logical_or(a[k], b[k]) for k in a}


@jax.jit
def _per_leaf_counts(mask: dict) -> dict:
    return {k: jnp.sum(m, dtype=jnp.int32) for k, m in mask.items()}


def count(mask: dict) -> int:
    return int(sum(int(v) for v in jax.device_get(_per_leaf_counts(mask)).values()))


def mask_report(mask: dict, *, top: int | None = None) -> dict:
    """Per-tensor selected counts, per module type and layer, and the total density."""
    per = {k: int(v) for k, v in jax.device_get(_per_leaf_counts(mask)).items()}
    n = sum(math.prod(np.shape(m)) for m in mask.values())
    total = sum(per.values())
    by_type: dict[str, int] = {}
    by_layer: dict[str, int] = {}
    for k, c in per.items():
        by_type[module_type(k)] = by_type.get(module_type(k), 0) + c
        layer = next((p for p in k.split(SEP) if p.startswith("encoderblock_")), "other")
        by_layer[layer] = by_layer.get(layer, 0) + c
    tensors = dict(sorted(per.items(), key=lambda kv: -kv[1])[:top]) if top else per
    return {
        "selected": total,
        "eligible": n,
        "density": total / max(n, 1),
        "per_tensor": tensors,
        "per_module_type": by_type,
        "per_layer": by_layer,
    }


def module_type(key: str) -> str:
    """A coarse module type of a leaf key, for reports and plots."""
    p = key_path(key)
    for name, tag in (
        ("/query/", "attn.query"),
        ("/key/", "attn.key"),
        ("/value/", "attn.value"),
        ("/out/", "attn.out"),
        ("Dense_0", "mlp.fc1"),
        ("Dense_1", "mlp.fc2"),
        ("LayerNorm", "layernorm"),
        ("encoder_norm", "layernorm"),
        ("LayerScale", "layerscale"),
        ("pos_embedding", "pos_embed"),
        ("embedding", "patch_embed"),
        ("cls", "cls"),
    ):
        if name in p or p == name:
            return tag + (
                "" if tag in ("layernorm", "cls", "pos_embed") else "." + p.split("/")[-1]
            )
    return "other"
