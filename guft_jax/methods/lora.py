"""LoRA (Hu et al., arXiv:2106.09685) and DoRA (Liu et al., arXiv:2402.09353).

LoRA: ``W = W0 + (α/r)·B A`` with ``A`` (r, in) Kaiming-uniform (or N(0, 1/r)) and ``B`` (out, r)
zero, so the model is unchanged at init. In the Flax ``(in, out)`` kernel layout the update is
``kernel + (α/r)·Aᵀ Bᵀ``. Targets are kernels chosen by regex (default: attention query and
value); 3-D attention kernels are adapted as their 2-D ``(768, 768)`` view.

DoRA: ``W' = m ⊙ V / ‖V‖`` with ``V = W0 + (α/r)·B A``, the norm taken per output unit over the
input dim (a column norm of the ``(in, out)`` kernel), ``m`` initialised to the norms of ``W0``
and the norm treated as a constant in the backward pass (as HF PEFT does).

Principal initialisations (``init="pissa"`` / ``"olora"``, LoRA and DoRA), following HF PEFT
0.17.1's ``pissa_init`` / ``olora_init`` in its ``(out, in)`` weight layout ``Wᵀ`` of our kernel:

- PiSSA (Meng et al., arXiv:2404.02948): ``Wᵀ = V S Uᴴ`` (full SVD);
  ``A = diag(√(S_r/s)) Uᴴ_r``, ``B = V_r diag(√(S_r/s))`` with ``s = α/r``, so ``s·B A`` is the
  top-r part of ``Wᵀ``.
- OLoRA (Büyükakyüz, arXiv:2406.01775): ``Wᵀ = Q R`` (reduced QR); ``A = R[:r]``,
  ``B = Q[:, :r]`` (not divided by ``s``, as PEFT).

Both remove the principal part from the frozen base, ``W_res = Wᵀ − s·B A``, so the model is
unchanged at init. That happens once, in ``MethodHooks.prepare_base``: the prepared base holds
``W_res`` in place of each target kernel and the initial factors under the top-level key
:data:`INIT_KEY` (``init`` reads them; ``prepare_base`` is idempotent). ``apply``/``merge`` give
plain params ``W_res + s·Aᵀ Bᵀ`` without that key, and accept an unprepared base too (they
prepare it on the fly, deterministically), so an artifact loads onto the original checkpoint.
Counts equal plain LoRA's: ``r·(in + out)`` per target (PEFT reports the same for these inits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, Variant, register

RANDOM_INITS = ("kaiming", "gaussian")
PRINCIPAL_INITS = ("pissa", "olora")
INITS = RANDOM_INITS + PRINCIPAL_INITS
INIT_KEY = "lora_init"  # prepared base: {target key: the initial {"A", "B"}}


def lora_factor(rng, d_in: int, d_out: int, *, rank: int, init: str) -> dict:
    """One kernel's ``{"A": (r, in), "B": (out, r) zeros}`` (``init``: kaiming or gaussian)."""
    if init == "kaiming":
        a = ws.kaiming_uniform(rng, (rank, d_in), d_in)
    else:
        a = jax.random.normal(rng, (rank, d_in), jnp.float32) / jnp.sqrt(rank)
    return {"A": a, "B": jnp.zeros((d_out, rank), jnp.float32)}


def lora_delta(f: dict, scale: float) -> jax.Array:
    """``ΔW = scale·(B A)ᵀ`` as an ``(in, out)`` matrix."""
    return scale * (f["A"].T @ f["B"].T)


def dora_kernel(w: jax.Array, f: dict, scale: float) -> jax.Array:
    """DoRA's ``m ⊙ V/‖V‖`` for an ``(in, out)`` matrix ``w`` (the norm a constant in backward)."""
    v = w + lora_delta(f, scale)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))
    return v * (f["m"] / norm)


def principal_factors(w: jax.Array, *, rank: int, scale: float, init: str) -> dict:
    """PiSSA's or OLoRA's initial ``{"A": (r, in), "B": (out, r)}`` of an ``(in, out)`` matrix.

    ``scale·(B A)ᵀ`` is the principal part removed from the base (module docstring): PiSSA's
    top-r SVD part of ``w``, OLoRA's ``s·Q_r R_r`` of the QR of ``wᵀ``.

    Raises:
      ValueError: ``init`` not in :data:`PRINCIPAL_INITS`.
    """
    wt = w.T.astype(jnp.float32)  # PEFT's (out, in) weight
    if init == "pissa":
        v, s, uh = jnp.linalg.svd(wt, full_matrices=False)
        root = jnp.sqrt(s[:rank] / scale)
        return {"A": root[:, None] * uh[:rank], "B": v[:, :rank] * root[None, :]}
    if init == "olora":
        q, r = jnp.linalg.qr(wt)
        return {"A": r[:rank], "B": q[:, :rank]}
    raise ValueError(f"lora.init: {init!r} not in {list(PRINCIPAL_INITS)}")


def principal_base(params, targets, *, rank: int, scale: float, init: str, name: str) -> dict:
    """The base with each target's principal part removed and the initial factors under
    :data:`INIT_KEY` (returned unchanged if already prepared).

    Raises:
      ValueError: a regex matching no kernel, or ``rank`` above a target's ``min(in, out)``.
    """
    if INIT_KEY in params:
        return params
    kernels, factors = {}, {}
    for p in ws.target_paths(params, targets, field=f"{name}.targets"):
        w = ws.matrix(params, p)
        if rank > min(w.shape):
            raise ValueError(f"{name}.rank: {rank} exceeds min(in, out) = {min(w.shape)} of {p}")
        f = principal_factors(w, rank=rank, scale=scale, init=init)
        kernels[p] = w - lora_delta(f, scale)
        factors[ws.key(p)] = f
    return {**ws.replace_kernels(params, kernels, params["head"]), INIT_KEY: factors}


