"""GUFT (docs: GUFT guide) as an optax transform over any param pytree: the rounds' selection
(:func:`guft_jax.guft.select`), schedule budgets (:func:`guft_jax.guft.round_budgets`) and sparse
store (:mod:`guft_jax.guft.indices`) are GUFT's own.

At the update whose step count is ``steps[i]`` the transform takes the ``saliency=`` extra
argument, selects the exact top ``k_i = round(ratios[i] · N)`` of it over the ``N`` eligible
entries (``allocation``, ``normalize``, ``exclude_selected`` as in :func:`guft_jax.guft.guft`)
and ORs it into the mask; then, at every step, it applies ``inner`` restricted to the mask as
:func:`~guft_jax.transforms.masked` does (frozen entries bitwise unchanged, zero moments until
unfrozen). ``head`` leaves train in full and are outside the budget; every other non-eligible
leaf stays frozen. ``saliency`` is consumed here, not passed on to ``inner``.

The round is part of the traced update (``lax.cond`` on the step count, ``lax.switch`` over the
rounds), so a jitted train step is traced once for the whole run. ``saliency`` must therefore be
passed at *every* update (its value is read only at the scheduled steps; pass the latest scores,
or zeros, in between; :func:`~guft_jax.transforms.round_due` says when new ones are needed): a
pytree whose leaves include every eligible path (the params' shape, as
:func:`guft_jax.saliency.compute` returns, or just the eligible leaves). Scores that are all zero
or not finite at a round raise a ``ValueError`` naming the round (from the compiled step: it
reaches the caller wrapped in JAX's runtime error).

``sparse=True`` keeps ``inner``'s state for the selected entries and the head only: one store of
slots (an int32 index each) that holds the OR of the rounds. ``capacity="all"`` sizes it at
``init`` for every round's budget, ``min(N, Σ k_i)``: the step never retraces and
``jax.eval_shape(tx.init, params)`` is the checkpoint's restore target. ``capacity="grow"``
starts at the first round's ``k_0`` and grows to ``min(N, k_0 + ... + k_i)`` before round ``i``:
the loop calls ``opt = grow(opt)`` when ``round_due`` says a round is next (one retrace per
growth, logged); a round meeting a store too small raises. With an element-wise ``inner``
(AdamW, SGD, Lion, ...) it follows the dense form (the same arithmetic on the same entries); see
:func:`~guft_jax.transforms.masked` for optimizers that use a leaf's shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guft_jax import guft as guft_lib
from guft_jax import masks as masks_lib
from guft_jax import optim
from guft_jax.guft import indices as store
from guft_jax.transforms.leaves import (
    DEFAULT_HEAD,
    Selection,
    eligibility,
    full_mask,
    map_paths,
    tree_paths,
)
from guft_jax.transforms.scores import check_scores, check_selection_options, scores_of

CAPACITIES = ("all", "grow")


class GradualUnfreezeState(NamedTuple):
    """State of :func:`gradual_unfreeze`.

    - ``count``: updates done (int32); the round scheduled at step ``s`` runs in the update with
      ``count == s``, before that step's gradients are applied.
    - ``round``: rounds done (int32).
    - ``next_at``: the step of the next round (int32; -1 when every round is done), what
      ``round_due`` reads.
    - ``mask``: ``{key: bool array}`` over the eligible leaves, the OR of all rounds so far
      (keys as in :class:`guft_jax.guft.GuftState`: the path with ``/`` -> ``.``).
    - ``inner_state``: the inner optimizer's state.
    """

    count: jax.Array
    round: jax.Array
    next_at: jax.Array
    mask: dict
    inner_state: Any


class SparseUnfreezeState(NamedTuple):
    """State of ``gradual_unfreeze(..., sparse=True)``.

    - ``count``, ``round``, ``next_at``: as in :class:`GradualUnfreezeState`.
    - ``indices``: int32 indices of the selected entries in the concatenation of the raveled
      eligible leaves (in ``eligibility`` order), ascending, padded with that size up to the
      store's capacity (:mod:`guft_jax.guft.indices`).
    - ``need``: the slots the next round needs (int32; ``capacity="grow"``: ``grow`` pads
      the store to it before that round).
    - ``inner_state``: the inner optimizer's state over ``{"selected": <one vector, one slot per
      index>, "full": <the head leaves>}``.
    """

    count: jax.Array
    round: jax.Array
    next_at: jax.Array
    indices: jax.Array
    need: jax.Array
    inner_state: Any


UNFREEZE_STATES = (GradualUnfreezeState, SparseUnfreezeState)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The validated options of one :func:`gradual_unfreeze`."""

    inner: Any
    steps: tuple[int, ...]
    ratios: tuple[float, ...]
    selection: dict  # eligibility() keyword arguments
    allocation: str
    normalize: str | None
    exclude_selected: bool
    sparse: bool
    capacity: str

    @property
    def rounds(self) -> int:
        return len(self.steps)

    def budgets(self, tree) -> tuple[Selection, list[int], int]:
        """``(selection, per-round budgets, N eligible)`` over ``tree``'s leaves."""
        sel = eligibility(tree, **self.selection)
        n = sum(math.prod(s) for s in sel.eligible.values())
        ks = guft_lib.round_budgets(self.ratios, n)
        if self.exclude_selected and self.allocation != "global":
            masks_lib.check_traced_bound(max(ks), n)
        return sel, ks, n

    def where(self, i: int) -> str:
        return f"round {i + 1} of {self.rounds} (step {self.steps[i]})"

    def round_mask(self, i: int, scores: dict, prev: dict, ks: list[int]) -> dict:
        """Round ``i``'s selection OR-merged into ``prev`` (:func:`guft_jax.guft.select`)."""
        check_scores(scores, self.where(i))
        opts = dict(allocation=self.allocation, normalize=self.normalize)
        return guft_lib.select(scores, prev, ks[i], exclude_selected=self.exclude_selected, **opts)


