"""A GUFT round at the start of a scheduled epoch: saliency at the current weights (through a
fitted head while the head is all zero), the selection, the store's new capacities, the record.

The jitted helpers are cached on what they are built from (the loss function, the score
options), bounded, and take every array as an argument: nothing of a run (params, optimizer
state) is closed over or kept alive by a cache."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import masks as masks_lib
from guft_jax import paths
from guft_jax import saliency as sal
from guft_jax.guft.capacity import (
    capacity_rule,
    exact_capacities,
    quota_budgets,
    whole_budget_counts,
)
from guft_jax.guft.ranking import any_nonzero, select, topk_merge_global
from guft_jax.guft.state import GuftConfig, GuftState

CACHE_SIZE = 8  # jitted helpers kept per process (one per loss function and score options)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _head_step(loss_fn, lr: float):
    import optax

    tx = optax.adam(lr)

    def step(head, opt, params, x, y):
        def loss(h):
            return jnp.mean(loss_fn({"params": {**params, "head": h}}, x, y))

        u, opt = tx.update(jax.grad(loss)(head), opt)
        return optax.apply_updates(head, u), opt

    return tx, jax.jit(step)


def warm_head(ctx, dense_params, *, lr: float = 1e-2, epochs: int = 1):
    """A task head fitted on the frozen backbone (Adam, ``epochs`` passes over the training
    batches), for saliency only: a zero-initialised head gives the backbone exactly zero gradient,
    so a recompute before the head has trained would rank all-zero scores. The run's own head is
    not changed."""
    tx, step = _head_step(ctx.loss_fn, lr)
    head = dense_params["head"]
    opt = tx.init(head)
    for _ in range(epochs):
        for x, y in ctx.batches():
            head, opt = step(head, opt, dense_params, x, np.asarray(y, np.int32))
    return head


def _all_zero(tree) -> bool:
    # On the host: the head is small, and an eager op per leaf would compile one program each.
    return not any(np.any(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree)))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _saliency_accumulator(loss_fn, score: str, mode: str, chunk: int):
    """One jitted accumulator per (loss, score, mode, chunk), kept across rounds, that takes the
    params as arguments: params closed over would be compiled in as constants, a fresh compile
    of the whole model every round."""

    def acc(g, th, base, x, y, w):
        def loss_per_example(t, xx, yy):
            p = paths.replaced(base, {paths.path_of(k): v for k, v in t.items()})
            return loss_fn({"params": p}, xx, yy)

        inner = sal.make_accumulator(loss_per_example, score=score, mode=mode, chunk=chunk)
        return inner(g, th, x, y, w)

    return jax.jit(acc, donate_argnums=(0,))


def saliency_scores(ctx, theta_keys, dense_params, *, score, mode, chunk):
    """Saliency of the eligible leaves at ``dense_params`` over ``ctx.batches()``; returns
    ``(scores, info)`` as :func:`guft_jax.saliency.compute`."""
    theta = {k: paths.get(dense_params, paths.path_of(k)) for k in theta_keys}
    acc = _saliency_accumulator(ctx.loss_fn, score, mode, chunk)
    return sal.compute(
        None,
        theta,
        ctx.batches(),
        score=score,
        mode=mode,
        chunk=chunk,
        accumulator=lambda g, th, x, y, w: acc(g, th, dense_params, x, y, w),
    )


def random_scores(seed: int, eligible: dict) -> dict:
    """Score ``"random"``: per tensor (``i``-th in sorted-key order) a random permutation
    ``π = jax.random.permutation(fold_in(key(seed), i), size)`` as scores ``size − j`` at
    ``π[j]``, so a top-``n`` selection is ``π[:n]``, a uniform random subset as PEFT's
    SHiRA ``random_mask`` (``randperm(numel)[:n]``). float32 ranks: exact up to 2**24 entries."""
    out = {}
    for i, key in enumerate(sorted(eligible)):
        shape = eligible[key]
        n = math.prod(shape)
        perm = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), i), n)
        ranks = jnp.zeros((n,), jnp.float32).at[perm].set(n - jnp.arange(n, dtype=jnp.float32))
        out[key] = ranks.reshape(shape)
    return out


@functools.partial(jax.jit, static_argnums=(0,))
def _merged_leaves(cfg: GuftConfig, params, trainable, state) -> dict:
    """The eligible leaves with ``δ`` folded in, as one program (not an eager scatter per leaf)."""
    out = cfg.store(params).effective(params, trainable["delta"], state, dense=True)
    return {k: paths.get(out, paths.path_of(k)) for k in trainable["delta"]}


def _saliency_at(cfg: GuftConfig, epoch: int, ctx, eligible: dict):
    """Scores at the current weights (through a fitted head if the head is still all zero)."""
    if cfg.score == "random":
        return random_scores(cfg.seed, eligible), {}
    if int(ctx.state.round) == 0:
        # Nothing selected yet: the effective weights are the pretrained ones, bitwise. Skipping
        # the fold saves a compile for the first round's (floor-sized) store shapes.
        dense = {**ctx.params, "head": ctx.trainable["head"]}
    else:
        leaves = _merged_leaves(cfg, ctx.params, ctx.trainable, ctx.state)
        dense = paths.replaced(ctx.params, {paths.path_of(k): v for k, v in leaves.items()})
        dense["head"] = ctx.trainable["head"]
    if cfg.head_warmup and cfg.score != "magnitude" and _all_zero(dense["head"]):
        dense = {**dense, "head": warm_head(ctx, dense)}
        ctx.log(f"{cfg.name}: all-zero head at epoch {epoch}; saliency through a fitted head")
    fn = cfg.saliency_fn or saliency_scores
    return fn(ctx, eligible, dense, score=cfg.score, mode=cfg.mode, chunk=cfg.chunk)


def _check_nonzero(cfg: GuftConfig, epoch: int, nonzero) -> None:
    if not bool(nonzero):
        raise ValueError(
            f"{cfg.name}: all saliency scores are zero at epoch {epoch} (a zero-initialised head "
            "gives the backbone no gradient before it has trained); use head_warmup=True or "
            "recompute after at least one epoch"
        )


def _record(state: GuftState, i, epoch, k, selected, batch_size) -> dict:
    h = dict(state.history)
    for name, v in (("epoch", epoch), ("k", k), ("selected", selected), ("batch_size", batch_size)):
        arr = np.array(h[name])
        arr[i] = v
        h[name] = jax.device_put(arr)
    return h


def _merged(cfg: GuftConfig, epoch: int, scores, prev, k, quotas, views) -> dict:
    """The round's new mask: the selection OR-merged into ``prev`` (nonzero scores checked)."""
    if quotas is None and cfg.allocation == "global" and cfg.normalize is None:
        merged, nonzero = topk_merge_global(
            scores, prev, k=k, exclude_selected=cfg.exclude_selected
        )
        _check_nonzero(cfg, epoch, nonzero)
        return merged
    _check_nonzero(cfg, epoch, any_nonzero(scores))
    opts = dict(exclude_selected=cfg.exclude_selected, allocation=cfg.allocation)
    return select(scores, prev, k, normalize=cfg.normalize, quotas=quotas, row_dims=views, **opts)


