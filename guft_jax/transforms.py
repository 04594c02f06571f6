"""GUFT and element-level masks as optax gradient transformations, for any model and loop.

Three pieces, each an ``optax.GradientTransformationExtraArgs`` built by a factory (optax's own
conventions: ``init(params) -> state``, ``update(updates, state, params=None, **extra_args)``,
a small NamedTuple state), so they chain with anything optax offers:

- :func:`masked`: an element-level mask around an inner optimizer (True = trainable).
  Gradients outside the mask are zeroed before ``inner`` (its moments stay exactly zero there,
  and an entry unfrozen later starts from zero moments) and updates outside it are set to
  ``-0.0`` after ``inner`` (decoupled weight decay, momentum, anything ``inner`` adds cannot move
  a frozen entry). ``x + (-0.0) == x`` bitwise for every float ``x`` (``+0.0`` and ``-0.0``
  included), so ``optax.apply_updates`` leaves frozen entries bitwise unchanged. The mask is
  fixed at construction, a function of the params, or the ``mask=`` extra argument of
  ``update`` (a traced value: a changing mask never retraces). ``sparse=True`` keeps ``inner``'s
  state only for the selected entries.
- :func:`gradual_unfreeze`: GUFT (seed paper 000, SPEC.md §1) as a transform. Its state holds
  the OR-merged mask and the round counter; at the scheduled steps it reads the ``saliency=``
  extra argument (a score pytree, e.g. from :func:`guft_jax.saliency.compute`) and adds its
  exact top-``k`` (:func:`guft_jax.guft.select`, the selection rule of
  :func:`guft_jax.guft.guft`). The round runs inside the jitted step (``lax.cond`` /
  ``lax.switch``): one trace for a whole run.
- :func:`oneshot_mask` / :func:`magnitude_mask`: the one-shot masks (SNIP, SalUN, Fisher,
  magnitude; SPEC.md §2) as ``scores -> mask`` functions whose mask feeds :func:`masked`.

Parameters are named by ``/``-joined key paths (``Conv_0/kernel``); a Flax NNX ``State``'s
trailing ``value`` attribute is dropped, so NNX and linen params are selected by the same regexes.

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
from guft_jax import paths as paths_lib

PyTree = Any

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
      ValueError: a pattern matches no path (naming ``field`` and the pattern).
    """
    all_paths = tree_paths(tree)
    out = []
    for pat in _patterns(patterns):
        hit = [p for p in all_paths if re.search(pat, p)]
        if not hit:
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


def selection(
    tree: PyTree,
    *,
    eligible: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = r"^head/",
) -> Selection:
    """The eligible leaves of any param pytree (:func:`guft_jax.masks.eligible_leaves` rules on
    its NNX-normalised paths), minus the ``head`` leaves, which train in full.

    Raises:
      ValueError: a regex matching nothing (``head``, ``guft.include``, ``guft.exclude``), an
        unknown preset, or nothing eligible.
    """
    full = match_paths(tree, head, field="head") if head is not None else []
    view: dict = {}
    for p, (_, x) in zip(
        tree_paths(tree), jax.tree_util.tree_flatten_with_path(tree)[0], strict=True
    ):
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


# ----------------------------------------------------------------------------- masked


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner optimizer's state (over the whole tree)."""

    inner_state: Any


class SparseMaskedState(NamedTuple):
    """State of ``masked(..., sparse=True)``: per leaf the int32 flat indices of its selected
    entries, and the inner state over those entries only (one vector per leaf)."""

    indices: tuple
    inner_state: Any


def _expand(mask: PyTree, like: PyTree) -> PyTree:
    """Broadcasts a mask *prefix* (a bool leaf may cover a subtree) to ``like``'s leaves."""
    return jax.tree_util.tree_map(
        lambda m, sub: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(m, jnp.shape(x)), sub),
        mask,
        like,
    )


