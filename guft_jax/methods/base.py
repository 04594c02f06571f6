"""The one interface every fine-tuning method implements (STYLE.md 3).

A method is a :class:`Method` NamedTuple of pure functions built by a factory with keyword-only
hyperparameters (``lora(rank=8, alpha=16.0)``). The engine never special-cases a method:

- ``init(rng, params) -> trainable``: the pytree that trains (always holds the task ``head``).
- ``apply(params, trainable, state=None) -> variables``: the variables dict for ``model.apply``
  (at least ``{"params": effective_params}``; GUFT's sparse path adds a ``"sparse_delta"``
  collection built from indices held in ``state``). ``params`` are the frozen pretrained params
  (with a zero head); they are never modified. ``state`` is the method state of
  ``MethodHooks.init_state`` (None for stateless methods, which ignore it).
- ``merge(params, trainable) -> params``: plain ViT params giving the same logits, or None where
  the method cannot be merged.
- ``labels(trainable) -> pytree of str``: optimizer group of every trainable leaf,
  ``"head"`` or ``"method"`` (for separate learning rates).
- ``hparams``: the hyperparameters, for artifacts and results metadata.
- ``state``: optional method-level mutable state handling (masks, schedules) as pure functions;
  see :class:`MethodHooks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any

HEAD = "head"
METHOD = "method"


class MethodHooks(NamedTuple):
    """Optional pure hooks for methods whose trainable set changes during a run (GUFT, AFLoRA).

    - ``init_state(params, trainable) -> state``: the method's own state pytree (checkpointed).
    - ``epoch_start(epoch, ctx) -> (trainable, opt_state, state)``: called by the engine at the
      start of every 1-indexed epoch with an :class:`EpochContext`; returns possibly-updated
      trees of the same structure (so the jitted step is not retraced).
    - ``update_mask(state) -> pytree of bool | None``: element-level mask of the trainable tree
      (True = trainable; a bool leaf may stand for a whole subtree, e.g. ``{"head": True, ...}``)
      that the optimizer applies; None = everything in ``trainable`` trains.
    - ``resize(trainable, opt_state, state, structure) -> (trainable, opt_state, state)``: adopt
      the array shapes recorded in a checkpoint's ``structure`` (``{path: [shape, dtype]}``)
      before restoring into them (for methods whose shapes change during a run).
    """

    init_state: Callable[[PyTree, PyTree], PyTree]
    epoch_start: Callable[..., tuple[PyTree, PyTree, PyTree]] | None = None
    update_mask: Callable[[PyTree], PyTree | None] | None = None
    resize: Callable[..., tuple[PyTree, PyTree, PyTree]] | None = None


class EpochContext(NamedTuple):
    """What ``MethodHooks.epoch_start`` may use: current trees plus a way to compute losses."""

    params: PyTree  # frozen base params
    trainable: PyTree
    opt_state: PyTree
    state: PyTree
    loss_fn: Callable  # (variables, images, labels) -> per-example losses (B,), deterministic
    batches: Callable  # () -> iterator over (images, labels) numpy batches of the train set
    log: Callable[[str], None]


class Method(NamedTuple):
    name: str
    init: Callable[[jax.Array, PyTree], PyTree]
    apply: Callable[..., dict]  # (params, trainable, state=None) -> variables
    labels: Callable[[PyTree], PyTree]
    hparams: dict
    merge: Callable[[PyTree, PyTree], PyTree] | None = None
    hooks: MethodHooks | None = None


def default_labels(trainable: PyTree) -> PyTree:
    """``"head"`` for leaves under the top-level ``head`` key, ``"method"`` otherwise."""
    return {
        k: jax.tree_util.tree_map(lambda _, k=k: HEAD if k == HEAD else METHOD, v)
        for k, v in trainable.items()
    }
