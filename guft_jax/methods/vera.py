"""VeRA (Kopiczko et al., arXiv:2310.11454): frozen shared random projections, trainable scalings.

``ΔW x = λ_b ⊙ B (λ_d ⊙ A x)`` with ``A`` (r, in_max) and ``B`` (out_max, r) drawn once from
``seed`` (Kaiming-uniform) and shared by every adapted layer (sliced to each layer's shape, as
the paper does for layers of different sizes). Only ``λ_d`` (r,), init 0.1, and ``λ_b`` (out,),
init 0, train, so the model is unchanged at init. ``A`` and ``B`` are regenerated from the seed
inside ``apply`` (they are not trained, not checkpointed, and cost nothing to store).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, register


def vera_projections(seed: int, rank: int, d_in: int, d_out: int):
    """The frozen shared ``A`` (r, d_in) and ``B`` (d_out, r), Kaiming-uniform from ``seed``."""
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    return ws.kaiming_uniform(ka, (rank, d_in), d_in), ws.kaiming_uniform(kb, (d_out, rank), rank)


def vera_delta(s: dict, a_all: jax.Array, b_all: jax.Array, d_in: int, d_out: int) -> jax.Array:
    """``ΔW`` as an ``(in, out)`` matrix from the scalings ``s`` and the shared projections
    (sliced to the layer's shape)."""
    a, b = a_all[:, :d_in], b_all[:d_out]
    return ((s["lambda_b"][:, None] * b) @ (s["lambda_d"][:, None] * a)).T


@register(
    "vera",
    defaults=Defaults(lr=1e-2, head_lr=1e-2, kwargs=dict(rank=256), step_cost=0.45),
    info=Info(
        "low-rank",
        "`λ_b ⊙ B(λ_d ⊙ A x)` over frozen shared random `A`, `B`",
        "2310.11454",
    ),
)
def vera(
    *,
    rank: int = 256,
    seed: int = 0,
    d_init: float = 0.1,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
) -> Method:
    """VeRA on the kernels matched by ``targets``."""
    if rank < 1:
        raise ValueError(f"vera.rank: must be >= 1, got {rank}")

    def projections(d_in, d_out):
        return vera_projections(seed, rank, d_in, d_out)

    def shapes(params, trainable):
        mats = [ws.matrix(params, ws.path_of(k)).shape for k in trainable["vera"]]
        return max(s[0] for s in mats), max(s[1] for s in mats)

    def init_fn(rng, params):
        del rng
        tps = ws.target_paths(params, targets, field="vera.targets")
        scal = {}
        for p in tps:
            d_out = ws.matrix(params, p).shape[1]
            scal[ws.key(p)] = {
                "lambda_d": jnp.full((rank,), d_init, jnp.float32),
                "lambda_b": jnp.zeros((d_out,), jnp.float32),
            }
        return {"head": params["head"], "vera": scal}

    def merge(params, trainable):
        a_all, b_all = projections(*shapes(params, trainable))
        deltas = {}
        for k, s in trainable["vera"].items():
            p = ws.path_of(k)
            d_in, d_out = ws.matrix(params, p).shape
            deltas[p] = vera_delta(s, a_all, b_all, d_in, d_out)
        return ws.add_deltas(params, deltas, trainable["head"])

    hp = dict(rank=rank, seed=seed, d_init=d_init, targets=list(targets))
    return ws.method("vera", init=init_fn, merge=merge, hparams=hp)