def _zero_outside(tree: PyTree, mask: PyTree, fill: float) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x, m: jnp.where(m, x, jnp.asarray(fill, jnp.result_type(x))), tree, mask
    )


def _masked_update(inner, mask, updates, inner_state, params, extra):
    """Zero gradients outside ``mask``, ``inner``, then ``-0.0`` updates outside ``mask``."""
    mask = _expand(mask, updates)
    grads = _zero_outside(updates, mask, 0.0)
    new, inner_state = inner.update(grads, inner_state, params, **extra)
    return _zero_outside(new, mask, -0.0), inner_state


def masked(
    inner: optax.GradientTransformation,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    sparse: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` restricted to an element-level mask (True = trainable).

    Unlike ``optax.masked`` (static, leaf-level, the opposite polarity of ``optax.freeze``) the
    mask here is element-level and may be traced data. Outside the mask the gradients reach
    ``inner`` as exact zeros and the returned updates are ``-0.0``, so after
    ``optax.apply_updates`` every frozen entry is bitwise equal to its value before the step,
    also under ``optax.adamw``'s decoupled weight decay. (A transform *after* ``masked`` in a
    chain that scales updates keeps them zero, but may turn ``-0.0`` into ``+0.0``, which then
    moves only a ``-0.0`` parameter to ``+0.0``.) Adam's bias correction uses the global step for
    every entry, as :func:`guft_jax.optim.masked_step` does.

    Args:
      inner: the optimizer to restrict (any ``GradientTransformation``; extra arguments given
        to ``update`` are passed on to it).
      mask: a bool pytree shaped like the params (or a prefix of it: a bool leaf may cover a
        subtree), a function ``params -> mask``, or None: then every ``update`` takes it as the
        ``mask=`` extra argument (traced; changing it never retraces).
      sparse: keep ``inner``'s state only for the selected entries: ``inner`` sees one vector per
        leaf holding the selected entries (gathered) and its updates are scattered back. Needs a
        concrete mask (a pytree or function, not None) when ``init`` runs; the mask is then
        fixed (its indices live in the state).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: ``update`` without a mask when none was given at construction;
        ``sparse=True`` without a mask.

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
        new, inner_state = _masked_update(inner, m, updates, state.inner_state, params, extra)
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

    def gather(tree, indices):
        return [
            jnp.ravel(x)[i] for x, i in zip(jax.tree_util.tree_leaves(tree), indices, strict=True)
        ]

    def init_fn(params):
        m = _expand(mask(params) if callable(mask) else mask, params)
        indices = tuple(
            jnp.asarray(np.flatnonzero(np.asarray(x).reshape(-1)), jnp.int32)
            for x in jax.tree_util.tree_leaves(m)
        )
        return SparseMaskedState(indices, inner.init(gather(params, indices)))

    def update_fn(updates, state, params=None, **extra):
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        p_sel = None if params is None else gather(params, state.indices)
        new, inner_state = inner.update(
            gather(updates, state.indices), state.inner_state, p_sel, **extra
        )
        out = [
            jnp.full((x.size,), -0.0, x.dtype).at[i].set(u.astype(x.dtype)).reshape(x.shape)
            for x, i, u in zip(leaves, state.indices, new, strict=True)
        ]
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
    - ``mask``: ``{key: bool array}`` over the eligible leaves, the OR of all rounds so far
      (keys as in :class:`guft_jax.guft.GuftState`: the path with ``/`` -> ``.``).
    - ``inner_state``: the inner optimizer's state.
    """

    count: jax.Array
    round: jax.Array
    mask: dict
    inner_state: Any


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


def gradual_unfreeze(
    inner: optax.GradientTransformation,
    *,
    steps: Sequence[int],
    ratios: Sequence[float],
    eligible: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = r"^head/",
    allocation: str = "global",
    normalize: str | None = None,
    exclude_selected: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """GUFT, Gradual Unfreeze Fine-Tuning (seed paper 000, SPEC.md §1), as an optax transform.

    At the update whose step count is ``steps[i]`` the transform takes the ``saliency=`` extra
    argument, selects the exact top ``k_i = round(ratios[i] · N)`` of it over the ``N`` eligible
    entries (``allocation``, ``normalize``, ``exclude_selected`` as in
    :func:`guft_jax.guft.guft`; the same :func:`guft_jax.guft.select`) and ORs it into the mask;
    then, at every step, it applies ``inner`` restricted to the mask as :func:`masked` does
    (frozen entries bitwise unchanged, zero moments until unfrozen). ``head`` leaves train in
    full and are outside the budget; every other non-eligible leaf stays frozen.

    The round is part of the traced update (``lax.cond`` on the step count, ``lax.switch`` over
    the rounds), so a jitted train step is traced once for the whole run. ``saliency`` must
    therefore be passed at *every* update (its value is read only at the scheduled steps; pass
    the latest scores, or zeros, in between): a pytree whose leaves include every eligible path
    (the params' shape, as :func:`guft_jax.saliency.compute` returns, or just the eligible leaves).

    Args:
      inner: the optimizer of the unfrozen entries (e.g. ``optax.adamw(1e-3)``).
      steps: 0-indexed optimizer steps of the rounds, strictly increasing
        (:func:`schedule_steps` converts GUFT's recompute epochs).
      ratios: fraction of the eligible entries chosen at each round (one per step).
      eligible: a preset of :data:`guft_jax.masks.ELIGIBILITY` (``"all"``: every non-head leaf;
        ``"blocks"``: the guft_jax ViT's encoder-block Dense kernels and biases).
      include, exclude: regexes over ``/``-joined param paths, on top of ``eligible``.
      head: regexes of the leaves trained in full (the task head); None for none.
      allocation: ``"global"`` (the paper), ``"per_tensor"`` or ``"per_row"``.
      normalize: None or ``"mean"`` (per-tensor score normalisation before a global ranking).
      exclude_selected: rank only entries not selected yet (the budget grows by exactly ``k_i``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`GradualUnfreezeState`.

    Raises:
      ValueError: a malformed schedule or option (naming it), a regex matching nothing,
        ``update`` without ``saliency``, or a saliency tree missing an eligible leaf.

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
    inner = optax.with_extra_args_support(inner)
    opts = dict(eligible=eligible, include=include, exclude=exclude, head=head)
    rounds = len(steps)

    def budgets(sel: Selection) -> list[int]:
        n = sum(math.prod(s) for s in sel.eligible.values())
        ks = [masks_lib.budget(r, n) for r in ratios]
        if sum(ks) > n:
            raise ValueError(f"ratios: budgets {ks} exceed the {n} eligible entries")
        if exclude_selected and allocation != "global":
            masks_lib.check_traced_bound(max(ks), n)
        return ks

    def init_fn(params):
        sel = selection(params, **opts)
        budgets(sel)
        zero = jnp.zeros((), jnp.int32)
        mask = {k: jnp.zeros(s, bool) for k, s in sel.eligible.items()}
        return GradualUnfreezeState(zero, zero, mask, inner.init(params))

    def update_fn(updates, state, params=None, *, saliency=None, **extra):
        if saliency is None:
            raise ValueError(
                "saliency: gradual_unfreeze needs saliency=<score pytree> at every update (read "
                "at the scheduled steps only), so that the jitted step is traced once"
            )
        sel = selection(updates, **opts)
        ks = budgets(sel)
        scores = _scores_of(saliency, sel)

        def round_fn(i, mask):
            return guft_lib.select(
                scores,
                mask,
                ks[i],
                exclude_selected=exclude_selected,
                allocation=allocation,
                normalize=normalize,
            )

        at = jnp.minimum(state.round, rounds - 1)
        due = (state.round < rounds) & (state.count >= jnp.asarray(steps, jnp.int32)[at])
        branches = [functools.partial(round_fn, i) for i in range(rounds)]
        mask = jax.lax.cond(
            due, lambda m: jax.lax.switch(at, branches, m), lambda m: dict(m), state.mask
        )
        m_full = full_mask(updates, sel, mask)
        extra = dict(extra, saliency=saliency)
        new, inner_state = _masked_update(inner, m_full, updates, state.inner_state, params, extra)
        return new, GradualUnfreezeState(
            state.count + 1, state.round + due.astype(jnp.int32), mask, inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scores_of(saliency: PyTree, sel: Selection) -> dict:
    flat = {
        masks_lib.leaf_key(path_str(p)): x
        for p, x in jax.tree_util.tree_flatten_with_path(saliency)[0]
    }
    missing = [masks_lib.key_path(k) for k in sel.eligible if k not in flat]
    if missing:
        raise ValueError(f"saliency: no scores for the eligible leaves {missing[:4]}")
    out = {}
    for k, shape in sel.eligible.items():
        if tuple(np.shape(flat[k])) != tuple(shape):
            raise ValueError(
                f"saliency: {masks_lib.key_path(k)} has shape "
                f"{np.shape(flat[k])}, the parameter {shape}"
            )
        out[k] = flat[k]
    return out


def find_state(opt_state: PyTree, kind: type = GradualUnfreezeState) -> Any:
    """The first state of type ``kind`` inside a (chained, nested) optimizer state.

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
    raise ValueError(f"opt_state: holds no {kind.__name__}")


def unfrozen(
    opt_state: PyTree,
    params: PyTree,
    *,
    head: str | Sequence[str] | None = r"^head/",
    **eligibility: Any,
) -> PyTree:
    """The full bool mask (True = trains) of the :func:`gradual_unfreeze` inside ``opt_state``,
    shaped like ``params`` (pass the same ``head`` / ``eligible`` / ``include`` / ``exclude``)."""
    st = find_state(opt_state)
    return full_mask(params, selection(params, head=head, **eligibility), st.mask)


# ----------------------------------------------------------------------------- one-shot masks


def oneshot_mask(
    scores: PyTree,
    *,
    ratio: float | None = None,
    k: int | None = None,
    eligible: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = r"^head/",
    allocation: str = "global",
    normalize: str | None = None,
) -> PyTree:
    """A one-shot saliency mask (SPEC.md §2): the exact top-``k`` of ``scores`` over the
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
      ValueError: neither or both of ``ratio`` and ``k``, or an invalid option.

    >>> s = {"head": {"w": jnp.ones(2)}, "a": jnp.array([3.0, 1.0, 2.0])}
    >>> m = oneshot_mask(s, k=2)
    >>> m["a"].tolist(), m["head"]["w"].tolist()
    ([True, False, True], [True, True])
    """
    if (ratio is None) == (k is None):
        raise ValueError("ratio, k: give exactly one of them")
    _check_options(allocation, normalize, eligible)
    sel = selection(scores, eligible=eligible, include=include, exclude=exclude, head=head)
    n = sum(math.prod(s) for s in sel.eligible.values())
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
        k = masks_lib.budget(ratio, n)
    kw = {} if normalize is None else dict(normalize=normalize)
    chosen = masks_lib.topk_mask(_scores_of(scores, sel), k, allocation=allocation, **kw)
    return full_mask(scores, sel, chosen)


def magnitude_mask(params: PyTree, **kwargs: Any) -> PyTree:
    """The magnitude (lottery-ticket) mask: :func:`oneshot_mask` of ``|w|``.

    >>> magnitude_mask({"w": jnp.array([0.1, -3.0, 2.0])}, k=1, head=None)["w"].tolist()
    [False, True, False]
    """
    return oneshot_mask(jax.tree_util.tree_map(jnp.abs, params), **kwargs)
