"""AFLoRA (Liu et al., arXiv:2403.13269): LoRA with feature-transform vectors and projection
matrices that freeze adaptively (official code zeyuliu1037/AFLoRA).

Every adapted kernel gets ``ΔW x = s_b ⊙ B (s_d ⊙ A x)`` with ``A`` ``(r, in)`` and ``B``
``(out, r)`` Kaiming-uniform, ``s_d`` ``(r,)`` = 0.1 and ``s_b`` ``(out,)`` = 0, so the model is
unchanged at init. In the Flax ``(in, out)`` layout the kernel update is
``(Aᵀ diag(s_d) Bᵀ) diag(s_b)``. ``s_d`` and ``s_b`` always train. ``A`` and ``B`` (the projection
matrices) train at first and are frozen one whole matrix at a time, permanently:

- per element, ``I = |g|`` averaged over a window of ``window`` steps; at the first step of each
  window the previous window's mean updates ``Ī ← β1 Ī + (1−β1) I`` and
  ``Ū ← β2 Ū + (1−β2)|I − Ī|`` (with the new ``Ī``, as the official code does; the paper's Eq. 3
  writes the previous one); the score is ``s = Ī ⊙ Ū``;
- keep ratio :func:`keep_ratio`: ``τ(t) = 1`` for ``t < t_i``, ``(1 − (t − t_i)/(T − t_i − t_f))³``
  until ``T − t_f``, then 0;
- at every step ``t ≥ t_i`` with ``t % window == 0``, with ``N`` the number of elements of the
  still-trainable ``A``/``B`` and ``k = ⌊N·(1 − τ(t))⌋``, the threshold is the ``k``-th smallest
  element score over them (nothing freezes when ``k = 0``), and every still-trainable matrix whose
  *mean* score is below it freezes.

Freezing is a traced boolean per matrix in :class:`AFLoRAState` (``active``): ``update_mask``
returns it, so a frozen matrix gets no update (bitwise unchanged, no weight decay) and never
retraces; the step hook also zeroes its Adam moments when it freezes, so they stay exactly zero.
The decision is made in the step hook after the optimizer update of step ``t`` and holds from
step ``t + 1`` (the official code: ``requires_grad = False`` after that step's backward).

``freeze_square=True`` is the official code's behaviour (``mode elora`` never trains ``A``/``B``
of square kernels: they stay at their random init, VeRA-like); the default follows the paper's
text (all projection matrices start trainable).

Deviations, on purpose: the init is PyTorch's ``kaiming_uniform_`` with ``a = 0``
(``U(±sqrt(6/fan_in))``, the official scripts' ``init_type 1``); decisions are taken every
``window`` steps also after ``T − t_f`` (the official code checks every step there; with ``τ = 0``
everything still trainable freezes at the next decision either way); ``t_i``/``t_f`` are fractions
of the run (``< 1``) or step counts (``>= 1``): "one epoch" is ``1/epochs`` (the official configs:
``t_i`` = 1 and ``t_f`` = 14 of 20 epochs, the defaults here). With an unknown run length
(``total_steps < 1``, e.g. a bare ``make_train_step``) the scores are tracked and nothing freezes.

>>> m = aflora(rank=4)
>>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths
from guft_jax.methods import weight_space as ws
from guft_jax.methods.adalora import budget_phases, check_betas, sensitivity_ema
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, StepInfo, register
from guft_jax.methods.hparams import as_json

GROUP = "aflora"
PROJ = ("A", "B")  # the projection matrices that freeze
ALL_LINEAR = (
    r"MultiHeadDotProductAttention_1/(query|key|value|out)/kernel$",
    r"MlpBlock_3/Dense_(0|1)/kernel$",
)


class AFLoRAState(NamedTuple):
    """Traced per-matrix freezing state (``key -> {"A": ..., "B": ...}`` in every field)."""

    ipt: dict  # mean |g| over the current window (element-wise)
    ipt_bar: dict  # Ī
    unc_bar: dict  # Ū
    active: dict  # bool scalar: the matrix still trains
    frozen_at: dict  # int32 scalar: the step whose hook froze it (-1: not frozen by the schedule)


def keep_ratio(t: int, *, total_steps: int, t_init: float, t_final: float) -> float:
    """``τ(t)``, the fraction of projection-matrix elements kept trainable at step ``t``.

    With ``t_i, t_f`` in steps (fractions ``< 1`` of ``T = total_steps`` are floored)::

      τ(t) = 1                                          t < t_i
           = (1 − (t − t_i) / (T − t_i − t_f))³          t_i <= t < T − t_f
           = 0                                          t >= T − t_f

    >>> keep_ratio(100, total_steps=1000, t_init=0.05, t_final=0.7)  # (1 - 50/250)**3
    0.512...
    """
    ti, tf = budget_phases(total_steps, t_init, t_final, field="aflora")
    if t < ti:
        return 1.0
    if t < total_steps - tf:
        return (1.0 - (t - ti) / max(total_steps - ti - tf, 1)) ** 3
    return 0.0


def frozen_matrices(state: AFLoRAState) -> dict[str, int]:
    """``{"<kernel path>/A": step}`` of the matrices the schedule froze (host values)."""
    return {
        f"{ws.path_of(k)}/{x}": int(v[x])
        for k, v in state.frozen_at.items()
        for x in PROJ
        if int(v[x]) >= 0
    }


def _zero_moments(opt_state, active: dict):
    """Zeroes every optimizer-state leaf that mirrors an inactive ``A``/``B`` (its path ends with
    ``aflora/<key>/<A|B>``, as Adam's ``mu``/``nu`` do)."""
    flags = {f"{GROUP}/{k}/{x}": v[x] for k, v in active.items() for x in PROJ}

    def fix(path, leaf):
        tail = "/".join(paths.key_to_str(path).split("/")[-3:])
        if tail in flags and getattr(leaf, "ndim", 0) == 2:
            return jnp.where(flags[tail], leaf, jnp.zeros_like(leaf))
        return leaf

    return jax.tree_util.tree_map_with_path(fix, opt_state)


class AFLoRAHparams(NamedTuple):
    """The hyperparameters of :func:`aflora` (validated)."""

    rank: int
    d_init: float
    targets: tuple[str, ...]
    t_init: float
    t_final: float
    window: int
    beta1: float
    beta2: float
    freeze_square: bool


def _check(hp: AFLoRAHparams) -> None:
    """Raises ValueError naming the first hyperparameter out of range."""
    if hp.rank < 1:
        raise ValueError(f"aflora.rank: must be >= 1, got {hp.rank}")
    if hp.window < 1:
        raise ValueError(f"aflora.window: must be >= 1, got {hp.window}")
    check_betas(hp.beta1, hp.beta2, field="aflora")
    budget_phases(1, hp.t_init, hp.t_final, field="aflora")  # validates the values


def _init(hp: AFLoRAHparams, rng, params):
    out = {}
    for i, p in enumerate(ws.target_paths(params, hp.targets, field="aflora.targets")):
        d_in, d_out = ws.matrix(params, p).shape
        ka, kb = jax.random.split(jax.random.fold_in(rng, i))
        out[ws.key(p)] = {
            "A": ws.kaiming_uniform(ka, (hp.rank, d_in), d_in, a=0.0),
            "B": ws.kaiming_uniform(kb, (d_out, hp.rank), hp.rank, a=0.0),
            "s_d": jnp.full((hp.rank,), hp.d_init, jnp.float32),
            "s_b": jnp.zeros((d_out,), jnp.float32),
        }
    return {"head": params["head"], GROUP: out}


def _merge(params, trainable):
    deltas = {
        ws.path_of(k): ((f["A"].T * f["s_d"]) @ f["B"].T) * f["s_b"]
        for k, f in trainable[GROUP].items()
    }
    return ws.add_deltas(params, deltas, trainable["head"])


def _square(f) -> bool:
    return f["A"].shape[1] == f["B"].shape[0]


def _init_state(hp: AFLoRAHparams, params, trainable) -> AFLoRAState:
    del params
    zeros = {k: {x: jnp.zeros_like(f[x]) for x in PROJ} for k, f in trainable[GROUP].items()}
    active = {
        k: {x: jnp.asarray(not (hp.freeze_square and _square(f))) for x in PROJ}
        for k, f in trainable[GROUP].items()
    }
    frozen_at = {k: {x: jnp.asarray(-1, jnp.int32) for x in PROJ} for k in active}
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731
    return AFLoRAState(zeros, copy(zeros), copy(zeros), active, frozen_at)


def _update_mask(state: AFLoRAState):
    return {
        "head": True,
        GROUP: {k: {**a, "s_d": True, "s_b": True} for k, a in state.active.items()},
    }


def _trained(hp: AFLoRAHparams, params, trainable, state=None):
    del params, state
    out = {}
    for k, f in trainable[GROUP].items():
        n = math.prod(f["s_d"].shape) + math.prod(f["s_b"].shape)
        if not (hp.freeze_square and _square(f)):
            n += math.prod(f["A"].shape) + math.prod(f["B"].shape)
        out[ws.path_of(k)] = int(n)
    return out


def _scores(hp: AFLoRAHparams, st: AFLoRAState, g: dict, t) -> tuple[dict, dict, dict]:
    """This step's ``(ipt, Ī, Ū)``: ``|g|`` averaged into the window, the EMAs at its first step;
    a frozen matrix's scores stop changing (it leaves the ranking for good)."""
    local = t % hp.window
    first = local == 0
    lf = local.astype(jnp.float32)
    ipt, ib, ub = {}, {}, {}
    for k in st.active:
        ipt[k], ib[k], ub[k] = {}, {}, {}
        for x in PROJ:
            act, w = st.active[k][x], st.ipt[k][x]
            i_new, u_new = sensitivity_ema(
                st.ipt_bar[k][x], st.unc_bar[k][x], w, hp.beta1, hp.beta2
            )
            gi = jnp.abs(g[k][x])
            w_new = jnp.where(first, gi, (w * lf + gi) / (lf + 1.0))
            ipt[k][x] = jnp.where(act, w_new, w)
            ib[k][x] = jnp.where(act & first, i_new, st.ipt_bar[k][x])
            ub[k][x] = jnp.where(act & first, u_new, st.unc_bar[k][x])
    return ipt, ib, ub


def _below_threshold(active: dict, ib: dict, ub: dict, frac) -> dict:
    """The still-trainable matrices whose mean score is below the ``k``-th smallest element score
    over them (``k = ⌊N·frac⌋``; nothing when ``k = 0``)."""
    order = [(k, x) for k in sorted(active) for x in PROJ]
    score = {kx: ib[kx[0]][kx[1]] * ub[kx[0]][kx[1]] for kx in order}
    act = {kx: active[kx[0]][kx[1]] for kx in order}
    n = sum(jnp.where(act[kx], score[kx].size, 0) for kx in order)
    k_th = jnp.floor(n.astype(jnp.float32) * frac).astype(jnp.int32)
    flat = jnp.concatenate([jnp.where(act[kx], score[kx].reshape(-1), jnp.inf) for kx in order])
    thr = jnp.sort(flat)[jnp.clip(k_th - 1, 0, flat.shape[0] - 1)]
    out = {k: {} for k in active}
    for k, x in order:
        out[k][x] = act[k, x] & (k_th >= 1) & (jnp.mean(score[k, x]) < thr)
    return out


def _freeze(hp: AFLoRAHparams, active: dict, ib: dict, ub: dict, t, total_steps: int) -> dict:
    """The matrices this step's decision freezes (none off the schedule's decision steps, and
    none at all with an unknown run length)."""
    none = {k: {x: jnp.zeros((), bool) for x in PROJ} for k in active}
    T = total_steps
    if T < 1:  # static: unknown run length, no schedule
        return none
    ti, _ = budget_phases(T, hp.t_init, hp.t_final, field="aflora")
    kept = [keep_ratio(s, total_steps=T, t_init=hp.t_init, t_final=hp.t_final) for s in range(T)]
    frac = jnp.asarray(1.0 - np.asarray(kept), jnp.float32)[jnp.minimum(t, T - 1)]
    first = (t % hp.window) == 0
    decide = lambda _: _below_threshold(active, ib, ub, frac)  # noqa: E731
    return jax.lax.cond(first & (t >= ti), decide, lambda _: none, None)


def _step(hp: AFLoRAHparams, info: StepInfo):
    st: AFLoRAState = info.state
    t = info.step
    ipt, ib, ub = _scores(hp, st, info.grads[GROUP], t)
    freeze = _freeze(hp, st.active, ib, ub, t, info.total_steps)
    active = {k: {x: st.active[k][x] & ~freeze[k][x] for x in PROJ} for k in st.active}
    frozen_at = {
        k: {x: jnp.where(freeze[k][x], t, st.frozen_at[k][x]).astype(jnp.int32) for x in PROJ}
        for k in st.active
    }
    opt_state = _zero_moments(info.opt_state, active)
    return info.trainable, opt_state, AFLoRAState(ipt, ib, ub, active, frozen_at)


@register(
    "aflora",
    info=Info(
        "low-rank", "`s_b ⊙ B(s_d ⊙ A x)`, A and B frozen adaptively per matrix", "2403.13269"
    ),
    defaults=Defaults(
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(rank=4),
        vtab_kwargs=dict(rank=4, t_init=0.01),  # one of VTAB-1K's 100 epochs
        dry_kwargs=dict(rank=2, window=1, t_init=0.0),
        step_cost=0.55,
    ),
)
def aflora(
    *,
    rank: int = 4,
    d_init: float = 0.1,
    targets: tuple[str, ...] = ALL_LINEAR,
    t_init: float = 0.05,
    t_final: float = 0.7,
    window: int = 10,
    beta1: float = 0.85,
    beta2: float = 0.95,
    freeze_square: bool = False,
) -> Method:
    """AFLoRA on the kernels matched by ``targets`` (default: every attention and MLP kernel, the
    official target set).

    Args:
      rank: ``r`` of ``A`` ``(r, in)`` and ``B`` ``(out, r)``.
      d_init: the initial value of ``s_d`` (``s_b`` starts at 0).
      targets: regexes over ``/``-joined param paths of the kernels to adapt.
      t_init, t_final: ``t_i`` and ``t_f`` of :func:`keep_ratio`, fractions of the run (``< 1``)
        or step counts (``>= 1``).
      window: steps averaged into one ``I`` and between two freezing decisions (ΔT).
      beta1, beta2: the EMA factors of ``Ī`` and ``Ū``.
      freeze_square: never train ``A``/``B`` of square kernels (the official code).

    Raises:
      ValueError: a value out of range.
    """
    hp = AFLoRAHparams(
        rank, d_init, tuple(targets), t_init, t_final, window, beta1, beta2, freeze_square
    )
    _check(hp)
    f = functools.partial
    hooks = MethodHooks(
        init_state=f(_init_state, hp),
        update_mask=_update_mask,
        step=f(_step, hp),
        trained=f(_trained, hp),
    )
    return ws.method("aflora", init=f(_init, hp), merge=_merge, hparams=as_json(hp), hooks=hooks)
