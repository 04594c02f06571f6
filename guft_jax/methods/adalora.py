"""AdaLoRA (Zhang et al., arXiv:2303.10512): SVD-form updates with an adaptive rank budget.

Every adapted kernel gets ``ΔW = (α/r)·P diag(λ) Q`` (``(out, in)`` convention) with ``P``
``(out, r)`` and ``Q`` ``(r, in)`` drawn from N(0, 0.02²) and ``λ`` ``(r,)`` zero, so the model is
unchanged at init; in the Flax ``(in, out)`` layout the kernel update is ``(α/r)·Qᵀ diag(λ) Pᵀ``.
All three train. Two things make it adaptive:

- an orthogonality regulariser added to the task loss (``MethodHooks.loss``, training only):
  ``γ · mean over adapted kernels of (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F)``;
- importance-driven pruning of the triplets ``(P[:, i], λ_i, Q[i])``. After every optimizer update
  (``MethodHooks.step``, inside the jitted step) each entry's sensitivity ``I = |θ·g|`` is smoothed
  as ``Ī ← β1 Ī + (1−β1) I`` and ``Ū ← β2 Ū + (1−β2)|I − Ī|`` (Ī already updated, as the official
  code does), its score is ``s = Ī ⊙ Ū``, and a triplet scores ``S_i = s(λ_i) + mean_j s(Q_ij) +
  mean_j s(P_ji)``. The total rank budget follows :func:`rank_budget` (cubic, from
  ``L·init_rank`` down to ``L·target_rank``); every ``delta_t`` steps of the schedule the
  triplets whose score is at or below the ``(L·init_rank − b(t))``-th smallest have their
  ``λ_i`` set to 0, and from ``T − t_f`` on the pattern chosen at ``T − t_f`` is fixed and
  re-applied after every step.

The pruning mask (``AdaLoRAState.keep``) and the scores are traced method state, so pruning never
retraces. As in the paper and the official code, pruning zeroes ``λ_i`` but keeps ``P[:, i]`` and
``Q[i]`` and keeps training them, so a triplet pruned too early can come back at a later mask step
(``λ_i`` regrows from its gradient and its Adam moments between mask steps).

Deviations from the official code (QingruZhang/AdaLoRA, HF PEFT ``tuners/adalora``), each on
purpose: the regulariser uses squared Frobenius norms (the paper's ``R(P, Q)``; the code takes
unsquared norms) averaged over kernels (the paper sums them; the mean keeps ``γ`` independent of
the number of adapted kernels); the scale is exactly ``α/r`` (the code divides by ``r + 1e-5``);
``t_init``/``t_final`` may be fractions of the run as well as step counts; a budget step that
prunes nothing (``b(t) = L·init_rank``) is skipped instead of failing in ``kthvalue``. With an
unknown run length (``total_steps < 1``, e.g. a bare ``make_train_step``) the scores are tracked
but nothing is pruned.

>>> m = adalora(init_rank=12, target_rank=8, alpha=16.0)
>>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, StepInfo, register
from guft_jax.methods.hparams import as_json

GROUP = "adalora"
FACTORS = ("P", "lambda", "Q")


class AdaLoRAState(NamedTuple):
    """Traced per-kernel state: smoothed sensitivity and uncertainty of every factor entry, and
    the triplets kept by the last mask step (``keep[k]`` is ``(r,)`` bool, True = kept)."""

    ipt_bar: dict  # key -> {"P", "lambda", "Q"}: Ī
    unc_bar: dict  # key -> {"P", "lambda", "Q"}: Ū
    keep: dict  # key -> (r,) bool


def budget_phases(total_steps: int, t_init: float, t_final: float, *, field: str) -> tuple:
    """``(t_i, t_f)`` in steps: a value ``< 1`` is a fraction of ``total_steps`` (floored), a value
    ``>= 1`` is a step count (must be integral).

    Raises:
      ValueError: a negative or a fractional step count.
    """

    def steps(x, name):
        if x < 0:
            raise ValueError(f"{field}.{name}: must be >= 0, got {x}")
        if x < 1:
            return int(np.floor(x * total_steps))
        if x != int(x):
            raise ValueError(f"{field}.{name}: a step count (>= 1) must be integral, got {x}")
        return int(x)

    return steps(t_init, "t_init"), steps(t_final, "t_final")


def check_betas(beta1: float, beta2: float, *, field: str) -> None:
    """Checks the EMA factors of :func:`sensitivity_ema`.

    Raises:
      ValueError: ``beta1`` or ``beta2`` outside (0, 1), named as ``{field}.beta1``/``beta2``.
    """
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0 < b < 1:
            raise ValueError(f"{field}.{name}: must be in (0, 1), got {b}")


def rank_budget(
    t: int,
    *,
    total_steps: int,
    init_budget: int,
    target_budget: int,
    t_init: float,
    t_final: float,
) -> int:
    """The total rank budget at step ``t`` (0-indexed; HF/official AdaLoRA's ``budget_schedule``).

    With ``t_i, t_f`` from :func:`budget_phases` and ``T = total_steps``::

      b(t) = init_budget                                              t <= t_i
           = target_budget + ⌊(init − target)·(1 − (t − t_i)/(T − t_f − t_i))³⌋   t_i < t <= T − t_f
           = target_budget                                            t > T − t_f

    >>> kw = dict(init_budget=288, target_budget=192, t_init=0.1, t_final=0.3)
    >>> rank_budget(400, total_steps=1000, **kw)
    204
    """
    ti, tf = budget_phases(total_steps, t_init, t_final, field="adalora")
    if t <= ti:
        return int(init_budget)
    if t > total_steps - tf:
        return int(target_budget)
    span = max(total_steps - tf - ti, 1)
    mul = 1.0 - (t - ti) / span
    return int((init_budget - target_budget) * mul**3 + target_budget)


def orthogonality(p: jax.Array, q: jax.Array) -> jax.Array:
    """``‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F`` for ``P`` ``(out, r)`` and ``Q`` ``(r, in)``."""
    r = p.shape[1]
    eye = jnp.eye(r, dtype=jnp.float32)
    return jnp.sum((p.T @ p - eye) ** 2) + jnp.sum((q @ q.T - eye) ** 2)


def sensitivity_ema(ipt_bar, unc_bar, ipt, beta1: float, beta2: float):
    """One smoothing step: ``Ī ← β1 Ī + (1−β1) I``, ``Ū ← β2 Ū + (1−β2)|I − Ī|`` (new Ī)."""
    ib = beta1 * ipt_bar + (1.0 - beta1) * ipt
    ub = beta2 * unc_bar + (1.0 - beta2) * jnp.abs(ipt - ib)
    return ib, ub


def triplet_scores(ipt_bar: dict, unc_bar: dict) -> jax.Array:
    """``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = Ī ⊙ Ū`` for one kernel."""
    s = {f: ipt_bar[f] * unc_bar[f] for f in FACTORS}
    return s["lambda"] + jnp.mean(s["Q"], axis=1) + jnp.mean(s["P"], axis=0)


def rank_pattern(state: AdaLoRAState) -> dict[str, int]:
    """``{kernel path: kept rank}`` from the last mask step (all ranks before the first)."""
    return {ws.path_of(k): int(np.sum(np.asarray(v))) for k, v in state.keep.items()}


class AdaLoRAHparams(NamedTuple):
    """The hyperparameters of :func:`adalora` (validated)."""

    init_rank: int
    target_rank: int
    alpha: float
    targets: tuple[str, ...]
    t_init: float
    t_final: float
    delta_t: int
    beta1: float
    beta2: float
    orth_reg: float
    init_std: float


def _check(hp: AdaLoRAHparams) -> None:
    """Raises ValueError naming the first hyperparameter out of range."""
    if hp.init_rank < 1:
        raise ValueError(f"adalora.init_rank: must be >= 1, got {hp.init_rank}")
    if not 0 <= hp.target_rank <= hp.init_rank:
        raise ValueError(
            f"adalora.target_rank: must be in [0, {hp.init_rank}], got {hp.target_rank}"
        )
    if hp.alpha <= 0:
        raise ValueError(f"adalora.alpha: must be > 0, got {hp.alpha}")
    if hp.delta_t < 1:
        raise ValueError(f"adalora.delta_t: must be >= 1, got {hp.delta_t}")
    check_betas(hp.beta1, hp.beta2, field="adalora")
    if hp.orth_reg < 0:
        raise ValueError(f"adalora.orth_reg: must be >= 0, got {hp.orth_reg}")
    budget_phases(1, hp.t_init, hp.t_final, field="adalora")  # validates the values


def _init(hp: AdaLoRAHparams, rng, params):
    out = {}
    r = hp.init_rank
    for i, p in enumerate(ws.target_paths(params, hp.targets, field="adalora.targets")):
        d_in, d_out = ws.matrix(params, p).shape
        kp, kq = jax.random.split(jax.random.fold_in(rng, i))
        out[ws.key(p)] = {
            "P": hp.init_std * jax.random.normal(kp, (d_out, r), jnp.float32),
            "lambda": jnp.zeros((r,), jnp.float32),
            "Q": hp.init_std * jax.random.normal(kq, (r, d_in), jnp.float32),
        }
    return {"head": params["head"], GROUP: out}


def _merge(hp: AdaLoRAHparams, params, trainable):
    scale = hp.alpha / hp.init_rank
    deltas = {
        ws.path_of(k): scale * ((f["Q"].T * f["lambda"]) @ f["P"].T)
        for k, f in trainable[GROUP].items()
    }
    return ws.add_deltas(params, deltas, trainable["head"])


def _init_state(hp: AdaLoRAHparams, params, trainable) -> AdaLoRAState:
    del params
    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable[GROUP])
    keep = {k: jnp.ones((hp.init_rank,), bool) for k in trainable[GROUP]}
    return AdaLoRAState(zeros, jax.tree_util.tree_map(jnp.zeros_like, zeros), keep)


def _loss(hp: AdaLoRAHparams, params, trainable, state, rng):
    del params, state, rng
    fs = trainable[GROUP]
    return hp.orth_reg * sum(orthogonality(f["P"], f["Q"]) for f in fs.values()) / len(fs)


def _smoothed(hp: AdaLoRAHparams, st: AdaLoRAState, tr: dict, g: dict) -> tuple[dict, dict]:
    """``(Ī, Ū)`` after one :func:`sensitivity_ema` step of ``I = |θ·g|`` (θ after this step's
    update, as the official code)."""
    ib_new, ub_new = {}, {}
    for k in tr:
        ib_new[k], ub_new[k] = {}, {}
        for f in FACTORS:
            ipt = jnp.abs(tr[k][f] * g[k][f])
            ib_new[k][f], ub_new[k][f] = sensitivity_ema(
                st.ipt_bar[k][f], st.unc_bar[k][f], ipt, hp.beta1, hp.beta2
            )
    return ib_new, ub_new


def _budget_table(hp: AdaLoRAHparams, total_steps: int, num_kernels: int) -> np.ndarray:
    """:func:`rank_budget` at every step of the run, int32."""
    return np.asarray(
        [
            rank_budget(
                s,
                total_steps=total_steps,
                init_budget=num_kernels * hp.init_rank,
                target_budget=num_kernels * hp.target_rank,
                t_init=hp.t_init,
                t_final=hp.t_final,
            )
            for s in range(total_steps)
        ],
        np.int32,
    )


def _kept(scores: jax.Array, k_prune) -> jax.Array:
    """``(L, r)`` bool: the triplets scoring above the ``k_prune``-th smallest (all if < 1)."""
    flat = jnp.sort(scores.reshape(-1))
    thr = flat[jnp.clip(k_prune - 1, 0, flat.shape[0] - 1)]
    return jnp.where(k_prune >= 1, scores > thr, True)


def _step(hp: AdaLoRAHparams, info: StepInfo):
    st: AdaLoRAState = info.state
    tr = info.trainable[GROUP]
    ib_new, ub_new = _smoothed(hp, st, tr, info.grads[GROUP])
    T, t = info.total_steps, info.step
    if T < 1:  # static: unknown run length, no budget schedule
        return info.trainable, info.opt_state, st._replace(ipt_bar=ib_new, unc_bar=ub_new)
    ti, tf = budget_phases(T, hp.t_init, hp.t_final, field="adalora")
    keys = sorted(tr)
    table = _budget_table(hp, T, len(keys))
    scheduling = t < T - tf  # the scores are updated only before the final phase
    pick = lambda a, b: jnp.where(scheduling, a, b)  # noqa: E731
    ib = jax.tree_util.tree_map(pick, ib_new, st.ipt_bar)
    ub = jax.tree_util.tree_map(pick, ub_new, st.unc_bar)
    do_mask = (scheduling & (t > ti) & (t % hp.delta_t == 0)) | (t == T - tf)
    b = jnp.asarray(table)[jnp.minimum(t, T - 1)]
    scores = jnp.stack([triplet_scores(ib[k], ub[k]) for k in keys])  # (L, r)
    fresh = _kept(scores, len(keys) * hp.init_rank - b)
    keep = {k: jnp.where(do_mask, fresh[i], st.keep[k]) for i, k in enumerate(keys)}
    zero = do_mask | (t > T - tf)
    group = {k: {**tr[k], "lambda": jnp.where(zero & ~keep[k], 0.0, tr[k]["lambda"])} for k in keys}
    trainable = {**info.trainable, GROUP: group}
    return trainable, info.opt_state, AdaLoRAState(ib, ub, keep)


@register(
    "adalora",
    info=Info(
        "low-rank",
        "`P Λ Q` with an orthogonality loss; singular values pruned to a cubic rank budget",
        "2303.10512",
    ),
    defaults=Defaults(
        # ours, 3e-3 (VTAB-1K keeps the protocol's 1e-3): val200 in the diagnosis_cpu preset rose
        # 71.5 -> 79.5 -> 85.0 from 1e-3 to 3e-3 to 9e-3, whatever the budget schedule; the grid
        # (x0.3, x1, x3) spans 9e-4 to 9e-3
        lr=3e-3,
        head_lr=1e-2,
        kwargs=dict(init_rank=12, target_rank=8, alpha=16.0),
        dry_kwargs=dict(init_rank=4, target_rank=2, delta_t=1),
        step_cost=0.5,
    ),
)
def adalora(
    *,
    init_rank: int = 12,
    target_rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    t_init: float = 0.1,
    t_final: float = 0.3,
    delta_t: int = 10,
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg: float = 0.1,
    init_std: float = 0.02,
) -> Method:
    """AdaLoRA on the kernels matched by ``targets``.

    Args:
      init_rank: ``r``, the rank every kernel starts with.
      target_rank: the average rank per kernel at the end (budget ``L·target_rank``).
      alpha: the update is scaled by ``alpha / init_rank``.
      targets: regexes over ``/``-joined param paths of the kernels to adapt.
      t_init, t_final: the budget schedule's warm-up and final phases, as fractions of the run
        (``< 1``) or step counts (``>= 1``); see :func:`rank_budget`.
      delta_t: steps between two mask steps during the schedule.
      beta1, beta2: the sensitivity and uncertainty EMA factors.
      orth_reg: ``γ``, the weight of the orthogonality regulariser.
      init_std: standard deviation of the N(0, σ²) init of ``P`` and ``Q``.

    Raises:
      ValueError: a rank, a schedule value, an EMA factor or the coefficient is out of range.
    """
    hp = AdaLoRAHparams(
        init_rank,
        target_rank,
        alpha,
        tuple(targets),
        t_init,
        t_final,
        delta_t,
        beta1,
        beta2,
        orth_reg,
        init_std,
    )
    _check(hp)
    f = functools.partial
    hooks = MethodHooks(init_state=f(_init_state, hp), step=f(_step, hp), loss=f(_loss, hp))
    return ws.method(
        "adalora", init=f(_init, hp), merge=f(_merge, hp), hparams=as_json(hp), hooks=hooks
    )


__all__ = [
    "AdaLoRAHparams",
    "AdaLoRAState",
    "adalora",
    "rank_budget",
    "check_betas",
    "orthogonality",
    "rank_pattern",
    "budget_phases",
    "sensitivity_ema",
    "triplet_scores",
]
