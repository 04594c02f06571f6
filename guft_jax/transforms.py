"""GUFT and element-level masks as optax gradient transformations, for any model and loop.

Three pieces, each an ``optax.GradientTransformationExtraArgs`` built by a factory (optax's own
conventions: ``init(params) -> state``, ``update(updates, state, params=None, **extra_args)``,
a small NamedTuple state), so they chain with anything optax offers:

- :func:`masked`: an element-level mask around an inner optimizer (True = trainable). Unlike
  ``optax.masked``, which passes the raw gradient of its masked-out leaves through as their
  update, :func:`masked` freezes every entry outside its mask (its update there is ``-0.0``).
  Gradients outside the mask are zeroed before ``inner`` (its moments stay exactly zero there,
  and an entry unfrozen later starts from zero moments); ``optax.apply_updates`` then leaves
  frozen entries bitwise unchanged, decoupled weight decay included. The masking is
  :func:`guft_jax.optim.masked_update`, the engine's. The mask is fixed at construction, a
  function of the params, or the ``mask=`` extra argument of ``update`` (a traced value: a
  changing mask never retraces). ``sparse=True`` keeps ``inner``'s state only for the selected
  entries.
- :func:`gradual_unfreeze`: GUFT (docs: GUFT guide) as a transform. Its state holds
  the OR-merged mask (``sparse=True``: the selected entries' indices and ``inner``'s state for
  them only) and the round counter; at the scheduled steps it reads the ``saliency=`` extra
  argument (a score pytree, e.g. from :func:`guft_jax.saliency.compute`) and adds its exact
  top-``k`` (:func:`guft_jax.guft.select`, the selection rule of :func:`guft_jax.guft.guft`).
  The round runs inside the jitted step (``lax.cond`` / ``lax.switch``): one trace for a whole
  run. :func:`round_due` / :func:`updates_until_round` tell the loop when to compute saliency.
- :func:`oneshot_mask` / :func:`magnitude_mask`: the one-shot masks (SNIP, SalUN, Fisher,
  magnitude; docs: sparse methods) as ``scores -> mask`` functions whose mask feeds :func:`masked`.

Parameters are named by ``/``-joined key paths (``Conv_0/kernel``); a Flax NNX ``State``'s
trailing ``value`` attribute is dropped, so NNX and linen params are selected by the same regexes.
The task head (``head=``) trains in full; the default names the ``head`` subtree where there is
one and nothing otherwise.

Gradient clipping: put it inside the mask, ``masked(optax.chain(optax.clip_by_global_norm(1.0),
optax.adamw(1e-3)))``, to clip by the norm of the gradients that train (what
:func:`guft_jax.train.fit` does); a clip before :func:`masked` also counts the frozen entries'
gradients in the norm.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guft_jax import guft as guft_lib
from guft_jax import masks as masks_lib
from guft_jax import optim
from guft_jax import paths as paths_lib

PyTree = Any


class _DefaultHead(str):
    """The default ``head=``: the regex ``^head/`` where it matches, no head leaf where not."""

    __slots__ = ()


DEFAULT_HEAD = _DefaultHead(paths_lib.HEAD_PATTERN)

# ----------------------------------------------------------------------------- paths


def path_str(path: Sequence[Any]) -> str:
    """``/``-joined key path of a leaf; an NNX ``Variable``'s trailing ``.value`` is dropped."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return paths_lib.key_to_str(path)