def recompute(cfg: GuftConfig, i: int, epoch: int, ctx):
    """Round ``i`` (0-indexed) at the start of ``epoch``: ``(trainable, opt_state, state)``."""
    store, state = cfg.store(ctx.params), ctx.state
    e = store.eligible
    n_elig = sum(math.prod(s) for s in e.values())
    quotas, views = (None, None)
    if cfg.quota is not None:
        quotas, views = quota_budgets(cfg.name, cfg.quota, cfg.layout, e)
    k = sum(quotas.values()) if quotas else masks_lib.budget(cfg.ratios[i], n_elig)
    scores, info = _saliency_at(cfg, epoch, ctx, e)
    merged = _merged(cfg, epoch, scores, store.mask(state), k, quotas, views)
    rep = masks_lib.mask_report(merged, top=5)
    share = f"{k / n_elig:.4g}" if quotas else f"{cfg.ratios[i]:g}"
    ctx.log(
        f"{cfg.name} recompute at epoch {epoch}: k={k:,} ({share} of {n_elig:,}), "
        f"{cfg.score}/{cfg.mode} saliency over {info.get('num_examples', 0)} examples "
        f"(batch {info.get('batch_size', 0)}); selected {rep['selected']:,} "
        f"= {100 * rep['density']:.4f}%; per module type {rep['per_module_type']}"
    )
    total = k if quotas else sum(masks_lib.budget(r, n_elig) for r in cfg.ratios)
    rule = capacity_rule(e, total, k, slack=cfg.capacity_slack, floor=cfg.capacity_floor)
    first = int(state.round) == 0
    whole = None
    if first and cfg.sparse and not quotas and cfg.capacity_estimate == "ranking":
        whole = whole_budget_counts(scores, total)  # the whole budget's split at these scores
    caps = exact_capacities if quotas else (lambda c, n: rule(c, n, first=first, whole=whole))
    growth = total / max(k, 1) if first else None
    tr, opt, st = store.adopt(ctx.trainable, ctx.opt_state, state, merged, caps, ctx.log, growth)
    hist = _record(st, i, epoch, k, rep["selected"], info.get("batch_size", 0))
    return tr, opt, st._replace(round=state.round + 1, history=hist)


def guft_epoch_start(cfg: GuftConfig, epoch: int, ctx):
    """``MethodHooks.epoch_start``: a round where the schedule has one, else unchanged."""
    rounds = cfg.schedule(ctx.epochs or max(cfg.recompute_epochs or [0]))
    if epoch not in rounds:
        return ctx.trainable, ctx.opt_state, ctx.state
    return recompute(cfg, rounds.index(epoch), epoch, ctx)
