"""GUFT as a registered :class:`~guft_jax.methods.base.Method`: the factory :func:`guft`, its
option checks, and the method's functions over a :class:`~guft_jax.guft.GuftConfig`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp

from guft_jax import kernels as kernels_lib
from guft_jax import paths
from guft_jax import saliency as sal
from guft_jax.guft.blocks import BLOCK_SLACK
from guft_jax.guft.readout import apply_arrays, store_payload
from guft_jax.guft.recompute import guft_epoch_start
from guft_jax.guft.schedule import validate_ratios, validate_schedule
from guft_jax.guft.state import (
    ALLOCATIONS,
    CAPACITY_ESTIMATES,
    ELIGIBLE,
    GuftConfig,
    GuftState,
)
from guft_jax.guft.stores import SparseStore
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, Variant, register


def _init(cfg: GuftConfig, rng, params):
    del rng
    return {"head": params["head"], "delta": cfg.store(params).init_delta()}


def _init_state(cfg: GuftConfig, params, trainable) -> GuftState:
    n = len(cfg.ratios)
    hist = {f: jnp.zeros((n,), jnp.int32) for f in ("epoch", "k", "selected", "batch_size")}
    store = cfg.store(params)
    sel = store.init_selected(trainable["delta"])
    count = {k: jnp.zeros((), jnp.int32) for k in sel}
    size = {k: jnp.asarray(math.prod(s), jnp.int32) for k, s in store.eligible.items()}
    return GuftState(sel, count, jnp.zeros((), jnp.int32), hist, size, store.init_blocks())


def _apply(cfg: GuftConfig, params, trainable, state=None, rng=None):
    out = cfg.store(params).effective(params, trainable["delta"], state, dense=False)
    return {"params": {**out, "head": trainable["head"]}}


def _merge(cfg: GuftConfig, params, trainable, state=None):
    if state is None:
        raise ValueError(f"{cfg.name}.merge: needs the method state (the selected indices)")
    out = cfg.store(params).effective(params, trainable["delta"], state, dense=True)
    return {**out, "head": trainable["head"]}


def _resize(cfg: GuftConfig, trainable, opt_state, state, structure: dict):
    """Adopts the capacities recorded in a checkpoint's structure (sparse store)."""
    caps, block_caps = {}, {}
    for k, v in trainable["delta"].items():
        shape = structure.get(f"trainable/delta/{k}")
        caps[k] = int(shape[0][0]) if shape is not None else int(v.shape[0])
    for k, b in state.blocks.items():
        got = [
            next((v[0][0] for p, v in structure.items() if p.endswith(f"blocks/{k}/{f}")), None)
            for f in ("rows", "cols")
        ]
        block_caps[k] = tuple(
            int(g) if g is not None else int(b[f].shape[0])
            for g, f in zip(got, ("rows", "cols"), strict=True)
        )
    return SparseStore({}, cfg.capacity_floor).resize(trainable, opt_state, state, caps, block_caps)


def _trained(params, trainable, state):
    return {paths.path_of(k): int(v) for k, v in state.count.items()}


def _export(cfg: GuftConfig, params, trainable, state):
    return store_payload(cfg.store(params), params, trainable, state)


def _intercept(cfg: GuftConfig, trainable, state, rng=None):
    store = SparseStore({}, blocks=cfg.blocks, kernels=cfg.kernels)
    return store.intercept(trainable["delta"], state)


def _update_mask(state):
    return {"head": True, "delta": state.selected}


def method_of(cfg: GuftConfig) -> Method:
    """The :class:`~guft_jax.methods.base.Method` of a GUFT configuration."""
    f = functools.partial
    hooks = MethodHooks(
        init_state=f(_init_state, cfg),
        epoch_start=f(guft_epoch_start, cfg),
        update_mask=None if cfg.sparse else _update_mask,
        resize=f(_resize, cfg) if cfg.sparse else None,
        intercept=f(_intercept, cfg) if cfg.sparse else None,
        trained=_trained,
        export=f(_export, cfg),
        load=apply_arrays,
    )
    return Method(
        name=cfg.name,
        init=f(_init, cfg),
        apply=f(_apply, cfg),
        hparams=cfg.hparams(),
        merge=f(_merge, cfg),
        hooks=hooks,
    )


def check_options(name: str, **values) -> None:
    """Raises ValueError naming ``{name}.{field}`` and the allowed values for an unknown
    ``mode``, ``score``, ``eligible``, ``allocation``, ``normalize`` or ``capacity_estimate``
    (those given)."""
    allowed = dict(
        mode=sal.MODES,
        score=sal.SCORES,
        eligible=ELIGIBLE,
        allocation=ALLOCATIONS,
        normalize=(None, "mean"),
        capacity_estimate=CAPACITY_ESTIMATES,
    )
    for field, v in values.items():
        if v not in allowed[field]:
            raise ValueError(f"{name}.{field}: {v!r} not in {list(allowed[field])}")


def _check_slack(capacity_slack: float, block_slack: float) -> None:
    if capacity_slack < 1:
        raise ValueError(f"guft.capacity_slack: must be >= 1, got {capacity_slack}")
    if block_slack < 0:
        raise ValueError(f"guft.block_slack: must be >= 0, got {block_slack}")


def _schedule(recompute_epochs, ratios) -> tuple[tuple[int, ...] | None, tuple[float, ...]]:
    ratios = tuple(float(r) for r in ratios)
    if recompute_epochs is None:
        validate_ratios(ratios)
        return None, ratios
    recompute_epochs = tuple(int(e) for e in recompute_epochs)
    validate_schedule(recompute_epochs, ratios)
    return recompute_epochs, ratios


