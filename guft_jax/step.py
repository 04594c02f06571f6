"""The train step: the loss of a method's trainable tree, its masked optimizer update and the
method's per-step hook, as pure functions jitted once per run (:func:`make_train_step`).

Only the method's ``trainable`` tree is differentiated: the frozen pretrained ``params`` are an
argument of the step, receive no gradient and no optimizer state. A method with element-level
masks (GUFT's reference path) supplies them through ``MethodHooks.update_mask``; the mask is a
traced argument, so growing it never retraces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guft_jax import optim
from guft_jax import sharding as shard_lib
from guft_jax.config import WARMUP_FLOOR, warmup_steps
from guft_jax.methods import base as mbase
from guft_jax.methods.base import Method, StepInfo, forward


class TrainState(NamedTuple):
    step: jax.Array
    trainable: Any
    opt_state: Any
    method_state: Any
    rng: jax.Array  # a raw uint32 PRNG key (checkpointable)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
    """Mean softmax cross-entropy (weighted mean if ``weights`` is given), in float32."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if weights is None:
        return jnp.mean(losses)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_loss_fn(model, method: Method) -> Callable:
    """``loss(trainable, params, method_state, images, labels, rng=None)``: the task loss plus the
    method's extra term (``MethodHooks.loss``, training only); ``rng=None`` runs the model and the
    method deterministically (no dropout / drop-path / sampling)."""
    extra = method.hooks.loss

    def loss(trainable, params, method_state, images, labels, rng=None):
        logits = forward(model, method, params, trainable, method_state, images, rng=rng)
        out = cross_entropy(logits, labels)
        if extra is not None and rng is not None:
            out = out + extra(params, trainable, method_state, rng)
        return out

    return loss


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def apply_gradients(
    method: Method,
    tx: optax.GradientTransformation,
    grads: Any,
    opt_state: Any,
    trainable: Any,
    method_state: Any,
    params: Any,
    *,
    step: jax.Array,
    total_steps: int = 0,
    mask: Any = (),
    scale: Any | None = None,
) -> tuple[Any, Any, Any]:
    """A method's optimizer update and per-step hook: ``(trainable, opt_state, method_state)``.

    The one sequence after the gradients, shared by the engine's step (:func:`make_step_body`)
    and an own loop (:meth:`guft_jax.peft.Adapter.update`): the element-level mask (``mask``, or
    when it is ``()`` the method's ``update_mask`` of the traced state) restricts ``tx``
    (:func:`guft_jax.optim.masked_step`), then ``MethodHooks.step`` runs with a
    :class:`StepInfo` (``step``: the count before this update; ``params``: the frozen base).
    """
    mask_fn, hook = method.hooks.update_mask, method.hooks.step
    if not _has_leaves(mask) and mask_fn is not None:
        mask = mask_fn(method_state)  # traced: a mask that changes never retraces
    new, opt_state = optim.masked_step(
        tx, grads, opt_state, trainable, mask if _has_leaves(mask) else None, scale
    )
    if hook is not None:
        info = StepInfo(step, total_steps, new, trainable, opt_state, method_state, grads, params)
        new, opt_state, method_state = hook(info)
    return new, opt_state, method_state


def make_step_body(model, method: Method, tx, *, total_steps: int = 0) -> Callable:
    """The un-jitted step ``body(state, params, images, labels, mask=(), scale=None) ->
    (state, loss)``: loss and gradients of the trainable tree, then :func:`apply_gradients`
    (``mask=()``: the method's ``update_mask`` of the traced state; ``scale``: per-leaf update
    factors, see :func:`guft_jax.optim.masked_step`). :func:`make_train_step` jits it;
    :mod:`guft_jax.packing` vmaps it over runs."""
    loss_fn = make_loss_fn(model, method)

    def body(state: TrainState, params, images, labels, mask=(), scale=None):
        rng, drop = jax.random.split(state.rng)
        loss, grads = jax.value_and_grad(loss_fn)(
            state.trainable, params, state.method_state, images, labels, drop
        )
        trainable, opt_state, mstate = apply_gradients(
            method,
            tx,
            grads,
            state.opt_state,
            state.trainable,
            state.method_state,
            params,
            step=state.step,
            total_steps=total_steps,
            mask=mask,
            scale=scale,
        )
        return TrainState(state.step + 1, trainable, opt_state, mstate, rng), loss

    return body


def make_train_step(
    model,
    method: Method,
    tx: optax.GradientTransformation,
    *,
    total_steps: int = 0,
    shardings: tuple | None = None,
    on_trace: Callable[[], None] | None = None,
) -> Callable:
    """The jitted train step ``step(state, params, images, labels, mask) -> (state, loss)``.

    ``state`` is donated. ``mask`` is ``()`` (the method's ``update_mask`` of the traced state is
    used, if it has one) or an element-level bool tree shaped like ``state.trainable`` (see
    :func:`guft_jax.optim.masked_step`). After the optimizer update the
    method's ``MethodHooks.step`` (if any) runs inside the same program with a :class:`StepInfo`
    (``total_steps`` is static). ``shardings`` is ``(state, params, batch, mask)`` NamedShardings
    for ``jax.jit``; ``state`` may also be a function ``state -> per-leaf shardings`` (rules
    applied to the state's current shapes: one jitted step per state shape, reachable as
    ``step.for_state(state)``). ``on_trace`` is called each time the step is traced.
    """
    body = make_step_body(model, method, tx, total_steps=total_steps)

    def step(state: TrainState, params, images, labels, mask):
        if on_trace is not None:
            on_trace()
        return body(state, params, images, labels, mask)

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    state_sh, params_sh, batch_sh, mask_sh = shardings
    repl = shard_lib.replicated(batch_sh.mesh)

    def jitted(sh):
        return jax.jit(
            step,
            donate_argnums=(0,),
            in_shardings=(sh, params_sh, batch_sh, batch_sh, mask_sh),
            out_shardings=(sh, repl),
        )

    if not callable(state_sh):
        return jitted(state_sh)
    # Per-leaf state shardings depend on the leaves' shapes, which a method may change between
    # epochs (GUFT's sparse capacities): one jitted step per state shape (each traced once).
    cache: dict = {}

    def for_state(state):
        key = (
            jax.tree_util.tree_structure(state),
            tuple(np.shape(x) for x in jax.tree_util.tree_leaves(state)),
        )
        if key not in cache:
            cache[key] = jitted(state_sh(state))
        return cache[key]

    def sharded_step(state, params, images, labels, mask):
        return for_state(state)(state, params, images, labels, mask)

    sharded_step.for_state = for_state  # the jitted step for a state (``.lower`` it to inspect)
    return sharded_step