def _plain(params) -> dict:
    return {k: v for k, v in params.items() if k != INIT_KEY}


def _lora_factors(rng, params, paths_, rank, init):
    if init in PRINCIPAL_INITS:
        return {k: dict(f) for k, f in params[INIT_KEY].items()}
    out = {}
    for i, p in enumerate(paths_):
        d_in, d_out = ws.matrix(params, p).shape
        k = jax.random.fold_in(rng, i)
        out[ws.key(p)] = lora_factor(k, d_in, d_out, rank=rank, init=init)
    return out


def _validate(rank, alpha, init, name):
    if rank < 1:
        raise ValueError(f"{name}.rank: must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"{name}.alpha: must be > 0, got {alpha}")
    if init not in INITS:
        raise ValueError(f"{name}.init: {init!r} not in {list(INITS)}")


def _base_fn(targets, rank, scale, init, name):
    """``params -> params`` the method works on: the principal base (prepared once, or on the
    fly) for PiSSA/OLoRA, the params as they are otherwise; and the hooks that prepare it."""
    if init not in PRINCIPAL_INITS:
        return (lambda params: params), MethodHooks()
    prep = lambda params: principal_base(
        params, targets, rank=rank, scale=scale, init=init, name=name
    )
    return prep, MethodHooks(prepare_base=prep)


@register(
    "lora",
    info=Info(
        "low-rank",
        "`ΔW = (α/r)·B A`, B zero at init; `init`: Kaiming, Gaussian, or the PiSSA "
        "(arXiv:2404.02948) / OLoRA (arXiv:2406.01775) principal part moved out of the base",
        "2106.09685",
    ),
    defaults=Defaults(lr=1e-3, head_lr=1e-2, kwargs=dict(rank=8, alpha=16.0), step_cost=0.45),
    # ~0.33% of ViT-B/16, the same alpha / r as r = 8: the budget-matched row beside GUFT
    variants={"lora_r4": Variant(dict(rank=4, alpha=8.0))},
)
def lora(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    init: str = "kaiming",
) -> Method:
    """LoRA on the kernels matched by ``targets``.

    Args:
      rank, alpha: rank ``r`` and scale numerator (update scale ``α/r``).
      targets: regexes over kernel paths.
      init: ``"kaiming"`` (PEFT's default ``A``), ``"gaussian"`` (``A ~ N(0, 1/r)``), or the
        principal initialisations ``"pissa"`` / ``"olora"`` (module docstring).

    Raises:
      ValueError: a bad rank, alpha or init (naming the field and the allowed values).

    >>> m = lora(rank=8, alpha=16.0)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    _validate(rank, alpha, init, "lora")
    scale = alpha / rank
    base_of, hooks = _base_fn(targets, rank, scale, init, "lora")

    def init_fn(rng, params):
        params = base_of(params)
        tps = ws.target_paths(_plain(params), targets, field="lora.targets")
        return {"head": params["head"], "lora": _lora_factors(rng, params, tps, rank, init)}

    def merge(params, trainable):
        deltas = {ws.path_of(k): lora_delta(f, scale) for k, f in trainable["lora"].items()}
        return ws.add_deltas(_plain(base_of(params)), deltas, trainable["head"])

    hp = dict(rank=rank, alpha=alpha, targets=list(targets), init=init)
    return ws.method("lora", init=init_fn, merge=merge, hparams=hp, hooks=hooks)


@register(
    "dora",
    info=Info(
        "low-rank",
        "`W = m ⊙ V/‖V‖` per output unit, `V = W0 + (α/r)·B A`, `m` trained",
        "2402.09353",
    ),
    defaults=Defaults(lr=1e-3, head_lr=1e-2, kwargs=dict(rank=8, alpha=16.0), step_cost=0.5),
)
def dora(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    init: str = "kaiming",
) -> Method:
    """DoRA: LoRA's direction update with a trainable per-output magnitude ``m``.

    With ``init="pissa"`` / ``"olora"`` the base is the residual and ``m`` starts at the norms
    of ``W_res + s·ΔW₀ = W0`` (PEFT initialises DoRA's magnitude after the principal init).
    """
    _validate(rank, alpha, init, "dora")
    scale = alpha / rank
    base_of, hooks = _base_fn(targets, rank, scale, init, "dora")

    def init_fn(rng, params):
        params = base_of(params)
        tps = ws.target_paths(_plain(params), targets, field="dora.targets")
        factors = _lora_factors(rng, params, tps, rank, init)
        for p in tps:
            v = ws.matrix(params, p) + lora_delta(factors[ws.key(p)], scale)
            factors[ws.key(p)]["m"] = jnp.linalg.norm(v, axis=0)
        return {"head": params["head"], "dora": factors}

    def merge(params, trainable):
        params = _plain(base_of(params))
        kernels = {}
        for k, f in trainable["dora"].items():
            p = ws.path_of(k)
            kernels[p] = dora_kernel(ws.matrix(params, p), f, scale)
        return ws.replace_kernels(params, kernels, trainable["head"])

    hp = dict(rank=rank, alpha=alpha, targets=list(targets), init=init)
    return ws.method("dora", init=init_fn, merge=merge, hparams=hp, hooks=hooks)