def tree_paths(tree: PyTree) -> list[str]:
    """The ``/``-joined paths of ``tree``'s leaves (NNX-normalised), in ``tree_leaves`` order.

    >>> tree_paths({"Dense_0": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}})
    ['Dense_0/bias', 'Dense_0/kernel']
    """
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_paths(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:
    """``tree_map`` whose function receives the leaf's :func:`path_str` first (keeps the
    tree's type: a Flax NNX ``State`` stays a ``State``)."""
    return jax.tree_util.tree_map_with_path(lambda p, *x: fn(path_str(p), *x), tree, *rest)


def _patterns(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def match_paths(tree: PyTree, patterns: str | Sequence[str] | None, *, field: str) -> list[str]:
    """Paths of ``tree`` matched (``re.search``) by any of ``patterns``.

    Raises:
      ValueError: a pattern matches no path (naming ``field`` and the pattern); not for the
        default head (:data:`DEFAULT_HEAD`), which then matches nothing.
    """
    all_paths = tree_paths(tree)
    out = []
    for pat in _patterns(patterns):
        hit = [p for p in all_paths if re.search(pat, p)]
        if not hit and not isinstance(patterns, _DefaultHead):
            raise ValueError(
                f"{field}: regex {pat!r} matches no parameter; example paths: {all_paths[:6]}"
            )
        out += hit
    return [p for p in all_paths if p in set(out)]


class Selection(NamedTuple):
    """Which leaves a selective method may edit (``eligible``: ``{key: shape}``, keys as in
    :class:`guft_jax.guft.GuftState`) and which always train in full (``full``: paths)."""

    eligible: dict
    full: frozenset


def _check_keys(all_paths: list[str]) -> None:
    seen: dict = {}
    for p in all_paths:
        key = masks_lib.leaf_key(p)
        if key in seen:
            raise ValueError(
                f"params: leaves {seen[key]!r} and {p!r} have the same mask key {key!r} (a '.' "
                "or '/' inside a key name); rename one of them"
            )
        seen[key] = p


def eligibility(
    tree: PyTree,
    *,
    eligible: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = DEFAULT_HEAD,
) -> Selection:
    """The eligible leaves of any param pytree (:func:`guft_jax.masks.eligible_leaves` rules on
    its NNX-normalised paths), minus the ``head`` leaves, which train in full (GUFT's
    selected entries are :func:`guft_jax.guft.selection`).

    Raises:
      ValueError: a regex matching nothing (``head`` when given explicitly, ``guft.include``,
        ``guft.exclude``), an unknown preset, nothing eligible, or two leaves whose paths give
        the same mask key.
    """
    all_paths = tree_paths(tree)
    _check_keys(all_paths)
    full = match_paths(tree, head, field="head") if head is not None else []
    view: dict = {}
    for p, (_, x) in zip(all_paths, jax.tree_util.tree_flatten_with_path(tree)[0], strict=True):
        if p not in full:
            paths_lib.set(view, p, jax.ShapeDtypeStruct(np.shape(x), jnp.float32))
    if not view:
        raise ValueError("head: every parameter is a head leaf; nothing is eligible")
    elig = masks_lib.eligible_leaves(view, _patterns(include) or None, exclude, preset=eligible)
    return Selection(elig, frozenset(full))


def full_mask(tree: PyTree, sel: Selection, partial: dict) -> PyTree:
    """A bool pytree shaped like ``tree``: ``partial[key]`` on eligible leaves, True on the
    ``full`` (head) leaves, False elsewhere."""

    def leaf(p, x):
        key = masks_lib.leaf_key(p)
        if key in partial:
            return partial[key]
        return jnp.full(np.shape(x), p in sel.full, bool)

    return map_paths(leaf, tree)


# ----------------------------------------------------------------------------- sparse store
# A flat store: int32 indices into the concatenation of some leaves (raveled, in a fixed order),
# ascending, padded with the sentinel ``n`` (the concatenation's size) up to a static capacity of
# at least 1 (orbax cannot save zero-size arrays). The inner optimizer sees one vector of the
# entries at those indices; the padded slots read 0 and are dropped when scattering back.


def _concat(leaves: Sequence[jax.Array]) -> jax.Array:
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def _gather(leaves: Sequence[jax.Array], indices: jax.Array) -> jax.Array:
    return jnp.take(_concat(leaves), indices, mode="fill", fill_value=0)


def _scatter(values: jax.Array, indices: jax.Array, like: Sequence[Any]) -> list:
    """``values`` at ``indices`` of the concatenation of ``like``'s leaves, ``-0.0`` elsewhere."""
    dtype = jnp.result_type(*like)
    n = sum(math.prod(np.shape(x)) for x in like)
    flat = jnp.full((n,), -0.0, dtype).at[indices].set(values.astype(dtype), mode="drop")
    out, off = [], 0
    for x in like:
        size = math.prod(np.shape(x))
        out.append(flat[off : off + size].reshape(np.shape(x)).astype(jnp.result_type(x)))
        off += size
    return out


def _host_indices(mask_leaves: Sequence[Any], capacity: int | None = None) -> jax.Array:
    flat = np.concatenate([np.asarray(m, bool).reshape(-1) for m in mask_leaves])
    idx = np.flatnonzero(flat)
    cap = max(1, len(idx) if capacity is None else capacity)
    out = np.full((cap,), flat.size, np.int32)
    out[: len(idx)] = idx
    return jnp.asarray(out)


def _indices_to_masks(indices: jax.Array, shapes: Sequence[tuple]) -> list:
    n = sum(math.prod(s) for s in shapes)
    flat = jnp.zeros((n,), bool).at[indices].set(True, mode="drop")
    out, off = [], 0
    for s in shapes:
        out.append(flat[off : off + math.prod(s)].reshape(s))
        off += math.prod(s)
    return out


def _remap(inner_state: PyTree, old: jax.Array, new: jax.Array, *, n: int) -> PyTree:
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


# ----------------------------------------------------------------------------- masked


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
        indices = _host_indices(jax.tree_util.tree_leaves(m))
        return SparseMaskedState(indices, inner.init(_gather(jax.tree.leaves(params), indices)))

    def update_fn(updates, state, params=None, **extra):
        if "mask" in extra:
            raise ValueError("mask: sparse=True fixes the mask at construction; build a new one")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        p_sel = None if params is None else _gather(jax.tree.leaves(params), state.indices)
        new, inner_state = inner.update(
            _gather(leaves, state.indices), state.inner_state, p_sel, **extra
        )
        out = _scatter(new, state.indices, leaves)
        return jax.tree_util.tree_unflatten(treedef, out), SparseMaskedState(
            state.indices, inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- GUFT


class GradualUnfreezeState(NamedTuple):
    """State of :func:`gradual_unfreeze`.

    - ``count``: updates done (int32); the round scheduled at step ``s`` runs in the update with
      ``count == s``, before that step's gradients are applied.
    - ``round``: rounds done (int32).
    - ``next_at``: the step of the next round (int32; -1 when every round is done), what
      :func:`round_due` reads.
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
      eligible leaves (in :func:`eligibility` order), ascending, padded with that size up to the
      store's capacity.
    - ``need``: the slots the next round needs (int32; ``capacity="grow"``: :func:`grow` pads
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


_UNFREEZE_STATES = (GradualUnfreezeState, SparseUnfreezeState)


def schedule_steps(recompute_epochs: Sequence[int], *, steps_per_epoch: int) -> list[int]:
    """Optimizer steps of GUFT's 1-indexed recompute epochs: the first step of each.

    >>> schedule_steps([1, 6, 11], steps_per_epoch=16)
    [0, 80, 160]
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch}")
    e = [int(x) for x in recompute_epochs]
    if not e or e[0] < 1 or sorted(set(e)) != e:
        raise ValueError(f"recompute_epochs: must be strictly increasing integers >= 1, got {e}")
    return [(int(e) - 1) * steps_per_epoch for e in recompute_epochs]


def _check_options(allocation, normalize, eligible):
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


def _check_scores(scores: dict, where: str) -> None:
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
    """GUFT, Gradual Unfreeze Fine-Tuning (docs: GUFT guide), as an optax transform.

    At the update whose step count is ``steps[i]`` the transform takes the ``saliency=`` extra
    argument, selects the exact top ``k_i = round(ratios[i] · N)`` of it over the ``N`` eligible
    entries (``allocation``, ``normalize``, ``exclude_selected`` as in
    :func:`guft_jax.guft.guft`; the same :func:`guft_jax.guft.select`) and ORs it into the mask;
    then, at every step, it applies ``inner`` restricted to the mask as :func:`masked` does
    (frozen entries bitwise unchanged, zero moments until unfrozen). ``head`` leaves train in
    full and are outside the budget; every other non-eligible leaf stays frozen. ``saliency`` is
    consumed here, not passed on to ``inner``.

    The round is part of the traced update (``lax.cond`` on the step count, ``lax.switch`` over
    the rounds), so a jitted train step is traced once for the whole run. ``saliency`` must
    therefore be passed at *every* update (its value is read only at the scheduled steps; pass
    the latest scores, or zeros, in between; :func:`round_due` says when new ones are needed): a
    pytree whose leaves include every eligible path (the params' shape, as
    :func:`guft_jax.saliency.compute` returns, or just the eligible leaves). Scores that are all
    zero or not finite at a round raise a ``ValueError`` naming the round (from the compiled
    step: it reaches the caller wrapped in JAX's runtime error).

    ``sparse=True`` keeps ``inner``'s state for the selected entries and the head only: one
    store of slots (an int32 index each) that holds the OR of the rounds. ``capacity="all"``
    sizes it at ``init`` for every round's budget, ``min(N, Σ k_i)``: the step never retraces
    and ``jax.eval_shape(tx.init, params)`` is the checkpoint's restore target.
    ``capacity="grow"`` starts at the first round's ``k_0`` and grows to ``min(N, k_0 + ... +
    k_i)`` before round ``i``: the loop calls ``opt = grow(opt)`` when :func:`round_due` says a
    round is next (one retrace per growth, logged); a round meeting a store too small raises.
    With an element-wise ``inner`` (AdamW, SGD, Lion, ...) it follows
    the dense form (the same arithmetic on the same entries); see :func:`masked` for optimizers
    that use a leaf's shape.

    Args:
      inner: the optimizer of the unfrozen entries (e.g. ``optax.adamw(1e-3)``).
      steps: 0-indexed optimizer steps of the rounds, strictly increasing
        (:func:`schedule_steps` converts GUFT's recompute epochs).
      ratios: fraction of the eligible entries chosen at each round (one per step).
      eligible: a preset of :data:`guft_jax.masks.ELIGIBILITY` (``"all"``: every non-head leaf;
        ``"blocks"``: the guft_jax ViT's encoder-block Dense kernels and biases).
      include, exclude: regexes over ``/``-joined param paths, on top of ``eligible``.
      head: regexes of the leaves trained in full (the task head); None for none. The default
        (:data:`DEFAULT_HEAD`) is ``^head/`` where that matches a leaf and no head leaf otherwise (a
        model with another head name, or a partition of ``optax.multi_transform``); an
        explicit regex that matches nothing is an error.
      allocation: ``"global"`` (the paper), ``"per_tensor"`` or ``"per_row"``.
      normalize: None or ``"mean"`` (per-tensor score normalisation before a global ranking).
      exclude_selected: rank only entries not selected yet (the budget grows by exactly ``k_i``).
      sparse: keep ``inner``'s state for the selected entries only (:class:`SparseUnfreezeState`).
      capacity: the sparse store's size, ``"all"`` (every round's budget from the start) or
        ``"grow"`` (grown by :func:`grow` before each round).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`GradualUnfreezeState`
      (``sparse=True``: :class:`SparseUnfreezeState`).

    Raises:
      ValueError: a malformed schedule or option (naming it), a regex matching nothing,
        ``update`` without ``saliency``, a saliency tree missing an eligible leaf, or all-zero
        or non-finite saliency at a round.

    >>> tx = gradual_unfreeze(optax.adamw(1e-3), steps=[0, 10, 20], ratios=[0.001] * 3)
    """
    steps = [int(s) for s in steps]
    ratios = [float(r) for r in ratios]
    if not steps or any(s < 0 for s in steps) or sorted(set(steps)) != steps:
        raise ValueError(f"steps: must be strictly increasing integers >= 0, got {steps}")
    if len(steps) != len(ratios):
        raise ValueError(f"ratios: needs one ratio per step ({len(steps)}), got {len(ratios)}")
    guft_lib._validate_ratios(ratios)
    _check_options(allocation, normalize, eligible)
    if capacity not in CAPACITIES:
        raise ValueError(f"capacity: must be one of {list(CAPACITIES)}, got {capacity!r}")
    inner = optax.with_extra_args_support(inner)
    opts = dict(eligible=eligible, include=include, exclude=exclude, head=head)
    rounds = len(steps)
    steps_arr = np.asarray(steps + [-1], np.int32)

    def budgets(sel: Selection) -> list[int]:
        n = sum(math.prod(s) for s in sel.eligible.values())
        ks = [masks_lib.budget(r, n) for r in ratios]
        if sum(ks) > n:
            raise ValueError(f"ratios: budgets {ks} exceed the {n} eligible entries")
        if exclude_selected and allocation != "global":
            masks_lib.check_traced_bound(max(ks), n)
        return ks

    def split(tree, sel):
        """(eligible leaves in selection order, head leaves in tree order)."""
        leaves = jax.tree_util.tree_leaves(tree)
        by_key = {masks_lib.leaf_key(p): x for p, x in zip(tree_paths(tree), leaves, strict=True)}
        heads = [x for p, x in zip(tree_paths(tree), leaves, strict=True) if p in sel.full]
        return [by_key[k] for k in sel.eligible], heads

    def init_fn(params):
        sel = eligibility(params, **opts)
        ks = budgets(sel)
        count, rnd, nxt = (jnp.asarray(v, jnp.int32) for v in (0, 0, steps[0]))
        if not sparse:
            mask = {k: jnp.zeros(s, bool) for k, s in sel.eligible.items()}
            return GradualUnfreezeState(count, rnd, nxt, mask, inner.init(params))
        caps = needs(sel, ks)
        n = sum(math.prod(s) for s in sel.eligible.values())
        indices = jnp.full((caps[0] if capacity == "grow" else caps[-1],), n, jnp.int32)
        elig, heads = split(params, sel)
        store = {"selected": _gather(elig, indices), "full": tuple(heads)}
        need = jnp.asarray(caps[0], jnp.int32)
        return SparseUnfreezeState(count, rnd, nxt, indices, need, inner.init(store))

    def needs(sel, ks) -> list[int]:
        """Slots the store needs once round ``i`` is done: ``min(N, k_0 + ... + k_i)``, >= 1."""
        n = sum(math.prod(s) for s in sel.eligible.values())
        return [max(1, min(n, sum(ks[: i + 1]))) for i in range(rounds)]

    def select_round(i, scores, prev, ks):
        _check_scores(scores, f"round {i + 1} of {rounds} (step {steps[i]})")
        return guft_lib.select(
            scores,
            prev,
            ks[i],
            exclude_selected=exclude_selected,
            allocation=allocation,
            normalize=normalize,
        )

    def update_fn(updates, state, params=None, *, saliency=None, **extra):
        if saliency is None:
            raise ValueError(
                "saliency: gradual_unfreeze needs saliency=<score pytree> at every update (read "
                "at the scheduled steps only), so that the jitted step is traced once"
            )
        sel = eligibility(updates, **opts)
        ks = budgets(sel)
        scores = _scores_of(saliency, sel)
        at = jnp.minimum(state.round, rounds - 1)
        due = (state.round < rounds) & (state.count >= jnp.asarray(steps_arr)[at])
        if not isinstance(due, jax.core.Tracer) and bool(due):  # eager: a plain ValueError
            i = int(at)
            _check_scores(dict(scores), f"round {i + 1} of {rounds} (step {steps[i]})")
        new_round = state.round + due.astype(jnp.int32)
        head = (
            state.count + 1,
            new_round,
            jnp.asarray(steps_arr)[jnp.minimum(new_round, rounds)],
        )
        if not sparse:
            branches = [
                functools.partial(lambda i, m: select_round(i, scores, m, ks), i)
                for i in range(rounds)
            ]
            mask = jax.lax.cond(
                due, lambda m: jax.lax.switch(at, branches, m), lambda m: dict(m), state.mask
            )
            m_full = full_mask(updates, sel, mask)
            new, inner_state = optim.masked_update(
                inner, updates, state.inner_state, params, m_full, **extra
            )
            return new, GradualUnfreezeState(*head, mask, inner_state)
        return _sparse_step(updates, state, params, extra, sel, scores, due, at, head, ks)

    def _sparse_step(updates, state, params, extra, sel, scores, due, at, head, ks):
        shapes = list(sel.eligible.values())
        n = sum(math.prod(s) for s in shapes)

        caps = needs(sel, ks)

        def round_i(i, carry):
            idx, inner_state = carry
            if idx.shape[0] < caps[i]:  # static: this round cannot fit; raise if it runs
                jax.debug.callback(
                    functools.partial(_raise_small, have=idx.shape[0], need=caps[i], i=i + 1)
                )
            prev = dict(zip(sel.eligible, _indices_to_masks(idx, shapes), strict=True))
            merged = select_round(i, scores, prev, ks)
            flat = jnp.concatenate([jnp.ravel(merged[k]) for k in sel.eligible])
            new_idx = jnp.nonzero(flat, size=idx.shape[0], fill_value=n)[0].astype(jnp.int32)
            return new_idx, _remap(inner_state, idx, new_idx, n=n)

        branches = [functools.partial(round_i, i) for i in range(rounds)]
        idx, inner_state = jax.lax.cond(
            due,
            lambda c: jax.lax.switch(at, branches, c),
            lambda c: c,
            (state.indices, state.inner_state),
        )
        elig_u, head_u = split(updates, sel)
        g = {"selected": _gather(elig_u, idx), "full": tuple(head_u)}
        p = None
        if params is not None:
            elig_p, head_p = split(params, sel)
            p = {"selected": _gather(elig_p, idx), "full": tuple(head_p)}
        new, inner_state = inner.update(g, inner_state, p, **extra)
        by_key = dict(zip(sel.eligible, _scatter(new["selected"], idx, elig_u), strict=True))
        heads = iter(new["full"])

        def leaf(path, x):
            if path in sel.full:
                return next(heads)
            key = masks_lib.leaf_key(path)
            return by_key[key] if key in by_key else jnp.full_like(x, -0.0)

        out = map_paths(leaf, updates)
        need = jnp.asarray(caps + [caps[-1]], jnp.int32)[head[1]]
        return out, SparseUnfreezeState(*head, idx, need, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


CAPACITIES = ("all", "grow")


def _raise_small(*, have: int, need: int, i: int) -> None:
    raise ValueError(
        f"capacity: the sparse store has {have} slots and round {i} needs {need}; call "
        "opt_state = guft_jax.transforms.grow(opt_state) before the update that runs it "
        "(when round_due(opt_state) is True)"
    )


def _pad_slots(x: Any, size: int, fill: int) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((size,), x.dtype, sharding=x.sharding)
    return jnp.concatenate([x, jnp.full((size - x.shape[0],), fill, x.dtype)])


def grow(
    opt_state: PyTree, *, capacity: int | None = None, log: Callable[[str], None] = print
) -> PyTree:
    """``opt_state`` with the sparse :func:`gradual_unfreeze` store padded to the slots its next
    round needs (``capacity="grow"``), or to ``capacity``; unchanged when large enough.

    New slots hold no entry and zero optimizer state, so the run is the same as with a store
    sized for every round from the start; a jitted step retraces once for the new size. With
    ``capacity`` it also pads an abstract state (``jax.eval_shape(tx.init, params)``) to a
    checkpoint's size, the restore target of a grown run.

    Args:
      opt_state: the whole optimizer state (searched as :func:`find_state` does).
      capacity: the slots wanted (default: the next round's need, read from the state).
      log: receives one line per growth.

    Returns:
      The optimizer state, the same structure with longer store vectors.

    Raises:
      ValueError: ``opt_state`` holds no :class:`SparseUnfreezeState`.
    """
    st = find_state(opt_state, SparseUnfreezeState)
    have = st.indices.shape[0]
    want = int(st.need) if capacity is None else int(capacity)
    if want <= have:
        return opt_state
    log(f"gradual_unfreeze: sparse store {have} -> {want} slots (the step retraces once)")
    big = np.iinfo(np.int32).max  # an index >= every real one: an empty slot
    grown = st._replace(
        indices=_pad_slots(st.indices, want, big),
        inner_state=jax.tree_util.tree_map_with_path(
            lambda p, x: (
                _pad_slots(x, want, 0)
                if "selected" in [getattr(k, "key", None) for k in p] and np.shape(x) == (have,)
                else x
            ),
            st.inner_state,
        ),
    )
    return _replace_node(opt_state, st, grown)


def _replace_node(tree: Any, old: Any, new: Any) -> Any:
    """``tree`` with the node ``old`` (by identity) replaced by ``new`` (tuples, NamedTuples,
    lists and dicts are rebuilt along the way)."""
    if tree is old:
        return new
    if isinstance(tree, dict):
        return type(tree)((k, _replace_node(v, old, new)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_replace_node(v, old, new) for v in tree))
    if isinstance(tree, tuple | list):
        return type(tree)(_replace_node(v, old, new) for v in tree)
    return tree


def _scores_of(saliency: PyTree, sel: Selection) -> dict:
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


def find_state(opt_state: PyTree, kind: type | tuple = _UNFREEZE_STATES) -> Any:
    """The first state of type ``kind`` inside a (chained, nested) optimizer state (by default
    a :class:`GradualUnfreezeState` or :class:`SparseUnfreezeState`).

    Raises:
      ValueError: there is none.
    """
    stack = [opt_state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, kind):
            return node
        if isinstance(node, tuple | list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
    names = [k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,))]
    raise ValueError(f"opt_state: holds no {' or '.join(names)}")


def updates_until_round(opt_state: PyTree, *, every_k: int = 1) -> int | None:
    """How many more ``update`` calls of the whole optimizer the loop may run with the saliency
    it holds: 0 means compute fresh scores now, the next call needs them for a
    :func:`gradual_unfreeze` round; None means every round is done.

    A loop computes saliency only when this is 0 (:func:`round_due`), and a ``lax.scan`` loop
    scans this many steps with its current scores before asking again. Under
    ``optax.MultiSteps(every_k_schedule=every_k)`` pass ``every_k``: MultiSteps runs the inner
    update at every micro-step (keeping its state only when an accumulation completes), so the
    scores are due at the first micro-step of the accumulation that ends in the round and serve
    all of its micro-steps (the params do not change inside it). Reads the state's scalars from
    the device.

    Args:
      opt_state: the whole optimizer's state (chains, ``MultiSteps`` and ``inject_hyperparams``
        are searched).
      every_k: the ``MultiSteps`` accumulation length (1 without ``MultiSteps``).

    Raises:
      ValueError: ``opt_state`` holds no :func:`gradual_unfreeze` state, or ``every_k`` > 1
        without a ``MultiSteps`` state.

    >>> tx = gradual_unfreeze(optax.sgd(0.1), steps=[2], ratios=[0.5], head=None)
    >>> updates_until_round(tx.init({"w": jnp.ones(4)}))
    2
    """
    st = find_state(opt_state)
    nxt, count = (int(x) for x in jax.device_get((st.next_at, st.count)))
    if nxt < 0:
        return None
    left = max(nxt - count, 0)
    if every_k == 1:
        return left
    mini = int(find_state(opt_state, optax.MultiStepsState).mini_step)
    if left == 0 and mini > 0:  # inside the round's accumulation: its scores are in hand
        return every_k - mini
    return left * every_k - mini


def round_due(opt_state: PyTree, *, every_k: int = 1) -> bool:
    """Whether the loop must compute fresh saliency before the next ``update``
    (:func:`updates_until_round` is 0): that update runs a :func:`gradual_unfreeze` round, or
    under ``MultiSteps`` starts the accumulation that ends in one.

    >>> tx = gradual_unfreeze(optax.sgd(0.1), steps=[0], ratios=[0.5], head=None)
    >>> round_due(tx.init({"w": jnp.ones(4)}))
    True
    """
    return updates_until_round(opt_state, every_k=every_k) == 0


def unfrozen(
    opt_state: PyTree,
    params: PyTree,
    *,
    head: str | Sequence[str] | None = DEFAULT_HEAD,
    **options: Any,
) -> PyTree:
    """The full bool mask (True = trains) of the :func:`gradual_unfreeze` inside ``opt_state``,
    shaped like ``params`` (pass the same ``head`` / ``eligible`` / ``include`` / ``exclude``)."""
    st = find_state(opt_state)
    sel = eligibility(params, head=head, **options)
    if isinstance(st, SparseUnfreezeState):
        masks = _indices_to_masks(st.indices, list(sel.eligible.values()))
        return full_mask(params, sel, dict(zip(sel.eligible, masks, strict=True)))
    return full_mask(params, sel, st.mask)


# ----------------------------------------------------------------------------- one-shot masks


def oneshot_mask(
    scores: PyTree,
    *,
    ratio: float | None = None,
    k: int | None = None,
    eligible: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = DEFAULT_HEAD,
    allocation: str = "global",
    normalize: str | None = None,
) -> PyTree:
    """A one-shot saliency mask (docs: sparse methods): the exact top-``k`` of ``scores`` over the
    eligible entries, ``head`` leaves True, every other leaf False; feed it to :func:`masked`.

    The scores say which method it is: :func:`guft_jax.saliency.compute` with
    ``score="snip"`` (``|g ⊙ w|`` on one batch), ``"salun"`` (``|Σ g|``), ``"fisher"``
    (``Σ g²``), ``"guft"`` (``Σ|g|``), or ``|w|`` for magnitude (:func:`magnitude_mask`).

    Args:
      scores: a score pytree shaped like the params.
      ratio: fraction of the eligible entries (``k = round(ratio · N)``); or give ``k``.
      k: the number of entries.
      eligible, include, exclude, head, allocation, normalize: as :func:`gradual_unfreeze`.

    Returns:
      A bool pytree shaped like ``scores`` with exactly ``k`` True entries outside ``head``.

    Raises:
      ValueError: neither or both of ``ratio`` and ``k``, an invalid option, or scores that
        are all zero or not finite over the eligible entries.

    >>> s = {"head": {"w": jnp.ones(2)}, "a": jnp.array([3.0, 1.0, 2.0])}
    >>> m = oneshot_mask(s, k=2)
    >>> m["a"].tolist(), m["head"]["w"].tolist()
    ([True, False, True], [True, True])
    """
    if (ratio is None) == (k is None):
        raise ValueError("ratio, k: give exactly one of them")
    _check_options(allocation, normalize, eligible)
    sel = eligibility(scores, eligible=eligible, include=include, exclude=exclude, head=head)
    n = sum(math.prod(s) for s in sel.eligible.values())
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
        k = masks_lib.budget(ratio, n)
    kw = {} if normalize is None else dict(normalize=normalize)
    picked = _scores_of(scores, sel)
    _check_scores(picked, "oneshot_mask")
    chosen = masks_lib.topk_mask(picked, k, allocation=allocation, **kw)
    return full_mask(scores, sel, chosen)


def magnitude_mask(params: PyTree, **kwargs: Any) -> PyTree:
    """The magnitude (lottery-ticket) mask: :func:`oneshot_mask` of ``|w|``.

    >>> magnitude_mask({"w": jnp.array([0.1, -3.0, 2.0])}, k=1, head=None)["w"].tolist()
    [False, True, False]
    """
    return oneshot_mask(jax.tree_util.tree_map(jnp.abs, params), **kwargs)
