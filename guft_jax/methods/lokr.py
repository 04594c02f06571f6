"""LoKr: low-rank Kronecker product updates (LyCORIS, Yeh et al., arXiv:2309.14859).

``W = W0 + (α/r)·C ⊗ W2`` on each target kernel (torch ``(out, in)`` orientation): the output dim
splits as ``out = l·k`` and the input dim as ``in = m·n`` by :func:`factorization`; ``C`` is
``(l, m)`` and ``W2`` is ``(k, n)``, kept whole or as a rank-``r`` product ``B A`` (``(k, r)``,
``(r, n)``). In the Flax ``(in, out)`` kernel layout the update is the transpose,
``kernel + (α/r)·(C ⊗ W2)ᵀ``.

Names, shapes, init and scale follow Hugging Face PEFT's ``LoKrLayer`` (Linear): ``lokr_w1`` = C
(or ``lokr_w1_a`` ``(l, r)`` @ ``lokr_w1_b`` ``(r, m)`` with ``decompose_both``), ``lokr_w2`` =
W2 or ``lokr_w2_a`` @ ``lokr_w2_b``. ``W2`` is decomposed when ``r < max(k, n)/2``; with
``decompose_both``, ``C`` too when ``r < max(l, m)/2``. ``init="peft"`` (PEFT's
``init_weights=True``) zeroes ``C`` (or ``lokr_w1_a``) and draws the rest from PyTorch's
``kaiming_uniform_(a=√5)`` (U(±1/√fan_in), fan_in = the factor's second dim); ``init="lycoris"``
(PEFT's ``init_weights="lycoris"``) draws ``C`` and zeroes ``W2`` (or ``lokr_w2_b``). Either way
``ΔW = 0`` at init. The scale is ``α/r`` also when nothing is decomposed (as PEFT; the LyCORIS
code uses 1 there).

Supported PEFT options: ``r`` (``rank``), ``alpha``, ``decompose_both``, ``decompose_factor``,
``init_weights`` (``True`` or ``"lycoris"``, as ``init``), ``target_modules`` (``targets``).
Not supported: ``rank_dropout``, ``rank_dropout_scale``, ``module_dropout`` (no dropout on the
update), ``use_effective_conv2d`` and PEFT's Conv2d shapes (a conv kernel given a ``layout`` rule
is adapted as its 2-D ``(kh·kw·cin, cout)`` view, factored like a Linear),
``init_weights=False``.

Default targets as LoRA's: the attention query and value kernels. ViT-B/16, r = 8: ``768 =
24·32``, so ``C`` is ``(24, 24)`` and ``W2 = B A`` with ``(32, 8)``, ``(8, 32)``: ``24·(576 +
256 + 256) = 26,112`` numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, register

GROUP = "lokr"
INITS = ("peft", "lycoris")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Splits ``dimension`` into ``(m, n)`` with ``m·n = dimension``, PEFT's LoKr rule.

    A positive ``factor`` dividing ``dimension`` gives ``(factor, dimension // factor)``.
    Otherwise ``m`` walks up the divisors of ``dimension`` (``n = dimension // m``) while
    ``m < n`` and the next divisor is ``<= factor`` (``-1``: no bound, so the walk ends at the
    divisor pair nearest the square root); the pair is returned smaller first.

    Raises:
      ValueError: ``dimension < 1``, or ``factor`` neither ``-1`` nor positive.

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if dimension < 1:
        raise ValueError(f"lokr: dimension must be >= 1, got {dimension}")
    if factor != -1 and factor < 1:
        raise ValueError(f"lokr.decompose_factor: must be -1 or >= 1, got {factor}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if new_m > bound:
            break
        m, n = new_m, dimension // new_m
    return (n, m) if m > n else (m, n)


def lokr_shapes(d_in: int, d_out: int, *, rank: int, decompose_both: bool, factor: int):
    """``((l, m), (k, n), decompose_w1, decompose_w2)`` for an ``(in, out)`` kernel: ``C`` is
    ``(l, m)``, ``W2`` ``(k, n)`` (torch orientation, ``out = l·k``, ``in = m·n``)."""
    in_m, in_n = factorization(d_in, factor)
    out_l, out_k = factorization(d_out, factor)
    dec1 = decompose_both and rank < max(out_l, in_m) / 2
    dec2 = rank < max(out_k, in_n) / 2
    return (out_l, in_m), (out_k, in_n), dec1, dec2


def _factor(rng, shape, rank, decompose, zero_side, prefix) -> dict:
    """One Kronecker factor: whole, or ``_a @ _b``; ``zero_side`` (None, "whole", "a", "b")
    picks what starts at zero, everything else is Kaiming-uniform (fan_in = second dim)."""
    rows, cols = shape
    if not decompose:
        parts = {prefix: ((rows, cols), "whole")}
    else:
        parts = {prefix + "_a": ((rows, rank), "a"), prefix + "_b": ((rank, cols), "b")}
    out = {}
    for i, (name, (shp, side)) in enumerate(parts.items()):
        if side == zero_side:
            out[name] = jnp.zeros(shp, jnp.float32)
        else:
            out[name] = ws.kaiming_uniform(jax.random.fold_in(rng, i), shp, shp[1])
    return out


def lokr_factors(rng, d_in, d_out, *, rank, decompose_both, factor, init) -> dict:
    """One kernel's PEFT-named factors, initialised so that ``ΔW = 0`` (module docstring)."""
    s1, s2, dec1, dec2 = lokr_shapes(
        d_in, d_out, rank=rank, decompose_both=decompose_both, factor=factor
    )
    k1, k2 = jax.random.split(rng)
    z1 = ("a" if dec1 else "whole") if init == "peft" else None
    z2 = ("b" if dec2 else "whole") if init == "lycoris" else None
    return {
        **_factor(k1, s1, rank, dec1, z1, "lokr_w1"),
        **_factor(k2, s2, rank, dec2, z2, "lokr_w2"),
    }


