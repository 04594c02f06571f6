"""HRA (Yuan et al., arXiv:2405.17484): a chain of Householder reflections of the input side of
frozen kernels, folded into the weights (``apply`` is ``merge``), with an orthogonality
regulariser on the reflection vectors.

``W' = W0 H_1 ⋯ H_r`` with ``H_i = I − 2 u_i u_iᵀ / ‖u_i‖²`` on each target ``W (out, in)``, the
``r`` vectors the columns of the trainable ``hra_u (in, r)``: Hugging Face PEFT 0.17.1's
``HRALinear`` (names, shape, side and order). A Flax kernel is ``K = Wᵀ (in, out)``, so here
``K' = H_r ⋯ H_1 K0`` (each ``H_i`` is symmetric), the reflections acting on the input features
and ``H_1`` applied first; ``hra_u`` is the same array in both layouts (no transpose on export).
Kernels of more than 2 dimensions are reflected in their ``(in, out)`` view given by ``layout``
(:func:`weight_space.matrix_shape`); the chain is computed in float32.

Init (PEFT's ``reset_hra_parameters``): ``r/2`` vectors drawn from PyTorch's
``kaiming_uniform_(a=√5)`` on an ``(in, r/2)`` tensor (U(±1/√(r/2)), fan_in = its second dim),
each repeated twice in a row (``repeat_interleave``), so ``H_{2j} H_{2j+1} = I`` and the model is
unchanged at init. The regulariser (the paper's, absent from PEFT) is
``λ Σ_kernels ‖ÛᵀÛ − I‖_F²`` with ``Û`` the column-normalised ``hra_u``, returned by
``MethodHooks.loss`` and added to the task loss in training (``lambda_orth = 0`` trains exactly
as PEFT). Differences from PEFT: an odd ``r`` is an error (PEFT warns and draws an unpaired
init that is not the identity); ``apply_GS=True`` is refused: PEFT's Gram–Schmidt form
orthonormalises the columns, and with the paired init each second column of a pair becomes
``0/0`` (NaN).

Default targets as LoRA's: the attention query and value kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, register


def normalised(u: jax.Array) -> jax.Array:
    """The columns of ``u (in, r)`` scaled to unit norm, in float32."""
    u = u.astype(jnp.float32)
    return u / jnp.linalg.norm(u, axis=0, keepdims=True)


@jax.jit
def householder_chain(u: jax.Array, w: jax.Array) -> jax.Array:
    """``H_r ⋯ H_1 w`` for ``w (in, out)``, ``H_i = I − 2 û_i û_iᵀ`` from the columns of ``u``
    (``H_1`` applied first), one rank-1 update per reflection; float32."""

    def reflect(acc, v):
        return acc - 2.0 * jnp.outer(v, v @ acc), None

    return jax.lax.scan(reflect, w.astype(jnp.float32), normalised(u).T)[0]


def householder_orthogonality(u: jax.Array) -> jax.Array:
    """``‖ÛᵀÛ − I‖_F²`` of the column-normalised ``u (in, r)``."""
    v = normalised(u)
    return jnp.sum((v.T @ v - jnp.eye(v.shape[1], dtype=v.dtype)) ** 2)


def paired_init(rng: jax.Array, d_in: int, r: int) -> jax.Array:
    """PEFT's symmetric init: ``r/2`` Kaiming-uniform columns, each repeated twice in a row."""
    half = ws.kaiming_uniform(rng, (d_in, r // 2), r // 2)
    return jnp.repeat(half, 2, axis=1)


@register(
    "hra",
    info=Info(
        "orthogonal",
        "a chain of r Householder reflections, with an orthogonality loss",
        "2405.17484",
    ),
    defaults=Defaults(lr=1e-3, head_lr=1e-2, kwargs=dict(r=8, lambda_orth=1e-4), step_cost=0.5),
)
def hra(
    *,
    r: int = 8,
    apply_GS: bool = False,  # noqa: N803 (PEFT's field name)
    lambda_orth: float = 1e-4,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    layout: tuple[tuple[str, int], ...] = ws.VIT_LAYOUT,
) -> Method:
    """HRA on the kernels matched by ``targets``: ``K' = H_r ⋯ H_1 K0`` (module docstring).

    Defaults: PEFT's ``r = 8``; ``lambda_orth = 1e-4``, a light pull towards orthogonal
    reflection vectors that the task loss dominates (the paper tunes λ over small values); lr
    1e-3 as the library's LoRA. Count per ``(in, out)`` kernel: ``in·r``; ViT-B/16, r = 8, query
    and value: ``24 · 768 · 8 = 147,456``.

    Args:
      r: number of Householder reflections per kernel (even).
      apply_GS: PEFT's Gram–Schmidt form; only False is implemented.
      lambda_orth: weight λ of the orthogonality regulariser (>= 0; 0 turns it off).
      targets: regexes over ``/``-joined param paths naming the kernels to reflect.
      layout: ``(regex, n_in)`` rules for the ``(in, out)`` view of kernels of more than 2 dims.

    Raises:
      ValueError: ``r`` not a positive even number, ``apply_GS=True``, ``lambda_orth < 0``; at
        init, a regex matching nothing or a non-kernel target.

    >>> m = hra(r=8)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    if r < 2 or r % 2:
        raise ValueError(f"hra.r: must be a positive even number (paired identity init), got {r}")
    if apply_GS:
        raise ValueError("hra.apply_GS: only False is implemented (allowed: False)")
    if lambda_orth < 0:
        raise ValueError(f"hra.lambda_orth: must be >= 0, got {lambda_orth}")

    def init(rng, params):
        out = {}
        for i, p in enumerate(ws.target_paths(params, targets, field="hra.targets")):
            d_in, _ = ws.matrix_shape(p, paths.get(params, p).shape, layout)
            out[ws.key(p)] = {"hra_u": paired_init(jax.random.fold_in(rng, i), d_in, r)}
        return {"head": params["head"], "hra": out}

    def merge(params, trainable):
        kernels = {}
        for k, f in trainable["hra"].items():
            p = ws.path_of(k)
            w = paths.get(params, p)
            kernels[p] = householder_chain(
                f["hra_u"], w.reshape(ws.matrix_shape(p, w.shape, layout))
            )
        return ws.replace_kernels(params, kernels, trainable["head"])

    def loss(params, trainable, state=None, rng=None):
        del params, state, rng
        return lambda_orth * sum(
            householder_orthogonality(f["hra_u"]) for f in trainable["hra"].values()
        )

    hp = dict(r=r, apply_GS=apply_GS, lambda_orth=lambda_orth, targets=list(targets),
              layout=[list(x) for x in layout])  # fmt: skip
    hooks = MethodHooks(loss=loss) if lambda_orth > 0 else None
    return ws.method("hra", init=init, merge=merge, hparams=hp, hooks=hooks)
