"""OFT (Qiu et al., arXiv:2306.07280) and BOFT (Liu et al., arXiv:2311.06243): orthogonal
rotations of the input side of frozen kernels, folded into the weights (``apply`` is ``merge``).

Both follow Hugging Face PEFT 0.17.1 (``OFTConfig`` / ``BOFTConfig`` and their layers) field by
field, so an adapter maps onto a PEFT one. Orientation: a PyTorch ``Linear`` weight is
``W (out, in)`` and PEFT merges ``W'ᵀ = R W0ᵀ`` with ``R (in, in)`` acting on the input features
(its forward is ``x ↦ (x R) W0ᵀ``); a Flax kernel is ``K = Wᵀ (in, out)``, so here ``K' = R K0``
with the same ``R``, and the trainable arrays keep PEFT's names and shapes (no transpose on
export). Kernels of more than 2 dimensions are rotated in their ``(in, out)`` view given by
``layout`` (:func:`weight_space.matrix_shape`); the rotation is computed in float32.

**OFT**: ``R = diag(R_1, …, R_r)``, ``r`` blocks of size ``b = in / r`` (give exactly one of
``r`` and ``oft_block_size``, as PEFT), each ``R_i`` the Cayley transform of a skew-symmetric
``S_i = U − Uᵀ`` whose strict upper triangle ``U`` holds the ``b(b−1)/2`` trainable numbers in
row-major ``triu_indices`` order: ``oft_R`` ``(r, b(b−1)/2)`` per kernel, zero at init, so
``R = I``. PEFT's exact Cayley (``use_cayley_neumann=False``) is ``solve(I + S, I − S,
left=False)`` = ``(I − S)(I + S)⁻¹``: the paper's ``(I + S)(I − S)⁻¹`` of ``−S``. PEFT's
``use_cayley_neumann=True`` is the truncated series ``I + 2 Σ_{k=1}^{n−1} Sᵏ`` (``n =
num_cayley_neumann_terms``), which approximates ``(I + S)(I − S)⁻¹``, i.e. the *transpose* of the
exact path's ``R`` for the same ``S``, and is orthogonal only up to ``O(Sⁿ)``; each path is
reproduced as PEFT computes it. ``block_share``: one ``S`` for every block (``oft_R`` ``(1,
b(b−1)/2)``). ``coft`` (constrained OFT): each block's ``S_i`` is projected onto the Frobenius ball
of radius ``eps/√(number of blocks)`` (PEFT's ``_project_batch``); PEFT projects the stored
weight in place without gradient at every forward, which here is a straight-through projection
in ``merge`` plus a ``MethodHooks.step`` that stores the projected weight after each update.
Differences from PEFT: ``use_cayley_neumann`` defaults to False here (PEFT's config default is
True) so ``R`` is orthogonal to float32 rounding; a block size that does not divide the input
features is an error (PEFT adjusts it with a warning); ``module_dropout`` > 0 is refused.

**BOFT**: ``R = B_m ⋯ B_1`` (``m = boft_n_butterfly_factor``), ``B_i = P_i D_i P_iᵀ`` with ``D_i``
block-diagonal of ``boft_block_num`` orthogonal ``b × b`` blocks (``b = boft_block_size``; give
exactly one of the two) and ``P_i`` PEFT's block butterfly permutation (:func:`butterfly_perm`;
``P_1 = I``); each block is PEFT's ``cayley_batch`` of a full trainable ``b × b`` matrix ``A``:
``S = (A − Aᵀ)/2``, ``(I − S)(I + S)⁻¹``. Then PEFT's trainable output scale ``boft_s (out, 1)``
(init 1) multiplies the output units: ``K' = (R K0) · diag(s)``. Trainable per kernel:
``boft_R`` ``(m, boft_block_num, b, b)`` (zero at init, so ``R = I``) and ``boft_s``. Differences
from PEFT: ``boft_dropout`` > 0 is refused; PEFT silently runs ``boft_n_butterfly_factor=1``
when its CUDA extension fails to build, here the factor is always the one asked for.

Default targets as LoRA's: the attention query and value kernels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, register


@functools.partial(jax.jit, static_argnames="block_size")
def skew(vec: jax.Array, block_size: int) -> jax.Array:
    """``U − Uᵀ`` with the strict upper triangle ``U`` filled row-major from ``vec (..., n)``."""
    rows, cols = np.triu_indices(block_size, 1)
    u = jnp.zeros((*vec.shape[:-1], block_size, block_size), vec.dtype).at[..., rows, cols].set(vec)
    return u - jnp.swapaxes(u, -1, -2)


@functools.partial(jax.jit, static_argnames="neumann_terms")
def cayley(s: jax.Array, *, neumann_terms: int = 0) -> jax.Array:
    """PEFT's Cayley transform of skew-symmetric ``s (..., b, b)``, in float32.

    ``neumann_terms == 0``: the exact ``(I − S)(I + S)⁻¹`` (one ``jnp.linalg.solve``; the two
    factors commute, so it is ``(I + S)⁻¹ (I − S)``). ``neumann_terms = n > 0``: PEFT's series
    ``I + 2 Σ_{k=1}^{n−1} Sᵏ``.
    """
    s = s.astype(jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(s.shape[-1], dtype=jnp.float32), s.shape)
    if neumann_terms == 0:
        return jnp.linalg.solve(eye + s, eye - s)
    out, power = eye, eye
    for _ in range(1, neumann_terms):
        power = power @ s
        out = out + 2.0 * power
    return out


def cayley_all(skews: list[jax.Array], *, neumann_terms: int = 0) -> list[jax.Array]:
    """:func:`cayley` of several stacks ``(..., b_i, b_i)`` in one batched ``solve``.

    Every block is zero-padded to the largest ``b`` (the Cayley transform of a padded skew matrix
    is the block's transform beside an identity) and all are solved in one call: on XLA:CPU,
    many concurrent batched solves in one program (one per adapted kernel) can deadlock the
    runtime's thread pool (seen with 24 kernels of 12 blocks of 32 × 32), one call cannot.
    """
    if neumann_terms or not skews:
        return [cayley(x, neumann_terms=neumann_terms) for x in skews]
    big = max(x.shape[-1] for x in skews)
    flat = [x.reshape(-1, x.shape[-1], x.shape[-1]) for x in skews]
    pad = [jnp.pad(x, ((0, 0), (0, big - x.shape[-1]), (0, big - x.shape[-1]))) for x in flat]
    rot = cayley(jnp.concatenate(pad))
    out, start = [], 0
    for x, f in zip(skews, flat, strict=True):
        b = x.shape[-1]
        out.append(rot[start : start + f.shape[0], :b, :b].reshape(x.shape))
        start += f.shape[0]
    return out


def rotate_blocks(blocks: jax.Array, w: jax.Array) -> jax.Array:
    """``diag(blocks) @ w`` for ``blocks (n, b, b)`` and ``w (n·b, out)`` without the dense
    ``(n·b, n·b)`` matrix; ``n == 1`` with more rows shares the one block (``block_share``)."""
    b = blocks.shape[-1]
    y = w.reshape(-1, b, w.shape[-1])
    return jnp.einsum("nkc,nco->nko", blocks, y).reshape(w.shape)


@functools.partial(jax.jit, static_argnames=("block_size", "eps"))
def coft_project(vec: jax.Array, block_size: int, eps: float) -> jax.Array:
    """PEFT's COFT projection: each ``S_i`` with ``‖S_i‖_F > eps/√n`` is rescaled onto that
    sphere (``n`` blocks stored, ``vec (n, b(b−1)/2)``)."""
    radius = eps / math.sqrt(vec.shape[0])
    norm = jnp.linalg.norm(skew(vec, block_size), axis=(-2, -1))[:, None]
    return jnp.where(norm <= radius, vec, radius * vec / jnp.maximum(norm, radius))


def block_size_of(vec: jax.Array) -> int:
    """The block size ``b`` of skew entries ``vec (..., b(b−1)/2)``."""
    return int(round((1 + math.sqrt(1 + 8 * vec.shape[-1])) / 2))


def oft_skew(vec: jax.Array, *, coft: bool, eps: float) -> jax.Array:
    """The ``(n, b, b)`` skew matrices of one kernel's ``oft_R (n, b(b−1)/2)``; with ``coft`` the
    value of the projected entries and the gradient of the identity, as PEFT's in-place no-grad
    projection before each forward."""
    b = block_size_of(vec)
    if coft:
        vec = vec + jax.lax.stop_gradient(coft_project(vec, b, eps) - vec)
    return skew(vec, b)


def oft_rotations(vec: jax.Array, *, coft: bool, eps: float, neumann_terms: int) -> jax.Array:
    """The ``(n, b, b)`` OFT blocks of one kernel's ``oft_R`` (:func:`oft_skew`, Cayley)."""
    return cayley(oft_skew(vec, coft=coft, eps=eps), neumann_terms=neumann_terms)


def coft_step(eps: float):
    """``MethodHooks.step`` storing every kernel's projected ``oft_R`` after the update."""

    def step(info):
        tr = info.trainable
        proj = {k: {"oft_R": coft_project(f["oft_R"], block_size_of(f["oft_R"]), eps)}
                for k, f in tr["oft"].items()}  # fmt: skip
        return {**tr, "oft": proj}, info.opt_state, info.state

    return step


def exactly_one(n: int, size: int, *, name: tuple[str, str]) -> None:
    """PEFT's rule: exactly one of a block count and a block size is > 0 (the other is 0)."""
    if (n != 0) == (size != 0) or n < 0 or size < 0:
        raise ValueError(f"{name[0]}, {name[1]}: give exactly one of them > 0, got {n} and {size}")


def split_blocks(d_in: int, n: int, size: int, *, name: tuple[str, str]) -> tuple[int, int]:
    """``(number of blocks, block size)`` of a ``d_in`` side from exactly one nonzero of ``n`` and
    ``size``; ValueError naming the fields otherwise or when it does not divide ``d_in``."""
    exactly_one(n, size, name=name)
    field, v = (name[0], n) if n else (name[1], size)
    if d_in % v:
        raise ValueError(f"{field}: {v} does not divide the {d_in} input features")
    return (v, d_in // v) if n else (d_in // v, v)


def _dims(params, tps, layout) -> dict[str, tuple[int, int]]:
    return {p: ws.matrix_shape(p, paths.get(params, p).shape, layout) for p in tps}


def _f32_matrix(params, path: str, layout) -> jax.Array:
    k = paths.get(params, path)
    return k.reshape(ws.matrix_shape(path, k.shape, layout)).astype(jnp.float32)


def _no_dropout(value: float, field: str) -> None:
    if value != 0.0:
        raise ValueError(f"{field}: multiplicative block dropout is not implemented; allowed: 0.0")


@register(
    "oft",
    info=Info(
        "orthogonal",
        "a block-diagonal rotation of each kernel's input side, Cayley blocks",
        "2306.07280",
    ),
    defaults=Defaults(lr=1e-3, head_lr=1e-2, kwargs=dict(oft_block_size=32), step_cost=0.5),
)
def oft(
    *,
    r: int = 0,
    oft_block_size: int = 32,
    block_share: bool = False,
    coft: bool = False,
    eps: float = 6e-5,
    use_cayley_neumann: bool = False,
    num_cayley_neumann_terms: int = 5,
    module_dropout: float = 0.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    layout: tuple[tuple[str, int], ...] = ws.VIT_LAYOUT,
) -> Method:
    """OFT on the kernels matched by ``targets``: ``K' = diag(R_1, …, R_r) K0`` (module docstring).

    Defaults: PEFT's ``oft_block_size=32`` (so 24 blocks on a 768-wide input), exact Cayley
    (PEFT's default is the 5-term Neumann series, orthogonal only approximately), lr 1e-3 as the
    library's LoRA: the skew entries start at zero and an AdamW step moves each by about lr, a
    small rotation. Count per ``(in, out)`` kernel: ``(in/b)·b(b−1)/2`` (``b(b−1)/2`` with
    ``block_share``); ViT-B/16, b = 32, query and value: ``24 · 24 · 496 = 285,696``.

    Args:
      r: number of blocks per kernel (PEFT's ``r``); 0 to give ``oft_block_size`` instead.
      oft_block_size: block size ``b``; 0 to give ``r`` instead.
      block_share: one skew matrix shared by all blocks of a kernel.
      coft: constrained OFT, ``‖S_i‖_F ≤ eps/√(blocks)``.
      eps: COFT's radius (used only with ``coft``).
      use_cayley_neumann: PEFT's truncated Neumann series instead of the exact inverse.
      num_cayley_neumann_terms: terms of that series (>= 1).
      module_dropout: PEFT's multiplicative block dropout; only 0.0 is implemented.
      targets: regexes over ``/``-joined param paths naming the kernels to rotate.
      layout: ``(regex, n_in)`` rules for the ``(in, out)`` view of kernels of more than 2 dims.

    Raises:
      ValueError: not exactly one of ``r``/``oft_block_size`` > 0, ``eps <= 0``, fewer than one
        Neumann term, ``module_dropout != 0``; at init, a block count or size that does not
        divide a target's input features, a regex matching nothing or a non-kernel target.

    >>> m = oft(oft_block_size=32)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    names = ("oft.r", "oft.oft_block_size")
    exactly_one(r, oft_block_size, name=names)
    if eps <= 0:
        raise ValueError(f"oft.eps: must be > 0, got {eps}")
    if num_cayley_neumann_terms < 1:
        n = num_cayley_neumann_terms
        raise ValueError(f"oft.num_cayley_neumann_terms: must be >= 1, got {n}")
    _no_dropout(module_dropout, "oft.module_dropout")
    terms = num_cayley_neumann_terms if use_cayley_neumann else 0

    def init(rng, params):
        del rng
        tps = ws.target_paths(params, targets, field="oft.targets")
        out = {}
        for p, (d_in, _) in _dims(params, tps, layout).items():
            n, b = split_blocks(d_in, r, oft_block_size, name=names)
            out[ws.key(p)] = {"oft_R": jnp.zeros((1 if block_share else n, b * (b - 1) // 2))}
        return {"head": params["head"], "oft": out}

    def merge(params, trainable):
        keys = list(trainable["oft"])
        skews = [oft_skew(trainable["oft"][k]["oft_R"], coft=coft, eps=eps) for k in keys]
        kernels = {}
        for k, rot in zip(keys, cayley_all(skews, neumann_terms=terms), strict=True):
            p = ws.path_of(k)
            kernels[p] = rotate_blocks(rot, _f32_matrix(params, p, layout))
        return ws.replace_kernels(params, kernels, trainable["head"])

    hp = dict(
        r=r, oft_block_size=oft_block_size, block_share=block_share, coft=coft, eps=eps,
        use_cayley_neumann=use_cayley_neumann, num_cayley_neumann_terms=num_cayley_neumann_terms,
        module_dropout=module_dropout, targets=list(targets), layout=[list(x) for x in layout],
    )  # fmt: skip
    hooks = MethodHooks(step=coft_step(eps)) if coft else None
    return ws.method("oft", init=init, merge=merge, hparams=hp, hooks=hooks)


def butterfly_perm(n: int, *, block_num: int, block_size: int, index: int, factors: int):
    """PEFT's ``block_butterfly_perm`` for butterfly factor ``index`` (0-based) of ``factors``.

    With one factor it is the identity. Otherwise the ``n`` features form groups of
    ``g = n / (block_num / 2^index)``; each group is cut into chunks of ``block_size / 2`` and
    its even-numbered chunks are placed before its odd-numbered ones (factor 0: the identity).
    ``P[i, perm[i]] = 1``, so ``(P x)[i] = x[perm[i]]``.
    """
    if factors == 1:
        return np.arange(n)
    g, half = n // (block_num // 2**index), block_size // 2
    return np.arange(n).reshape(n // g, g // (2 * half), 2, half).transpose(0, 2, 1, 3).reshape(n)


def butterfly_perms(n: int, block_num: int, block_size: int, factors: int) -> np.ndarray:
    """``(factors, n)``: every factor's :func:`butterfly_perm`."""
    kw = dict(block_num=block_num, block_size=block_size, factors=factors)
    return np.stack([butterfly_perm(n, index=i, **kw) for i in range(factors)])


def boft_skew(boft_r: jax.Array) -> jax.Array:
    """PEFT's ``cayley_batch`` skew part ``S = (A − Aᵀ)/2`` of ``boft_r (m, D, b, b)``, float32."""
    a = boft_r.astype(jnp.float32)
    return 0.5 * (a - jnp.swapaxes(a, -1, -2))


def boft_rotate(w: jax.Array, boft_r: jax.Array, q: jax.Array | None = None) -> jax.Array:
    """``B_m ⋯ B_1 w`` with ``B_i = P_i D_i P_iᵀ``, ``D_i`` the Cayley blocks of ``boft_r[i]``
    (``q``: those blocks when already computed), for ``w (in, out)``; float32."""
    m, d, b, _ = boft_r.shape
    q = cayley(boft_skew(boft_r)) if q is None else q
    for i, p in enumerate(butterfly_perms(w.shape[0], d, b, m)):
        if np.array_equal(p, np.arange(p.size)):
            w = rotate_blocks(q[i], w)
        else:  # P (D (Pᵀ w)): Pᵀ w gathers rows by the inverse permutation
            w = rotate_blocks(q[i], w[np.argsort(p)])[p]
    return w


def boft_blocks(d_in: int, block_size: int, block_num: int, factors: int) -> tuple[int, int]:
    """``(boft_block_num, boft_block_size)`` of a ``d_in`` side, with PEFT's butterfly rules."""
    d, b = split_blocks(
        d_in, block_num, block_size, name=("boft.boft_block_num", "boft.boft_block_size")
    )
    if factors > 1 and (b % 2 or d % 2 ** (factors - 1)):
        raise ValueError(
            f"boft.boft_n_butterfly_factor: {factors} factors need an even block size and a "
            f"block count divisible by 2^{factors - 1}; got {d} blocks of {b} on {d_in} inputs"
        )
    return d, b


@register(
    "boft",
    info=Info(
        "orthogonal",
        "a butterfly product of permuted block-diagonal Cayley rotations",
        "2311.06243",
    ),
    defaults=Defaults(
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(boft_block_size=4, boft_n_butterfly_factor=2),
        step_cost=0.55,
    ),
)
def boft(
    *,
    boft_block_size: int = 4,
    boft_block_num: int = 0,
    boft_n_butterfly_factor: int = 1,
    boft_dropout: float = 0.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    layout: tuple[tuple[str, int], ...] = ws.VIT_LAYOUT,
) -> Method:
    """BOFT on the kernels matched by ``targets``: ``K' = (B_m ⋯ B_1 K0)·diag(s)`` (module
    docstring).

    Factory defaults are PEFT's ``BOFTConfig`` (b = 4, one factor: block-diagonal OFT with a
    scale); the registered defaults are PEFT's conceptual-guide example, b = 4 with 2 butterfly
    factors (the smallest setting that is a butterfly), at lr 1e-3 as OFT. Count per ``(in,
    out)`` kernel: ``m·(in/b)·b² + out``; ViT-B/16, b = 4, m = 2, query and value:
    ``24 · (2·192·16 + 768) = 165,888``.

    Args:
      boft_block_size: block size ``b``; 0 to give ``boft_block_num`` instead.
      boft_block_num: blocks per factor; 0 to give ``boft_block_size`` instead.
      boft_n_butterfly_factor: number of butterfly factors ``m`` (>= 1).
      boft_dropout: PEFT's multiplicative block dropout; only 0.0 is implemented.
      targets: regexes over ``/``-joined param paths naming the kernels to rotate.
      layout: ``(regex, n_in)`` rules for the ``(in, out)`` view of kernels of more than 2 dims.

    Raises:
      ValueError: not exactly one of ``boft_block_size``/``boft_block_num`` > 0, ``m < 1``,
        ``boft_dropout != 0``; at init, blocks that do not divide a target's input features or
        do not allow ``m`` butterfly factors, a regex matching nothing or a non-kernel target.

    >>> m = boft(boft_block_size=4, boft_n_butterfly_factor=2)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    exactly_one(
        boft_block_num, boft_block_size, name=("boft.boft_block_num", "boft.boft_block_size")
    )
    if boft_n_butterfly_factor < 1:
        m = boft_n_butterfly_factor
        raise ValueError(f"boft.boft_n_butterfly_factor: must be >= 1, got {m}")
    _no_dropout(boft_dropout, "boft.boft_dropout")
    m = boft_n_butterfly_factor

    def init(rng, params):
        del rng
        tps = ws.target_paths(params, targets, field="boft.targets")
        out = {}
        for p, (d_in, d_out) in _dims(params, tps, layout).items():
            d, b = boft_blocks(d_in, boft_block_size, boft_block_num, m)
            out[ws.key(p)] = {
                "boft_R": jnp.zeros((m, d, b, b), jnp.float32),
                "boft_s": jnp.ones((d_out, 1), jnp.float32),
            }
        return {"head": params["head"], "boft": out}

    def merge(params, trainable):
        keys = list(trainable["boft"])
        rs = [trainable["boft"][k]["boft_R"] for k in keys]
        kernels = {}
        for k, r, q in zip(keys, rs, cayley_all([boft_skew(r) for r in rs]), strict=True):
            p = ws.path_of(k)
            w = boft_rotate(_f32_matrix(params, p, layout), r, q)
            kernels[p] = w * trainable["boft"][k]["boft_s"][:, 0].astype(jnp.float32)
        return ws.replace_kernels(params, kernels, trainable["head"])

    hp = dict(
        boft_block_size=boft_block_size, boft_block_num=boft_block_num,
        boft_n_butterfly_factor=m, boft_dropout=boft_dropout, targets=list(targets),
        layout=[list(x) for x in layout],
    )  # fmt: skip
    return ws.method("boft", init=init, merge=merge, hparams=hp)
