"""Bottleneck adapters through the ViT's interceptor: Adapter, AdaptFormer, Compacter.

- ``adapter`` (Houlsby et al., arXiv:1902.00751): a serial bottleneck on the output of the
  attention sub-layer and of the MLP sub-layer of every block, before its residual add:
  ``y ← y + W_up σ(W_down y + b_down) + b_up`` with ``m = d / reduction`` (8× by default, as in the
  VTAB literature). ``W_down`` is PyTorch's Linear init, ``W_up`` and both biases zero, so the
  model is the pretrained function at init.
- ``adaptformer`` (Chen et al., arXiv:2205.13535): a parallel branch beside every MLP,
  ``x + MLP(LN x) + s·W_up ReLU(W_down LN x + b_down) + b_up`` with ``m = 64``, ``s = 0.1``,
  ``W_up`` zero. ``LN x`` is exactly the ``MlpBlock`` input, so the branch reads it there.
- ``compacter`` (Karimi Mahabadi et al., arXiv:2106.04647): the same serial adapters with
  ``W = Σ_i A_i ⊗ B_i`` (PHM layers, ``n`` terms), ``A_i`` (n×n) shared by every adapter of the
  model (one set for down-, one for up-projections) and ``B_i = s_i t_iᵀ`` of rank ``r``. The
  up-projection's ``t`` is zero (identity at init).

None of them edits the model: :func:`guft_jax.methods.base.forward` activates the interceptor,
which changes ``Attention.__call__`` / ``MlpBlock.__call__`` outputs of the blocks named in the
trainable tree (``trainable[name][block][position]``). Nonlinear adapters cannot be merged
(``merge=None``; the artifact stores the trainable tree). With ``act="identity"`` an adapter is a
linear map after a linear layer, so ``adapter`` and ``compacter`` merge exactly into the
attention ``out`` / MLP ``Dense_1`` kernels and biases: ``W' = W (I + W_d W_u)``,
``b' = b (I + W_d W_u) + b_d W_u + b_u``.

Trainable numbers (ViT-B/16, L = 12, d = 768): ``adapter`` ``2L(2dm + m + d)`` = 3,559,680 at
m = 96; ``adaptformer`` ``L(2dm + m + d)`` = 1,189,632 at m = 64; ``compacter`` (n = 4, r = 1,
m = 96) ``2n³ + 2L(2r(d + m) + m + d)`` = 62,336.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, register
from guft_jax.vit import Attention, MlpBlock, kernel_as_matrix

POSITIONS = ("attn", "mlp")
# the linear layer whose output each position's adapter reads (where a linear adapter merges)
_MERGE_TARGET = {"attn": "MultiHeadDotProductAttention_1/out", "mlp": "MlpBlock_3/Dense_1"}
ACTIVATIONS: dict[str, Callable] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "identity": lambda x: x,
}


# ------------------------------------------------------------------------------ model layout


def encoder_blocks(params: Any) -> list[str]:
    """Names of the encoder blocks in ``params["Transformer"]``, in depth order.

    Raises:
      ValueError: ``params`` holds no ``Transformer/encoderblock_{i}``.
    """
    names = [k for k in params.get("Transformer", {}) if re.fullmatch(r"encoderblock_\d+", k)]
    if not names:
        raise ValueError("params: no Transformer/encoderblock_{i} (not a guft_jax ViT tree)")
    return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))


def width(params: Any) -> int:
    """The hidden size ``d`` (the embedding's output width)."""
    return int(params["embedding"]["kernel"].shape[-1])


def encoder_block_of(context) -> str | None:
    """The ``encoderblock_{i}`` an intercepted call belongs to (None outside the blocks)."""
    for name in reversed(tuple(context.module.path)):
        if name.startswith("encoderblock_"):
            return name
    return None


def position_of(context) -> str | None:
    """``"attn"`` / ``"mlp"`` for a whole attention / MLP sub-layer call, else None."""
    if context.method_name != "__call__":
        return None
    if isinstance(context.module, Attention):
        return "attn"
    if isinstance(context.module, MlpBlock):
        return "mlp"
    return None


def check_positions(positions, field: str) -> tuple[str, ...]:
    positions = tuple(positions)
    bad = [p for p in positions if p not in POSITIONS]
    if bad or not positions or len(set(positions)) != len(positions):
        raise ValueError(f"{field}: {list(positions)} must be distinct entries of {POSITIONS}")
    return positions


def check_act(act: str, field: str) -> Callable:
    if act not in ACTIVATIONS:
        raise ValueError(f"{field}: {act!r} not in {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def bottleneck_size(d: int, reduction: float | None, bottleneck: int | None, field: str) -> int:
    """``bottleneck`` if given, else ``d // reduction``; at least 1."""
    m = int(bottleneck) if bottleneck is not None else int(d // reduction)
    if m < 1:
        raise ValueError(f"{field}: bottleneck {m} < 1 for width {d}")
    return m


# ------------------------------------------------------------------------------ dense bottleneck


def bottleneck_init(rng: jax.Array, d: int, m: int) -> dict:
    """``{"down": {kernel (d, m), bias}, "up": {kernel (m, d), bias}}``: down PyTorch's Linear
    init (U(±1/√d)), up and biases zero (the adapter outputs 0 at init)."""
    return {
        "down": {"kernel": ws.kaiming_uniform(rng, (d, m), d), "bias": jnp.zeros((m,))},
        "up": {"kernel": jnp.zeros((m, d)), "bias": jnp.zeros((d,))},
    }


def bottleneck_apply(x: jax.Array, w: tuple, act: Callable) -> jax.Array:
    """``act(x W_d + b_d) W_u + b_u`` with ``w = (W_d, b_d, W_u, b_u)`` (computed in x's dtype)."""
    wd, bd, wu, bu = (a.astype(x.dtype) for a in w)
    return act(x @ wd + bd) @ wu + bu


def dense_weights(f: dict) -> tuple:
    return f["down"]["kernel"], f["down"]["bias"], f["up"]["kernel"], f["up"]["bias"]


# ------------------------------------------------------------------------------ Kronecker sums


def kron_sum(a: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
    """``Σ_i A_i ⊗ (s_i t_i)`` for ``A`` (n, n, n), ``s`` (n, p, r), ``t`` (n, r, q): an
    ``(n·p, n·q)`` matrix (PHM layer weight, Compacter eq. 3-4)."""
    b = jnp.einsum("npr,nrq->npq", s, t)
    w = jnp.einsum("nab,ncd->acbd", a, b)
    return w.reshape(a.shape[1] * s.shape[1], a.shape[2] * t.shape[2])


def _compacter_factor(rng, n, rows, cols, rank, zero_t):
    # Variance-matched to PyTorch's Linear init: var(W) = n·var(A)·r·var(s)·var(t) = 1/(3·in)
    # with var(A) = 1/n and var(s) = var(t) = (3·in·r)^(-1/2).
    std = (3.0 * n * rows * rank) ** -0.25
    ks, kt = jax.random.split(rng)
    s = std * jax.random.normal(ks, (n, rows, rank))
    t = jnp.zeros((n, rank, cols)) if zero_t else std * jax.random.normal(kt, (n, rank, cols))
    return {"s": s, "t": t}


def compacter_weights(shared: dict, f: dict) -> tuple:
    return (
        kron_sum(shared["down"], f["down"]["s"], f["down"]["t"]),
        f["down"]["bias"],
        kron_sum(shared["up"], f["up"]["s"], f["up"]["t"]),
        f["up"]["bias"],
    )


# ------------------------------------------------------------------------------ method plumbing


def serial_interceptor(weights: dict, act: Callable) -> Callable:
    """Adds ``bottleneck(y)`` to the output ``y`` of each sub-layer listed in
    ``weights[block][position] = (W_d, b_d, W_u, b_u)``."""

    def icpt(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        pos = position_of(context)
        w = weights.get(encoder_block_of(context), {}).get(pos) if pos else None
        return out if w is None else out + bottleneck_apply(out, w, act)

    return icpt


def merge_linear(params: Any, weights: dict, head: Any) -> dict:
    """Linear serial adapters folded into the layer they follow (``act="identity"`` only)."""
    upd = {}
    for block, per in weights.items():
        for pos, (wd, bd, wu, bu) in per.items():
            base = f"Transformer/{block}/{_MERGE_TARGET[pos]}"
            k, b = paths.get(params, base + "/kernel"), paths.get(params, base + "/bias")
            w = kernel_as_matrix(k, base + "/kernel")
            m = jnp.eye(w.shape[1], dtype=w.dtype) + wd @ wu
            upd[base + "/kernel"] = (w @ m).reshape(k.shape).astype(k.dtype)
            upd[base + "/bias"] = (b.reshape(-1) @ m + bd @ wu + bu).reshape(b.shape)
    return {**paths.replaced(params, upd), "head": head}


def head_only_apply(params, trainable, state=None, rng=None) -> dict:
    """``apply`` of an additive method: the frozen params with the task head (the rest happens in
    the interceptor)."""
    del state, rng
    return {"params": {**params, "head": trainable["head"]}}


def _serial_method(name, *, init, weights_of, act, act_name, hparams) -> Method:
    def intercept(trainable, state=None, rng=None):
        del state, rng
        return serial_interceptor(weights_of(trainable), act)

    merge = None
    if act_name == "identity":

        def merge(params, trainable, state=None):
            del state
            return merge_linear(params, weights_of(trainable), trainable["head"])

    return Method(
        name=name,
        init=init,
        apply=head_only_apply,
        hparams=hparams,
        merge=merge,
        hooks=MethodHooks(intercept=intercept),
    )


# ------------------------------------------------------------------------------ the methods


@register(
    "adapter",
    info=Info(
        "activation", "Houlsby bottleneck after attention and MLP, zero up-projection", "1902.00751"
    ),
    defaults=Defaults(
        # NOAH's VTAB-1K protocol for every baseline (Zhang et al., arXiv:2206.04673): AdamW,
        # lr 1e-3, wd 1e-4; reduction 8 is the VPT/NOAH "Adapter-8" row.
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(reduction=8),
        step_cost=0.55,
    ),
)
def adapter(
    *,
    reduction: float = 8,
    bottleneck: int | None = None,
    positions: tuple[str, ...] = POSITIONS,
    act: str = "gelu",
) -> Method:
    """Houlsby serial adapters after attention and MLP (``positions``), bottleneck
    ``d // reduction`` (or ``bottleneck``). ``act="identity"`` gives mergeable linear adapters.

    >>> m = adapter(reduction=8)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    positions = check_positions(positions, "adapter.positions")
    fn = check_act(act, "adapter.act")

    def init(rng, params):
        d = width(params)
        m = bottleneck_size(d, reduction, bottleneck, "adapter.bottleneck")
        out = {}
        for i, blk in enumerate(encoder_blocks(params)):
            out[blk] = {
                pos: bottleneck_init(jax.random.fold_in(rng, 2 * i + j), d, m)
                for j, pos in enumerate(positions)
            }
        return {"head": params["head"], "adapter": out}

    def weights_of(trainable):
        return {
            b: {p: dense_weights(f) for p, f in per.items()}
            for b, per in trainable["adapter"].items()
        }

    hp = dict(reduction=reduction, bottleneck=bottleneck, positions=list(positions), act=act)
    return _serial_method(
        "adapter", init=init, weights_of=weights_of, act=fn, act_name=act, hparams=hp
    )


@register(
    "adaptformer",
    info=Info(
        "activation",
        "parallel scaled bottleneck MLP branch",
        "2205.13535",
    ),
    defaults=Defaults(
        lr=1e-3,  # NOAH's VTAB-1K protocol (AdamW 1e-3); the paper's m = 64, s = 0.1
        head_lr=1e-2,
        kwargs=dict(bottleneck=64, scale=0.1),
        dry_kwargs=dict(bottleneck=8),
        step_cost=0.5,
    ),
)
def adaptformer(*, bottleneck: int = 64, scale: float = 0.1) -> Method:
    """AdaptFormer's parallel MLP branch ``s·up(ReLU(down(LN x)))`` in every block."""
    if bottleneck < 1:
        raise ValueError(f"adaptformer.bottleneck: must be >= 1, got {bottleneck}")

    def init(rng, params):
        d = width(params)
        out = {
            blk: bottleneck_init(jax.random.fold_in(rng, i), d, bottleneck)
            for i, blk in enumerate(encoder_blocks(params))
        }
        return {"head": params["head"], "adaptformer": out}

    def intercept(trainable, state=None, rng=None):
        del state, rng
        branches = {b: dense_weights(f) for b, f in trainable["adaptformer"].items()}

        def icpt(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            w = branches.get(encoder_block_of(context)) if position_of(context) == "mlp" else None
            if w is None:
                return out
            return out + scale * bottleneck_apply(args[0], w, jax.nn.relu).astype(out.dtype)

        return icpt

    return Method(
        name="adaptformer",
        init=init,
        apply=head_only_apply,
        hparams=dict(bottleneck=bottleneck, scale=scale),
        merge=None,
        hooks=MethodHooks(intercept=intercept),
    )


@register(
    "compacter",
    info=Info(
        "activation", "adapters whose weights are Kronecker sums `Σ A_i ⊗ B_i`", "2106.04647"
    ),
    defaults=Defaults(
        lr=1e-3,  # NOAH's protocol; n = 4, rank 1 as in the Compacter paper
        head_lr=1e-2,
        kwargs=dict(reduction=8, n=4, rank=1),
        # each weight is a product of three small factors (A, s, t): the grid reaches higher
        lr_grid=(0.3, 1.0, 3.0, 10.0),
        dry_kwargs=dict(n=2),
        step_cost=0.55,
    ),
)
def compacter(
    *,
    reduction: float = 8,
    bottleneck: int | None = None,
    n: int = 4,
    rank: int = 1,
    positions: tuple[str, ...] = POSITIONS,
    act: str = "gelu",
) -> Method:
    """Compacter adapters (PHM weights ``Σ A_i ⊗ s_i t_iᵀ``, ``A_i`` shared across layers).
    ``act="identity"`` makes them linear and mergeable.

    Raises:
      ValueError: ``n`` does not divide both ``d`` and the bottleneck, or ``rank < 1``.
    """
    positions = check_positions(positions, "compacter.positions")
    fn = check_act(act, "compacter.act")
    if n < 1 or rank < 1:
        raise ValueError(f"compacter: n and rank must be >= 1, got n={n}, rank={rank}")

    def init(rng, params):
        d = width(params)
        m = bottleneck_size(d, reduction, bottleneck, "compacter.bottleneck")
        if d % n or m % n:
            raise ValueError(f"compacter.n: {n} must divide the width {d} and bottleneck {m}")
        ka, kb = jax.random.split(rng)
        shared = {
            pos: jax.random.normal(jax.random.fold_in(ka, j), (n, n, n)) / math.sqrt(n)
            for j, pos in enumerate(("down", "up"))
        }
        out: dict = {"shared": shared}
        for i, blk in enumerate(encoder_blocks(params)):
            out[blk] = {}
            for j, pos in enumerate(positions):
                k1, k2 = jax.random.split(jax.random.fold_in(kb, 2 * i + j))
                out[blk][pos] = {
                    "down": {
                        **_compacter_factor(k1, n, d // n, m // n, rank, zero_t=False),
                        "bias": jnp.zeros((m,)),
                    },
                    "up": {
                        **_compacter_factor(k2, n, m // n, d // n, rank, zero_t=True),
                        "bias": jnp.zeros((d,)),
                    },
                }
        return {"head": params["head"], "compacter": out}

    def weights_of(trainable):
        tree = trainable["compacter"]
        return {
            b: {p: compacter_weights(tree["shared"], f) for p, f in per.items()}
            for b, per in tree.items()
            if b != "shared"
        }

    hp = dict(
        reduction=reduction,
        bottleneck=bottleneck,
        n=n,
        rank=rank,
        positions=list(positions),
        act=act,
    )
    return _serial_method(
        "compacter", init=init, weights_of=weights_of, act=fn, act_name=act, hparams=hp
    )