def _plan(inner, steps, ratios, options: dict) -> _Plan:
    steps = tuple(int(s) for s in steps)
    ratios = tuple(float(r) for r in ratios)
    if not steps or any(s < 0 for s in steps) or sorted(set(steps)) != list(steps):
        raise ValueError(f"steps: must be strictly increasing integers >= 0, got {list(steps)}")
    if len(steps) != len(ratios):
        raise ValueError(f"ratios: needs one ratio per step ({len(steps)}), got {len(ratios)}")
    guft_lib.validate_ratios(ratios)
    check_selection_options(options["allocation"], options["normalize"], options["eligible"])
    if options["capacity"] not in CAPACITIES:
        raise ValueError(
            f"capacity: must be one of {list(CAPACITIES)}, got {options['capacity']!r}"
        )
    sel = {k: options.pop(k) for k in ("eligible", "include", "exclude", "head")}
    return _Plan(optax.with_extra_args_support(inner), steps, ratios, sel, **options)


def _split(tree, sel: Selection):
    """(eligible leaves in selection order, head leaves in tree order)."""
    leaves = jax.tree_util.tree_leaves(tree)
    names = tree_paths(tree)
    by_key = {masks_lib.leaf_key(p): x for p, x in zip(names, leaves, strict=True)}
    heads = [x for p, x in zip(names, leaves, strict=True) if p in sel.full]
    return [by_key[k] for k in sel.eligible], heads


def _init(plan: _Plan, params):
    sel, ks, n = plan.budgets(params)
    count, rnd, nxt = (jnp.asarray(v, jnp.int32) for v in (0, 0, plan.steps[0]))
    if not plan.sparse:
        mask = {k: jnp.zeros(s, bool) for k, s in sel.eligible.items()}
        return GradualUnfreezeState(count, rnd, nxt, mask, plan.inner.init(params))
    caps = guft_lib.store_needs(ks, n)
    indices = jnp.full((caps[0] if plan.capacity == "grow" else caps[-1],), n, jnp.int32)
    elig, heads = _split(params, sel)
    inner = plan.inner.init({"selected": store.gather(elig, indices), "full": tuple(heads)})
    need = jnp.asarray(caps[0], jnp.int32)
    return SparseUnfreezeState(count, rnd, nxt, indices, need, inner)