def _eval_sums(logits, labels, weights):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(correct * weights), jnp.sum(losses * weights)


class MergedEval:
    """An eval step that folds the method into plain weights once per evaluation.

    Calling it is the interceptor path (``eval(params, trainable, method_state, x, y, w)``, as
    for every method); :func:`guft_jax.epochs.evaluate` instead calls ``merge(params, trainable,
    method_state)`` once and ``plain(merged, x, y, w)`` per batch: the backbone's own forward,
    one small program, where the interceptor path compiles the method's sparse or quantised
    kernels a second time (GUFT: 7.7 s of a 28 px run's 37 s of compiles on 2 CPU cores,
    ``benchmarks/fit_bench.py --compare runs``). ``merge`` is exact by the method's contract
    (:class:`~guft_jax.methods.base.Method`); the logits agree to float rounding.
    """

    def __init__(self, step: Callable, model, method):
        self.step = step
        self.merge = jax.jit(method.merge)

        def plain(merged, images, labels, weights):
            logits = model.apply({"params": merged}, images, deterministic=True)
            return _eval_sums(logits, labels, weights)

        self.plain = jax.jit(plain)

    def __call__(self, *args):
        return self.step(*args)


def make_eval_step(model, method: Method) -> Callable:
    """``eval(params, trainable, method_state, images, labels, weights) -> (correct, loss_sum)``;
    a :class:`MergedEval` for methods with an interceptor and a ``merge``."""

    def ev(params, trainable, method_state, images, labels, weights):
        logits = forward(model, method, params, trainable, method_state, images)
        return _eval_sums(logits, labels, weights)

    step = jax.jit(ev)
    if method.hooks.intercept is None or method.merge is None:
        return step
    return MergedEval(step, model, method)


def init_train_state(method: Method, params, tx=None, *, seed: int, labels_out: list | None = None):
    """The initial :class:`TrainState` (``method.init`` is called once). With ``tx=None`` the
    optimizer state is ``()``; ``labels_out`` receives the optimizer labels of the trainable tree.
    """
    rng = jax.random.PRNGKey(seed)
    rng, init_rng = jax.random.split(rng)
    # A copy: the step donates the state, and a method may start from the very arrays of params.
    trainable = jax.tree_util.tree_map(jnp.copy, method.init(init_rng, params))
    mstate = mbase.init_state(method, params, trainable)
    if labels_out is not None:
        labels_out.append(mbase.labels_of(method, trainable))
    opt = tx.init(trainable) if tx is not None else ()
    return TrainState(jnp.zeros((), jnp.int32), trainable, opt, mstate, rng)


def optimizer_for(method: Method, params, *, steps_per_epoch: int, epochs: int, **kw):
    """``(tx, state_without_optimizer)``: AdamW groups from the method's labels (one init); the
    warm-up is :func:`guft_jax.config.warmup_steps` of ``warmup_epochs`` and ``warmup_floor``."""
    labels: list = []
    state = init_train_state(method, params, None, seed=kw.pop("seed", 0), labels_out=labels)
    total = steps_per_epoch * epochs
    warmup = warmup_steps(
        warmup_epochs=kw.pop("warmup_epochs", 0),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        floor=kw.pop("warmup_floor", WARMUP_FLOOR),
    )
    tx = optim.make_optimizer(labels=labels[0], warmup_steps=warmup, total_steps=total, **kw)
    return tx, state._replace(opt_state=tx.init(state.trainable))


def optimizer_from(method: Method, params, config, steps_per_epoch: int):
    """:func:`optimizer_for` with a :class:`~guft_jax.config.TrainConfig`'s optimizer settings
    (lr, head lr, weight decay, warm-up and its floor, clipping, seed, epochs).

    Raises:
      ValueError: ``config.lr`` is ``"auto"`` (resolve it first: :func:`guft_jax.lr_auto.choose`).
    """
    if config.lr_is_auto:
        raise ValueError(
            "lr: 'auto' must be resolved to a number before the optimizer is built "
            "(guft_jax.lr_auto.choose, as train.fit does)"
        )
    return optimizer_for(
        method,
        params,
        steps_per_epoch=steps_per_epoch,
        epochs=config.epochs,
        lr=config.lr,
        head_lr=config.head_lr,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        warmup_floor=config.warmup_floor,
        clip_norm=config.clip_norm,
        seed=config.seed,
    )


def mask_of(method: Method, state: TrainState):
    """The element-level optimizer mask of the method (``()`` if none), a copy."""
    if method.hooks.update_mask is None:
        return ()
    m = method.hooks.update_mask(state.method_state)
    # A copy: the mask's arrays live in the state, which the step donates.
    return () if m is None else jax.tree_util.tree_map(jnp.copy, m)
