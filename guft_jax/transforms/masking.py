"""Element-level masks around any optax optimizer (True = trainable), dense or with the inner
state kept for the selected entries only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from guft_jax import optim
from guft_jax.guft import indices as store
from guft_jax.transforms.leaves import PyTree


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner optimizer's state (over the whole tree)."""

    inner_state: Any


class SparseMaskedState(NamedTuple):
    """State of ``masked(..., sparse=True)``: the int32 indices of the selected entries in the
    concatenation of the raveled leaves (ascending, padded with its size to at least one slot),
    and the inner state over those entries only (one vector)."""

    indices: jax.Array
    inner_state: Any


def masked(
    inner: optax.GradientTransformation,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    sparse: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` restricted to an element-level mask (True = trainable).

    Unlike ``optax.masked``, which passes the raw gradient of the leaves outside its mask
    through as their update, this freezes every entry outside the mask. The mask here is
    element-level and may be traced data. Outside the mask the gradients reach ``inner`` as
    exact zeros and the returned updates are ``-0.0``, so after ``optax.apply_updates`` every
    frozen entry is bitwise equal to its value before the step, also under ``optax.adamw``'s
    decoupled weight decay (:func:`guft_jax.optim.masked_update`, the engine's masking). (A
    transform *after* ``masked`` in a chain that scales updates keeps them zero, but may turn
    ``-0.0`` into ``+0.0``, which then moves only a ``-0.0`` parameter to ``+0.0``.) Adam's bias
    correction uses the global step for every entry, as :func:`guft_jax.optim.masked_step` does.

    Args:
      inner: the optimizer to restrict (any ``GradientTransformation``; extra arguments given
        to ``update`` other than ``mask`` are passed on to it).
      mask: a bool pytree shaped like the params (or a prefix of it: a bool leaf may cover a
        subtree), a function ``params -> mask``, or None: then every ``update`` takes it as the
        ``mask=`` extra argument (traced; changing it never retraces).
      sparse: keep ``inner``'s state only for the selected entries: ``inner`` sees one vector
        holding the selected entries of all leaves (gathered) and its updates are scattered
        back. Needs a concrete mask (a pytree or function, not None) when ``init`` runs; the
        mask is then fixed (its indices live in the state). Element-wise optimizers (SGD,
        Adam/AdamW, Lion, RMSProp, ...) give the dense form's result; optimizers that use a
        leaf's shape or its norm (Muon, Adafactor's factored moments, LARS/LAMB trust ratios)
        see one vector instead and compute something different: use the dense form for them.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: ``update`` without a mask when none was given at construction;
        ``sparse=True`` without a mask; a non-bool mask leaf or one shaped unlike its
        parameter (naming the leaf).

    >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
    >>> tx = masked(optax.adamw(0.1, weight_decay=0.1), {"w": jnp.array([True, False, True])})
    >>> state = tx.init(params)
    >>> u, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> optax.apply_updates(params, u)["w"][1].item()
    2.0
    """
    inner = optax.with_extra_args_support(inner)
    if sparse:
        return _masked_sparse(inner, mask)

    def init_fn(params):
        return MaskedState(inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        m = _resolve(mask, extra, params, updates)
        extra.pop("mask", None)
        new, inner_state = optim.masked_update(
            inner, updates, state.inner_state, params, m, **extra
        )
        return new, MaskedState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _resolve(mask, extra, params, updates):
    if mask is None:
        if extra.get("mask") is None:
            raise ValueError(
                "mask: masked(inner) was built without a mask; pass mask=<bool pytree> to update "
                "(or build it with masked(inner, mask))"
            )
        return extra["mask"]
    if callable(mask):
        return mask(params if params is not None else updates)
    return mask


def _masked_sparse(inner, mask) -> optax.GradientTransformationExtraArgs:
    if mask is None:
        raise ValueError("mask: sparse=True needs the mask at construction (a pytree or function)")

    def init_fn(params):
        m = optim.expand_mask(mask(params) if callable(mask) else mask, params)
        indices = store.mask_indices(jax.tree_util.tree_leaves(m))
        return SparseMaskedState(
            indices, inner.init(store.gather(jax.tree.leaves(params), indices))
        )

    def update_fn(updates, state, params=None, **extra):
        if "mask" in extra:
            raise ValueError("mask: sparse=True fixes the mask at construction; build a new one")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        p_sel = None if params is None else store.gather(jax.tree.leaves(params), state.indices)
        new, inner_state = inner.update(
            store.gather(leaves, state.indices), state.inner_state, p_sel, **extra
        )
        out = store.scatter(new, state.indices, leaves)
        return jax.tree_util.tree_unflatten(treedef, out), SparseMaskedState(
            state.indices, inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