class _Round(NamedTuple):
    """One update's round bookkeeping (traced scalars)."""

    sel: Selection
    ks: list
    n: int
    scores: dict
    due: jax.Array  # a round runs in this update
    at: jax.Array  # its index
    head: tuple  # (count, round, next_at) after this update


def _round_of(plan: _Plan, updates, state, saliency) -> _Round:
    if saliency is None:
        raise ValueError(
            "saliency: gradual_unfreeze needs saliency=<score pytree> at every update (read "
            "at the scheduled steps only), so that the jitted step is traced once"
        )
    sel, ks, n = plan.budgets(updates)
    scores = scores_of(saliency, sel)
    steps_arr = jnp.asarray(np.asarray(list(plan.steps) + [-1], np.int32))
    at = jnp.minimum(state.round, plan.rounds - 1)
    due = (state.round < plan.rounds) & (state.count >= steps_arr[at])
    if not masks_lib.is_traced(due) and bool(due):  # eager: a plain ValueError
        check_scores(dict(scores), plan.where(int(at)))
    new_round = state.round + due.astype(jnp.int32)
    head = (state.count + 1, new_round, steps_arr[jnp.minimum(new_round, plan.rounds)])
    return _Round(sel, ks, n, scores, due, at, head)


def _dense_step(plan: _Plan, updates, state, params, extra, r: _Round):
    branches = [
        functools.partial(lambda i, m: plan.round_mask(i, r.scores, m, r.ks), i)
        for i in range(plan.rounds)
    ]
    mask = jax.lax.cond(
        r.due, lambda m: jax.lax.switch(r.at, branches, m), lambda m: dict(m), state.mask
    )
    new, inner_state = optim.masked_update(
        plan.inner, updates, state.inner_state, params, full_mask(updates, r.sel, mask), **extra
    )
    return new, GradualUnfreezeState(*r.head, mask, inner_state)


def _store_round(plan: _Plan, r: _Round, i: int, carry):
    """Round ``i`` on the sparse store: the merged selection's indices (ascending) and the inner
    state moved to their slots."""
    idx, inner_state = carry
    caps = guft_lib.store_needs(r.ks, r.n)
    if idx.shape[0] < caps[i]:  # static: this round cannot fit; raise if it runs
        jax.debug.callback(
            functools.partial(_raise_small, have=idx.shape[0], need=caps[i], i=i + 1)
        )
    shapes = list(r.sel.eligible.values())
    prev = dict(zip(r.sel.eligible, store.indices_to_masks(idx, shapes), strict=True))
    merged = plan.round_mask(i, r.scores, prev, r.ks)
    flat = jnp.concatenate([jnp.ravel(merged[k]) for k in r.sel.eligible])
    new_idx = jnp.nonzero(flat, size=idx.shape[0], fill_value=r.n)[0].astype(jnp.int32)
    return new_idx, store.remap_slots(inner_state, idx, new_idx, n=r.n)


def _sparse_step(plan: _Plan, updates, state, params, extra, r: _Round):
    branches = [functools.partial(_store_round, plan, r, i) for i in range(plan.rounds)]
    idx, inner_state = jax.lax.cond(
        r.due,
        lambda c: jax.lax.switch(r.at, branches, c),
        lambda c: c,
        (state.indices, state.inner_state),
    )
    elig_u, head_u = _split(updates, r.sel)
    g = {"selected": store.gather(elig_u, idx), "full": tuple(head_u)}
    p = None
    if params is not None:
        elig_p, head_p = _split(params, r.sel)
        p = {"selected": store.gather(elig_p, idx), "full": tuple(head_p)}
    new, inner_state = plan.inner.update(g, inner_state, p, **extra)
    by_key = dict(zip(r.sel.eligible, store.scatter(new["selected"], idx, elig_u), strict=True))
    heads = iter(new["full"])

    def leaf(path, x):
        if path in r.sel.full:
            return next(heads)
        key = masks_lib.leaf_key(path)
        return by_key[key] if key in by_key else jnp.full_like(x, -0.0)

    caps = guft_lib.store_needs(r.ks, r.n)
    need = jnp.asarray(caps + [caps[-1]], jnp.int32)[r.head[1]]
    return map_paths(leaf, updates), SparseUnfreezeState(*r.head, idx, need, inner_state)


