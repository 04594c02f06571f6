"""LoRA (Hu et al., arXiv:2106.09685) and DoRA (Liu et al., arXiv:2402.09353).

LoRA: ``W = W0 + (α/r)·B A`` with ``A`` (r, in) Kaiming-uniform (or N(0, 1/r)) and ``B`` (out, r)
zero, so the model is unchanged at init. In the Flax ``(in, out)`` kernel layout the update is
``kernel + (α/r)·Aᵀ Bᵀ``. Targets are kernels chosen by regex (default: attention query and
value); 3-D attention kernels are adapted as their 2-D ``(768, 768)`` view.

DoRA: ``W' = m ⊙ V / ‖V‖`` with ``V = W0 + (α/r)·B A``, the norm taken per output unit over the
input dim (a column norm of the ``(in, out)`` kernel), ``m`` initialised to the norms of ``W0``
and the norm treated as a constant in the backward pass (as HF PEFT does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Method, register


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


def _lora_factors(rng, params, paths_, rank, init):
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
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"{name}.init: {init!r} not in ['kaiming', 'gaussian']")


@register(
    "lora",
    defaults=Defaults(lr=1e-3, head_lr=1e-2, kwargs=dict(rank=8, alpha=16.0), step_cost=0.45),
)
def lora(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    init: str = "kaiming",
) -> Method:
    """LoRA on the kernels matched by ``targets``.

    >>> m = lora(rank=8, alpha=16.0)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    _validate(rank, alpha, init, "lora")
    scale = alpha / rank

    def init_fn(rng, params):
        tps = ws.target_paths(params, targets, field="lora.targets")
        return {"head": params["head"], "lora": _lora_factors(rng, params, tps, rank, init)}

    def merge(params, trainable):
        deltas = {ws.path_of(k): lora_delta(f, scale) for k, f in trainable["lora"].items()}
        return ws.add_deltas(params, deltas, trainable["head"])

    hp = dict(rank=rank, alpha=alpha, targets=list(targets), init=init)
    return ws.method("lora", init=init_fn, merge=merge, hparams=hp)


@register(
    "dora", defaults=Defaults(lr=1e-3, head_lr=1e-2, kwargs=dict(rank=8, alpha=16.0), step_cost=0.5)
)
def dora(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    init: str = "kaiming",
) -> Method:
    """DoRA: LoRA's direction update with a trainable per-output magnitude ``m``."""
    _validate(rank, alpha, init, "dora")
    scale = alpha / rank

    def init_fn(rng, params):
        tps = ws.target_paths(params, targets, field="dora.targets")
        factors = _lora_factors(rng, params, tps, rank, init)
        for p in tps:
            factors[ws.key(p)]["m"] = jnp.linalg.norm(ws.matrix(params, p), axis=0)
        return {"head": params["head"], "dora": factors}

    def merge(params, trainable):
        kernels = {}
        for k, f in trainable["dora"].items():
            p = ws.path_of(k)
            kernels[p] = dora_kernel(ws.matrix(params, p), f, scale)
        return ws.replace_kernels(params, kernels, trainable["head"])

    hp = dict(rank=rank, alpha=alpha, targets=list(targets), init=init)
    return ws.method("dora", init=init_fn, merge=merge, hparams=hp)
