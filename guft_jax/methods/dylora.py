"""DyLoRA (Valipour et al., arXiv:2210.07558): LoRA trained for every rank up to ``r_max`` at once.

The factors are LoRA's, ``A`` ``(r_max, in)`` Kaiming-uniform and ``B`` ``(out, r_max)`` zero (the
model is unchanged at init), ordered so that every prefix is an adapter. Each training step
samples one rank ``b`` uniformly from ``{1..r_max}`` (from the ``rng`` that the engine passes to
``apply``; one ``b`` for all adapted kernels) and uses only the first ``b`` rows of ``A`` and
columns of ``B``: ``ΔW = (α/b)·B[:, :b] A[:b]``, so only those receive gradient. With
``frozen_lower=True`` (the paper's "frozen" variant) only the ``b``-th row/column receives
gradient and the lower ranks are used as constants. Deterministic passes (``rng=None``:
evaluation, merging, artifacts) use ``eval_rank`` (0: ``r_max``). :func:`truncate` turns a trained
adapter into a plain LoRA adapter of any rank ``b ≤ r_max`` with no retraining: the same forward
as ``lora(rank=b, alpha=α)`` with the first ``b`` factors.

The rank is sampled inside the traced ``apply`` and the factors are masked rather than sliced, so
the step never retraces. Like the official PyTorch code with AdamW, ranks above ``b`` get a zero
gradient but their Adam momentum and decoupled weight decay still move them at that step (the
engine's ``update_mask`` sees only the method state, not the sampled rank).

>>> m = dylora(rank=8, alpha=16.0)
>>> lora_tr = truncate(trained, 4)  # doctest: +SKIP  (for get_method("lora", rank=4, alpha=16.0))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, RankEval, register
from guft_jax.methods.lora import lora

GROUP = "dylora"
_SALT = 0x44594C  # folds the step's rng into the rank sample (dropout uses fold_in(rng, 1))


def sample_rank(rng: jax.Array, rank: int) -> jax.Array:
    """The rank ``b ~ U{1..rank}`` a training step with key ``rng`` uses (int32 scalar)."""
    return jax.random.randint(jax.random.fold_in(rng, _SALT), (), 1, rank + 1)


def truncate(trainable: dict, rank: int) -> dict:
    """A DyLoRA trainable tree cut to ``rank``: a LoRA trainable tree (``{"head", "lora"}``) for
    ``lora(rank=rank, alpha=α, targets=...)`` with the same ``α`` and targets.

    Raises:
      ValueError: ``rank`` is not in ``[1, r_max]``.
    """
    fs = trainable[GROUP]
    r_max = next(iter(fs.values()))["A"].shape[0]
    if not 1 <= rank <= r_max:
        raise ValueError(f"dylora.truncate: rank must be in [1, {r_max}], got {rank}")
    lora = {k: {"A": f["A"][:rank], "B": f["B"][:, :rank]} for k, f in fs.items()}
    return {"head": trainable["head"], "lora": lora}


def as_lora(method: Method, trainable: dict, rank: int) -> tuple[Method, dict]:
    """``(lora method, lora trainable)``: a trained DyLoRA run at ``rank`` as the plain LoRA it
    truncates to (same ``α`` and targets), to evaluate one run at several ranks.

    >>> m4, tr4 = as_lora(m, trained, 4)  # doctest: +SKIP  (then forward/evaluate with m4)
    """
    hp = method.hparams
    m = lora(rank=rank, alpha=hp["alpha"], targets=tuple(hp["targets"]))
    return m, truncate(trainable, rank)


def _masked(f: dict, b: jax.Array, frozen_lower: bool) -> tuple[jax.Array, jax.Array]:
    """``A``, ``B`` with the ranks ``>= b`` zeroed (and, ``frozen_lower``, those ``< b − 1``
    without gradient)."""
    a, bm = f["A"], f["B"]
    idx = jnp.arange(a.shape[0])
    if frozen_lower:
        last = idx == b - 1
        a = jnp.where(last[:, None], a, jax.lax.stop_gradient(a))
        bm = jnp.where(last[None, :], bm, jax.lax.stop_gradient(bm))
    on = (idx < b).astype(a.dtype)
    return a * on[:, None], bm * on[None, :]


@register(
    "dylora",
    info=Info(
        "low-rank",
        "nested-rank LoRA (rank sampled per step); any rank ≤ r_max by truncation",
        "2210.07558",
    ),
    defaults=Defaults(
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(rank=8, alpha=16.0),
        dry_kwargs=dict(rank=4, alpha=8.0),
        step_cost=0.45,
    ),
    rank_eval=RankEval(ranks=(1, 2, 4, 8), truncate=as_lora),  # the paper's claim: any rank
)
def dylora(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    frozen_lower: bool = False,
    eval_rank: int = 0,
) -> Method:
    """DyLoRA on the kernels matched by ``targets``.

    Args:
      rank: ``r_max``.
      alpha: the update at rank ``b`` is scaled by ``alpha / b``.
      targets: regexes over ``/``-joined param paths of the kernels to adapt.
      frozen_lower: train only the sampled ``b``-th rank (the paper's frozen variant).
      eval_rank: the rank of deterministic passes and of ``merge`` (0: ``rank``).

    Raises:
      ValueError: ``rank``, ``alpha`` or ``eval_rank`` out of range.
    """
    if rank < 1:
        raise ValueError(f"dylora.rank: must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"dylora.alpha: must be > 0, got {alpha}")
    if not 0 <= eval_rank <= rank:
        raise ValueError(f"dylora.eval_rank: must be in [0, {rank}], got {eval_rank}")
    r_eval = eval_rank or rank

    def init_fn(rng, params):
        out = {}
        for i, p in enumerate(ws.target_paths(params, targets, field="dylora.targets")):
            d_in, d_out = ws.matrix(params, p).shape
            out[ws.key(p)] = {
                "A": ws.kaiming_uniform(jax.random.fold_in(rng, i), (rank, d_in), d_in),
                "B": jnp.zeros((d_out, rank), jnp.float32),
            }
        return {"head": params["head"], GROUP: out}

    def merge(params, trainable):
        deltas = {
            ws.path_of(k): (alpha / r_eval) * (f["A"][:r_eval].T @ f["B"][:, :r_eval].T)
            for k, f in trainable[GROUP].items()
        }
        return ws.add_deltas(params, deltas, trainable["head"])

    def sampled(params, trainable, rng):
        b = sample_rank(rng, rank)
        scale = alpha / b.astype(jnp.float32)
        deltas = {}
        for k, f in trainable[GROUP].items():
            a, bm = _masked(f, b, frozen_lower)
            deltas[ws.path_of(k)] = scale * (a.T @ bm.T)
        return ws.add_deltas(params, deltas, trainable["head"])

    def apply(params, trainable, state=None, rng=None):
        del state
        if rng is None:
            return {"params": merge(params, trainable)}
        return {"params": sampled(params, trainable, rng)}

    hp = dict(
        rank=rank,
        alpha=alpha,
        targets=list(targets),
        frozen_lower=frozen_lower,
        eval_rank=eval_rank,
    )
    return ws.method("dylora", init=init_fn, merge=merge, hparams=hp)._replace(apply=apply)