def _raise_small(*, have: int, need: int, i: int) -> None:
    raise ValueError(
        f"capacity: the sparse store has {have} slots and round {i} needs {need}; call "
        "opt_state = guft_jax.transforms.grow(opt_state) before the update that runs it "
        "(when round_due(opt_state) is True)"
    )


def gradual_unfreeze(
    inner: optax.GradientTransformation,
    *,
    steps: Sequence[int],
    ratios: Sequence[float],
    eligible: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = DEFAULT_HEAD,
    allocation: str = "global",
    normalize: str | None = None,
    exclude_selected: bool = False,
    sparse: bool = False,
    capacity: str = "all",
) -> optax.GradientTransformationExtraArgs:
    """GUFT, Gradual Unfreeze Fine-Tuning (docs: GUFT guide), as an optax transform: rounds at
    ``steps`` select from the ``saliency=`` extra argument, ``inner`` trains the union
    (:mod:`guft_jax.transforms.unfreeze` describes the rounds, the one trace and ``sparse``).

    Args:
      inner: the optimizer of the unfrozen entries (e.g. ``optax.adamw(1e-3)``).
      steps: 0-indexed optimizer steps of the rounds, strictly increasing
        (:func:`guft_jax.guft.schedule_steps` converts GUFT's recompute epochs).
      ratios: fraction of the eligible entries chosen at each round (one per step).
      eligible: a preset of :data:`guft_jax.masks.ELIGIBILITY` (``"all"``: every non-head leaf;
        ``"blocks"``: the guft_jax ViT's encoder-block Dense kernels and biases).
      include, exclude: regexes over ``/``-joined param paths, on top of ``eligible``.
      head: regexes of the leaves trained in full (the task head); None for none. The default
        (:data:`DEFAULT_HEAD`) is ``^head/`` where that matches a leaf and no head leaf
        otherwise (a model with another head name, or a partition of
        ``optax.multi_transform``); an explicit regex that matches nothing is an error.
      allocation: ``"global"`` (the paper), ``"per_tensor"`` or ``"per_row"``.
      normalize: None or ``"mean"`` (per-tensor score normalisation before a global ranking).
      exclude_selected: rank only entries not selected yet (the budget grows by exactly ``k_i``).
      sparse: keep ``inner``'s state for the selected entries only (:class:`SparseUnfreezeState`).
      capacity: the sparse store's size, ``"all"`` (every round's budget from the start) or
        ``"grow"`` (grown by ``grow`` before each round).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`GradualUnfreezeState`
      (``sparse=True``: :class:`SparseUnfreezeState`).

    Raises:
      ValueError: a malformed schedule or option (naming it), a regex matching nothing,
        ``update`` without ``saliency``, a saliency tree missing an eligible leaf, or all-zero
        or non-finite saliency at a round.

    >>> tx = gradual_unfreeze(optax.adamw(1e-3), steps=[0, 10, 20], ratios=[0.001] * 3)
    """
    options = dict(eligible=eligible, include=include, exclude=exclude, head=head)
    options.update(allocation=allocation, normalize=normalize, exclude_selected=exclude_selected)
    plan = _plan(inner, steps, ratios, dict(options, sparse=sparse, capacity=capacity))

    def update_fn(updates, state, params=None, *, saliency=None, **extra):
        r = _round_of(plan, updates, state, saliency)
        step = _sparse_step if plan.sparse else _dense_step
        return step(plan, updates, state, params, extra, r)

    return optax.GradientTransformationExtraArgs(functools.partial(_init, plan), update_fn)
