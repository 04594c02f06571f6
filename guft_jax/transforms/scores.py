"""Saliency scores handed to a transform: picked out per eligible leaf and checked (all-zero or
non-finite scores raise one line naming the round and the likely cause)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import masks as masks_lib
from guft_jax.transforms.leaves import PyTree, Selection, path_str


def check_selection_options(allocation, normalize, eligible):
    """Raises ValueError naming the option unless ``allocation``, ``normalize`` and ``eligible``
    are among :mod:`guft_jax.masks`' choices."""
    if allocation not in masks_lib.ALLOCATIONS:
        raise ValueError(
            f"allocation: must be one of {list(masks_lib.ALLOCATIONS)}, got {allocation!r}"
        )
    if normalize not in masks_lib.NORMALIZATIONS:
        raise ValueError(
            f"normalize: must be one of {list(masks_lib.NORMALIZATIONS)}, got {normalize!r}"
        )
    if eligible not in masks_lib.ELIGIBILITY:
        raise ValueError(
            f"eligible: must be one of {sorted(masks_lib.ELIGIBILITY)}, got {eligible!r}"
        )


def saliency_error(zero: bool, nonfinite: bool, where: str) -> str | None:
    """The one-line error for unusable saliency scores (None when they are usable).

    Args:
      zero: every eligible score is zero.
      nonfinite: some score is NaN or infinite.
      where: the round, e.g. ``"round 2 of 3 (step 80)"``.

    >>> saliency_error(False, False, "round 1 of 1 (step 0)") is None
    True
    """
    if nonfinite:
        return (
            f"saliency: non-finite scores (NaN or inf) at {where}; the likely cause is a loss "
            "that overflowed or NaN weights or data: compute the saliency with a finite float32 "
            "loss"
        )
    if zero:
        return (
            f"saliency: every eligible score is zero at {where}; the likely cause is a "
            "zero-initialised head, which passes no gradient to the backbone: train the head "
            "first (or initialise it non-zero), then compute the saliency"
        )
    return None


def _raise_bad(zero, nonfinite, where: str) -> None:
    msg = saliency_error(bool(zero), bool(nonfinite), where)
    if msg is not None:
        raise ValueError(msg)


def check_scores(scores: dict, where: str) -> None:
    """Raises on all-zero or non-finite ``scores``: at once when they are concrete, from the
    compiled program (a host callback) when traced."""
    vals = list(scores.values())
    if not any(isinstance(x, jax.core.Tracer) for x in vals):
        host = [np.asarray(x) for x in vals]
        _raise_bad(
            not any(np.any(x != 0) for x in host),
            not all(np.all(np.isfinite(x)) for x in host),
            where,
        )
        return
    zero = ~jnp.any(jnp.stack([jnp.any(x != 0) for x in vals]))
    nonfinite = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in vals]))
    jax.debug.callback(functools.partial(_raise_bad, where=where), zero, nonfinite)


def scores_of(saliency: PyTree, sel: Selection) -> dict:
    """``{key: scores}`` of the eligible leaves picked out of a saliency pytree.

    Raises:
      ValueError: an eligible leaf without scores, or scores shaped unlike their leaf.
    """
    flat = {
        masks_lib.leaf_key(path_str(p)): (path_str(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(saliency)[0]
    }
    missing = [k for k in sel.eligible if k not in flat]
    if missing:
        raise ValueError(
            f"saliency: no scores for the eligible leaves {missing[:4]} (keys: paths with "
            "'/' -> '.')"
        )
    out = {}
    for k, shape in sel.eligible.items():
        path, x = flat[k]
        if tuple(np.shape(x)) != tuple(shape):
            raise ValueError(
                f"saliency: {path} has shape {np.shape(x)}, the parameter {tuple(shape)}"
            )
        out[k] = x
    return out