def lokr_delta(f: dict, scale: float) -> jax.Array:
    """``ΔW = scale·(C ⊗ W2)ᵀ`` as an ``(in, out)`` matrix."""
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return scale * jnp.kron(w1, w2).T


@register(
    "lokr",
    info=Info(
        "low-rank",
        "`ΔW = (α/r)·C ⊗ (B A)`, PEFT's factorisation of the shapes",
        "2309.14859",
    ),
    defaults=Defaults(lr=1e-3, head_lr=1e-2, kwargs=dict(rank=8, alpha=16.0), step_cost=0.5),
)
def lokr(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    decompose_both: bool = False,
    decompose_factor: int = -1,
    init: str = "peft",
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    layout: tuple[tuple[str, int], ...] = ws.VIT_LAYOUT,
) -> Method:
    """LoKr on the kernels matched by ``targets`` (module docstring).

    Defaults: rank 8 as PEFT's ``LoKrConfig``; α = 16 (PEFT's default is α = r = 8) and lr 1e-3
    as the library's LoRA and LoHa, the same update scale α/r = 2.

    Args:
      rank: ``r`` of the decomposed Kronecker factor(s).
      alpha: the update is scaled by ``alpha / rank``.
      decompose_both: also decompose ``C`` when ``rank < max(l, m)/2`` (PEFT's option).
      decompose_factor: :func:`factorization`'s ``factor`` (-1: near the square root).
      init: ``"peft"`` (``C`` zero) or ``"lycoris"`` (``W2`` zero).
      targets: regexes over ``/``-joined param paths naming the kernels to adapt.
      layout: ``(regex, n_in)`` rules giving the 2-D ``(in, out)`` view of kernels of more than 2
        dimensions (:func:`weight_space.matrix_shape`).

    Raises:
      ValueError: ``rank < 1``, ``alpha <= 0``, ``init`` not in :data:`INITS`, or
        ``decompose_factor`` neither -1 nor positive; at init, a regex matching nothing or a
        target that is not a kernel.

    >>> m = lokr(rank=8, alpha=16.0)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    if rank < 1:
        raise ValueError(f"lokr.rank: must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"lokr.alpha: must be > 0, got {alpha}")
    if init not in INITS:
        raise ValueError(f"lokr.init: {init!r} not in {list(INITS)}")
    if decompose_factor != -1 and decompose_factor < 1:
        raise ValueError(f"lokr.decompose_factor: must be -1 or >= 1, got {decompose_factor}")
    scale = alpha / rank
    opts = dict(rank=rank, decompose_both=decompose_both, factor=decompose_factor)

    def init_fn(rng, params):
        facs = {}
        for i, p in enumerate(ws.target_paths(params, targets, field="lokr.targets")):
            d_in, d_out = ws.matrix_shape(p, paths.get(params, p).shape, layout)
            k = jax.random.fold_in(rng, i)
            facs[ws.key(p)] = lokr_factors(k, d_in, d_out, init=init, **opts)
        return {"head": params["head"], GROUP: facs}

    def merge(params, trainable):
        deltas = {ws.path_of(k): lokr_delta(f, scale) for k, f in trainable[GROUP].items()}
        return ws.add_deltas(params, deltas, trainable["head"])

    hp = dict(
        rank=rank,
        alpha=alpha,
        decompose_both=decompose_both,
        decompose_factor=decompose_factor,
        init=init,
        targets=list(targets),
        layout=[list(r) for r in layout],
    )
    return ws.method(GROUP, init=init_fn, merge=merge, hparams=hp)
