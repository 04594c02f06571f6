"""UniPELT-style gated hybrid (Mao et al., arXiv:2110.07577): LoRA, prefix tuning and
an adapter in every block, each behind its own learned sigmoid gate.

Per block, with ``G(z) = mean_tokens σ(z W_G + b_G)`` (one value per example, the gate of the
AdapterHub implementation of UniPELT):

- LoRA on the query and value projections: ``h = x W0 + G_L(x)·(α/r)·x Aᵀ Bᵀ`` (``B = 0`` at
  init; ``x`` is the attention input, one gate per adapted projection);
- prefix: keys/values ``[G_P,k(x)·P_k; K]`` and ``[G_P,v(x)·P_v; V]`` with ``G_P`` read from the
  attention input ``x`` (two outputs: key and value gates);
- adapter after the MLP (Pfeiffer placement, as UniPELT): ``y + G_A(y)·up(ReLU(down(y)))`` with
  ``y`` the MLP output, bottleneck ``d // reduction`` (16×), up-projection zero.

Gates start at σ(0)-ish ≈ 0.5 (kernels N(0, 0.02²), biases 0). The LoRA and adapter branches
contribute exactly zero at init; the prefix branch does not (as in UniPELT, prefixes take
attention mass from the start), so with ``prefix_tokens > 0`` the model is not the pretrained
function at init; ``prefix_tokens=0`` drops that branch and restores identity at init. Gates
depend on the input, so nothing merges into plain ViT params (``merge=None``).

Trainable numbers (ViT-B/16, L = 12, d = 768, r = 8, p = 10, m = 48): LoRA ``2L·r·2d`` +
gates ``2L(d + 1)``; prefix ``2Lpd`` + gates ``L(2d + 2)``; adapter ``L(2dm + m + d)`` + gates
``L(d + 1)``: 1,419,900 in all.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods import lora as lora_lib
from guft_jax.methods import weight_space as ws
from guft_jax.methods.adapters import (
    bottleneck_apply,
    bottleneck_init,
    bottleneck_size,
    dense_weights,
    encoder_block_of,
    encoder_blocks,
    head_only_apply,
    position_of,
    width,
)
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, register
from guft_jax.methods.hparams import as_json
from guft_jax.methods.prompts import is_attend, prefix_init, with_prefix
from guft_jax.vit import Linear

GATE_STD = 0.02


def gate_init(rng: jax.Array, d: int, outputs: int = 1) -> dict:
    """A gate's ``{"kernel": (d, outputs) N(0, 0.02²), "bias": zeros}``."""
    return {
        "kernel": GATE_STD * jax.random.normal(rng, (d, outputs)),
        "bias": jnp.zeros((outputs,)),
    }


def gate(z: jax.Array, g: dict) -> jax.Array:
    """``mean over tokens of σ(z W + b)``: ``(B, outputs)`` for ``z`` (B, T, d), in float32."""
    logits = z.astype(jnp.float32) @ g["kernel"] + g["bias"]
    return jnp.mean(jax.nn.sigmoid(logits), axis=-2)


