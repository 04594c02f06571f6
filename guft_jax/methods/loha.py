"""LoHa: low-rank Hadamard product updates (Hyeon-Woo et al., FedPara, arXiv:2108.06098; LyCORIS).

``W = W0 + (α/r)·(B1 A1) ⊙ (B2 A2)`` on each target kernel, with ``B1, B2`` ``(out, r)`` and
``A1, A2`` ``(r, in)``: two rank-``r`` products multiplied elementwise give an update of rank up
to ``r²`` for ``2·r·(in + out)`` numbers. Names, shapes and init follow Hugging Face PEFT's
``LoHaLayer`` (torch ``(out, in)`` orientation): ``hada_w1_a`` = B1, ``hada_w1_b`` = A1,
``hada_w2_a`` = B2, ``hada_w2_b`` = A2; ``reset_adapter_parameters`` draws ``w1_a``, ``w1_b``,
``w2_a`` from PyTorch's ``kaiming_uniform_(a=√5)`` (U(±1/√fan_in), fan_in = the factor's second
dim) and zeroes ``w2_b``, so ``ΔW = 0`` at init; the scale is ``α/r``. In the Flax ``(in, out)``
kernel layout the update is the transpose, ``kernel + (α/r)·((B1 A1) ⊙ (B2 A2))ᵀ``.

Supported PEFT options: ``r`` (``rank``), ``alpha``, ``target_modules`` (``targets``, regexes).
Not supported: ``rank_dropout``, ``module_dropout`` (no dropout on the update),
``use_effective_conv2d`` (a conv kernel given a ``layout`` rule is adapted as its 2-D
``(kh·kw·cin, cout)`` view, PEFT's non-effective Conv2d form), ``init_weights=False``.

Default targets as LoRA's: the attention query and value kernels. Count for rank ``r`` on a
``(d_in, d_out)`` kernel: ``2·r·(d_in + d_out)``; ViT-B/16, r = 8, query and value:
``24 · 2·8·(768 + 768) = 589,824``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, register

GROUP = "loha"


def loha_factors(rng: jax.Array, d_in: int, d_out: int, *, rank: int) -> dict:
    """One kernel's PEFT-initialised factors (``hada_w2_b`` zero, the rest Kaiming-uniform)."""
    k1a, k1b, k2a = jax.random.split(rng, 3)
    return {
        "hada_w1_a": ws.kaiming_uniform(k1a, (d_out, rank), rank),
        "hada_w1_b": ws.kaiming_uniform(k1b, (rank, d_in), d_in),
        "hada_w2_a": ws.kaiming_uniform(k2a, (d_out, rank), rank),
        "hada_w2_b": jnp.zeros((rank, d_in), jnp.float32),
    }


def loha_delta(f: dict, scale: float) -> jax.Array:
    """``ΔW = scale·((B1 A1) ⊙ (B2 A2))ᵀ`` as an ``(in, out)`` matrix."""
    w1 = f["hada_w1_a"] @ f["hada_w1_b"]
    w2 = f["hada_w2_a"] @ f["hada_w2_b"]
    return scale * (w1 * w2).T


@register(
    "loha",
    info=Info(
        "low-rank",
        "`ΔW = (α/r)·(B₁A₁) ⊙ (B₂A₂)`",
        "2108.06098",
    ),
    defaults=Defaults(lr=1e-3, head_lr=1e-2, kwargs=dict(rank=8, alpha=16.0), step_cost=0.5),
)
def loha(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    layout: tuple[tuple[str, int], ...] = ws.VIT_LAYOUT,
) -> Method:
    """LoHa on the kernels matched by ``targets`` (module docstring).

    Defaults: rank 8 as PEFT's ``LoHaConfig``; α = 16 (PEFT's default is α = r = 8) and lr 1e-3
    as the library's LoRA, so LoHa and LoRA compare at the same update scale α/r = 2.

    Args:
      rank: ``r`` of each of the two factor pairs.
      alpha: the update is scaled by ``alpha / rank``.
      targets: regexes over ``/``-joined param paths naming the kernels to adapt.
      layout: ``(regex, n_in)`` rules giving the 2-D ``(in, out)`` view of kernels of more than 2
        dimensions (:func:`weight_space.matrix_shape`).

    Raises:
      ValueError: ``rank < 1`` or ``alpha <= 0``; at init, a regex matching nothing or a target
        that is not a kernel.

    >>> m = loha(rank=8, alpha=16.0)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    if rank < 1:
        raise ValueError(f"loha.rank: must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"loha.alpha: must be > 0, got {alpha}")
    scale = alpha / rank

    def init(rng, params):
        facs = {}
        for i, p in enumerate(ws.target_paths(params, targets, field="loha.targets")):
            d_in, d_out = ws.matrix_shape(p, paths.get(params, p).shape, layout)
            facs[ws.key(p)] = loha_factors(jax.random.fold_in(rng, i), d_in, d_out, rank=rank)
        return {"head": params["head"], GROUP: facs}

    def merge(params, trainable):
        deltas = {ws.path_of(k): loha_delta(f, scale) for k, f in trainable[GROUP].items()}
        return ws.add_deltas(params, deltas, trainable["head"])

    hp = dict(rank=rank, alpha=alpha, targets=list(targets), layout=[list(r) for r in layout])
    return ws.method(GROUP, init=init, merge=merge, hparams=hp)