@register(
    "guft",
    info=Info(
        "sparse",
        "`W0 + δ` on a mask grown in rounds: top-k of `Σ|∇W L|` over the training set",
        "Jeong, Cha and Kim, Kookmin University",
    ),
    defaults=Defaults(
        lr=1e-3,
        head_lr=1e-2,
        # "ranking": the first round sizes the store for its ranking of the whole budget, so the
        # later rounds fit and the run traces its step once (issue 28; docs/guft.md).
        kwargs=dict(ratios=(0.001,) * 3, capacity_estimate="ranking"),
        lr_grid=(0.1, 0.3, 1.0, 3.0, 10.0),
        dry_kwargs=dict(recompute_epochs=(1,), ratios=(0.01,)),
        step_cost=0.9,
    ),
    variants={
        "guft_paper": Variant(dict(eligible="all")),  # the paper's literal rule: every tensor
        "guft_excl": Variant(dict(exclude_selected=True)),  # exactly 3 x 0.1% of the eligible
        # Issue 28's ablations (the cpu_ext preset), one change each over the shipped GUFT:
        "guft_norm": Variant(dict(normalize="mean")),  # saliency over each tensor's mean
        "guft_per_row": Variant(dict(allocation="per_row")),  # every output row its share (GPS)
        "guft_fisher": Variant(dict(score="fisher")),  # Σ g² instead of Σ |g|
        "guft_5r": Variant(dict(ratios=(0.0006,) * 5)),  # 5 rounds, the same 0.3% in all
    },
)
def guft(
    *,
    recompute_epochs: Sequence[int] | None = None,
    ratios: Sequence[float] = (0.001, 0.001, 0.001),
    mode: str = "batch",
    score: str = "guft",
    exclude_selected: bool = False,
    eligible: str = "blocks",
    allocation: str = "global",
    normalize: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sparse: bool = True,
    capacity_slack: float = 2.0,
    capacity_floor: int = 16,
    capacity_estimate: str = "split",
    blocks: bool = True,
    block_slack: float = BLOCK_SLACK,
    chunk: int = 8,
    head_warmup: bool = True,
    kernels: kernels_lib.KernelOptions | Mapping | None = None,
    saliency_fn: Callable | None = None,
    name: str = "guft",
) -> Method:
    """GUFT as a :class:`~guft_jax.methods.base.Method` (:mod:`guft_jax.guft` for the defaults).

    Args:
      recompute_epochs: 1-indexed epochs at whose start the mask is recomputed; None: the
        :func:`auto_schedule` of the run's length (one round per ratio).
      ratios: fraction of eligible entries chosen at each recompute.
      mode, score: the saliency (:mod:`guft_jax.saliency`): ``"batch"`` or ``"example"``;
        ``"guft"`` (Σ|g|) or a one-shot score (``salun``, ``fisher``, ``snip``, ``magnitude``).
      exclude_selected: rank only entries not selected yet (budget grows by exactly k).
      eligible, include, exclude: ``"blocks"`` (default) or ``"all"`` (the paper's literal
        rule), then regexes over ``/``-joined param paths on top.
      allocation, normalize: :func:`guft_jax.masks.topk_mask`'s budget rule and normalisation.
      sparse: the efficient sparse store (default) or the dense reference store.
      capacity_slack, capacity_floor, capacity_estimate: sparse capacities for the whole schedule
        (:func:`capacity_rule`); ``capacity_estimate="ranking"`` (the registered default) also
        sizes each tensor for its entries among the top ``K`` of the first round's scores
        (:func:`guft_jax.guft.capacity.whole_budget_counts`); ``"split"``: for the first
        round's split only.
      blocks, block_slack: per-kernel row × column blocks of the selection, where the weight
        gradient is taken while they are small (sized by :func:`block_capacity`); ``False``: the
        SDDMM everywhere.
      chunk: examples per ``vmap`` chunk in ``example`` mode.
      head_warmup: take saliency through a fitted head when the head is still all zero.
      kernels: :class:`guft_jax.kernels.KernelOptions` (or a dict of its fields), resolved for
        the backend here and recorded in ``hparams["kernels"]``.
      saliency_fn: ``(ctx, eligible, dense_params, *, score, mode, chunk) -> (scores, info)``
        instead of :func:`saliency_scores` (not recorded).
      name: the method's name.

    Raises:
      ValueError: a malformed schedule or an unknown option (naming the field).

    >>> method = guft(recompute_epochs=[1, 6, 11], ratios=[0.001] * 3)
    """
    recompute_epochs, ratios = _schedule(recompute_epochs, ratios)
    opts = dict(mode=mode, score=score, eligible=eligible, allocation=allocation)
    check_options("guft", normalize=normalize, capacity_estimate=capacity_estimate, **opts)
    _check_slack(capacity_slack, block_slack)
    opts.update(normalize=normalize, exclude_selected=exclude_selected, sparse=sparse)
    opts.update(capacity_slack=float(capacity_slack), capacity_floor=int(capacity_floor))
    opts.update(capacity_estimate=capacity_estimate)
    opts.update(blocks=bool(blocks), block_slack=float(block_slack), chunk=int(chunk))
    cfg = GuftConfig(
        recompute_epochs=recompute_epochs,
        ratios=ratios,
        include=tuple(include) if include else None,
        exclude=tuple(exclude) if exclude else None,
        head_warmup=head_warmup,
        kernels=kernels_lib.resolve(kernels),
        saliency_fn=saliency_fn,
        name=name,
        **opts,
    )
    return method_of(cfg)
