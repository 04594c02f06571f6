"""What an own training loop asks of a :func:`~guft_jax.transforms.gradual_unfreeze` state: when
the next round is due, growing the sparse store, the mask so far."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guft_jax.guft import indices as store
from guft_jax.transforms.leaves import DEFAULT_HEAD, PyTree, eligibility, full_mask
from guft_jax.transforms.unfreeze import UNFREEZE_STATES, SparseUnfreezeState


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


def find_state(opt_state: PyTree, kind: type | tuple = UNFREEZE_STATES) -> Any:
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
        masks = store.indices_to_masks(st.indices, list(sel.eligible.values()))
        return full_mask(params, sel, dict(zip(sel.eligible, masks, strict=True)))
    return full_mask(params, sel, st.mask)