class UniPELTHparams(NamedTuple):
    """The hyperparameters of :func:`unipelt` (validated)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    prefix_tokens: int
    prefix_init_std: float
    reduction: float
    bottleneck: int | None


def _check(hp: UniPELTHparams) -> None:
    """Raises ValueError naming the first hyperparameter out of range."""
    if hp.rank < 1:
        raise ValueError(f"unipelt.rank: must be >= 1, got {hp.rank}")
    if hp.alpha <= 0:
        raise ValueError(f"unipelt.alpha: must be > 0, got {hp.alpha}")
    if hp.prefix_tokens < 0:
        raise ValueError(f"unipelt.prefix_tokens: must be >= 0, got {hp.prefix_tokens}")


def _gated_lora(params, tps: list[str], rank: int, k_lora, k_gate) -> dict:
    """LoRA factors (Kaiming ``A``, zero ``B``) and a gate per target kernel."""
    out = {}
    for i, p in enumerate(tps):
        d_in, d_out = ws.matrix(params, p).shape
        k = jax.random.fold_in(k_lora, i)
        out[ws.key(p)] = {
            **lora_lib.lora_factor(k, d_in, d_out, rank=rank, init="kaiming"),
            "gate": gate_init(jax.random.fold_in(k_gate, i), d_in),
        }
    return out


def _init(hp: UniPELTHparams, rng, params):
    d = width(params)
    m = bottleneck_size(d, hp.reduction, hp.bottleneck, "unipelt.bottleneck")
    k_lora, k_lg, k_pre, k_pg, k_ad, k_ag = jax.random.split(rng, 6)
    tps = ws.target_paths(params, hp.targets, field="unipelt.targets")
    blocks = encoder_blocks(params)
    out = {"head": params["head"], "lora": _gated_lora(params, tps, hp.rank, k_lora, k_lg)}
    if hp.prefix_tokens:
        pre = prefix_init(k_pre, params, hp.prefix_tokens, hp.prefix_init_std)
        for i, blk in enumerate(blocks):
            pre[blk]["gate"] = gate_init(jax.random.fold_in(k_pg, i), d, 2)
        out["prefix"] = pre
    out["adapter"] = {
        blk: {
            **bottleneck_init(jax.random.fold_in(k_ad, i), d, m),
            "gate": gate_init(jax.random.fold_in(k_ag, i), d),
        }
        for i, blk in enumerate(blocks)
    }
    return out


def _gated_prefix(f: dict, g: jax.Array, next_fun, args, kwargs, context):
    """The interceptor inside one attention sub-layer: ``attend`` gets the gated prefixes."""
    if is_attend(context):
        q, k, v = args
        pk = g[:, 0, None, None] * f["key"]
        pv = g[:, 1, None, None] * f["value"]
        args = (q, with_prefix(k, pk), with_prefix(v, pv))
    return next_fun(*args, **kwargs)


def _lora_out(scale: float, f: dict, x: jax.Array, out: jax.Array) -> jax.Array:
    """``out + G_L(x)·scale·x Aᵀ Bᵀ`` for one ``vit.Linear`` call."""
    x = x.reshape(x.shape[0], -1, f["A"].shape[1])  # (B, T, in)
    g = gate(x, f["gate"])  # (B, 1)
    delta = (x @ f["A"].T.astype(x.dtype)) @ f["B"].T.astype(x.dtype)
    delta = (scale * g[:, :, None] * delta).reshape(out.shape)
    return out + delta.astype(out.dtype)


def _adapter_out(f: dict, out: jax.Array) -> jax.Array:
    """``y + G_A(y)·up(ReLU(down(y)))`` after the MLP (``y = out``)."""
    g = gate(out, f["gate"])[:, None, :]  # (B, 1, 1)
    y = bottleneck_apply(out, dense_weights(f), jax.nn.relu)
    return out + (g * y).astype(out.dtype)


def _branches(scale: float, lora: dict, pre: dict, ad: dict, next_fun, args, kwargs, context):
    """The interceptor: the prefix branch around attention, the adapter after the MLP and LoRA
    on every adapted ``vit.Linear``."""
    mod, blk = context.module, encoder_block_of(context)
    pos = position_of(context)
    if pos == "attn" and blk in pre:
        # the prefix gate reads this sub-layer's input; attend (called inside) uses it
        g = gate(args[0], pre[blk]["gate"])
        with nn.intercept_methods(functools.partial(_gated_prefix, pre[blk], g)):
            return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    if pos == "mlp" and blk in ad:
        return _adapter_out(ad[blk], out)
    if context.method_name == "__call__" and isinstance(mod, Linear):
        f = lora.get(paths.key_of("/".join(mod.path) + "/kernel"))
        if f is not None:
            return _lora_out(scale, f, args[0], out)
    return out


def _intercept(hp: UniPELTHparams, trainable, state=None, rng=None):
    del state, rng
    lora, pre, ad = trainable["lora"], trainable.get("prefix", {}), trainable["adapter"]
    return functools.partial(_branches, hp.alpha / hp.rank, lora, pre, ad)


@register(
    "unipelt",
    info=Info(
        "hybrid",
        "gated LoRA + prefix + adapter branches",
        "2110.07577",
    ),
    defaults=Defaults(
        # UniPELT's components (LoRA r = 8 on q/v, 10 prefixes, adapter 16×) under NOAH's
        # VTAB-1K optimiser (AdamW 1e-3).
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(rank=8, alpha=16.0, prefix_tokens=10, reduction=16),
        dry_kwargs=dict(rank=2, prefix_tokens=2, reduction=8),
        step_cost=0.65,
    ),
)
def unipelt(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ws.DEFAULT_TARGETS,
    prefix_tokens: int = 10,
    prefix_init_std: float = 0.02,
    reduction: float = 16,
    bottleneck: int | None = None,
) -> Method:
    """Gated LoRA + prefix + adapter in every block.

    >>> m = unipelt(rank=8, prefix_tokens=10, reduction=16)
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP

    Raises:
      ValueError: ``rank < 1``, ``alpha <= 0``, ``prefix_tokens < 0`` or a ``targets`` regex that
        matches no kernel (at init).
    """
    hp = UniPELTHparams(
        rank, alpha, tuple(targets), prefix_tokens, prefix_init_std, reduction, bottleneck
    )
    _check(hp)
    return Method(
        name="unipelt",
        init=functools.partial(_init, hp),
        apply=head_only_apply,
        hparams=as_json(hp),
        merge=None,
        hooks=MethodHooks(intercept=functools.partial(_intercept, hp)),
    )
