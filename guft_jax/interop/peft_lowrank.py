"""PEFT converters of the low-rank family: LoRA, DoRA, AdaLoRA, LoHa and LoKr.

LoRA (arXiv:2106.09685), DoRA (arXiv:2402.09353), AdaLoRA (arXiv:2303.10512) and LoHa
(arXiv:2108.06098) on timm's fused ``qkv`` map exactly onto split q/k/v adapters (factors stacked
or block diagonal); LoKr (arXiv:2309.14859) on a fused ``qkv`` has no exact split form and is
refused. The conventions are listed in :mod:`guft_jax.interop.peft_io`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax.interop import timm_io as timm_lib
from guft_jax.interop.peft_common import (
    Converter,
    Ctx,
    by_module,
    exact_targets,
    factor_getter,
    fuse_qkv,
    kernel_dims,
    one_rank,
    parse_tensors,
    pattern_key,
    pattern_lookup,
    refuse_fused,
    split_rows,
    to_np,
)
from guft_jax.methods import base as base_lib
from guft_jax.methods import weight_space as ws


def _lora_save(ctx: Ctx) -> tuple[dict, dict]:
    hp, name = ctx.method.hparams, ctx.method.name
    if hp.get("init") not in ("kaiming", "gaussian"):
        raise ValueError(
            f"save_peft: {name} init={hp.get('init')!r} changes the base weights; "
            "export merged weights (export_timm/export_hf) instead"
        )
    dora = name == "dora"
    fac = ctx.trainable[name]
    scale = hp["alpha"] / hp["rank"]
    groups = by_module([ws.path_of(k) for k in fac], ctx.base)
    tensors, ranks, alphas, get = {}, {}, {}, factor_getter(fac)
    for mod, blocks in groups.items():
        if None in blocks:
            p = blocks[None]
            a, b = get(p, "A"), get(p, "B")
            m = get(p, "m") if dora else None
        else:  # timm's fused qkv: A stacked, B block diagonal, missing blocks zero
            d = kernel_dims(ctx.params, next(iter(blocks.values())))[1]
            f = fuse_qkv(blocks, get, ("A",), ("B",), d)
            a, b = f["A"], f["B"]
            if dora:
                w = ctx.params
                qkv = timm_lib.guft_linear(mod, ctx.base)
                m = np.concatenate(
                    [
                        get(blocks[j], "m")
                        if j in blocks
                        else np.linalg.norm(to_np(ws.matrix(w, f"{qkv[j]}/kernel")), axis=0)
                        for j in range(3)
                    ]
                )
            ranks[pattern_key(mod)] = a.shape[0]
            alphas[pattern_key(mod)] = scale * a.shape[0]
        tensors[f"{mod}.lora_A.weight"] = a
        tensors[f"{mod}.lora_B.weight"] = b
        if dora:
            tensors[f"{mod}.lora_magnitude_vector"] = m
    config = dict(
        peft_type="LORA",
        r=hp["rank"],
        lora_alpha=hp["alpha"],
        rank_pattern=ranks,
        alpha_pattern=alphas,
        use_dora=dora,
        use_rslora=False,
        target_modules=sorted(groups),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=False,
        init_lora_weights=True,
    )
    return config, tensors


def _lora_load(config: dict, tensors: dict, params, base: str):
    dora = bool(config.get("use_dora"))
    if config.get("fan_in_fan_out") or config.get("bias", "none") != "none":
        raise ValueError("load_peft: LoRA with fan_in_fan_out or trained biases is not supported")
    mods = parse_tensors(tensors, ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    per_path = {}
    for mod, t in mods.items():
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        r = a.shape[0]
        alpha = pattern_lookup(config.get("alpha_pattern"), mod, config["lora_alpha"])
        s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        for path, rows in split_rows(mod, base, params):
            bj = b[rows]
            if not dora and not np.any(bj):
                continue  # a block the fused adapter does not change
            f = {"A": a, "B": bj, "s": s}
            if dora:
                f["m"] = t["lora_magnitude_vector"][rows]
            per_path[path] = f
    return one_rank(per_path, "B", ("A",))


def _lora_load_method(config, tensors, params, base):
    name = "dora" if config.get("use_dora") else "lora"
    rank, s0, group = _lora_load(config, tensors, params, base)
    method = base_lib.get_method(
        name,
        rank=rank,
        alpha=s0 * rank,
        targets=exact_targets([ws.path_of(k) for k in group]),
    )
    return method, {name: group}


def _adalora_save(ctx: Ctx) -> tuple[dict, dict]:
    hp = ctx.method.hparams
    fac = ctx.trainable["adalora"]
    scale = hp["alpha"] / hp["init_rank"]
    groups = by_module([ws.path_of(k) for k in fac], ctx.base)
    per_mod, get = {}, factor_getter(fac)
    for mod, blocks in groups.items():
        if None in blocks:
            p = blocks[None]
            per_mod[mod] = (get(p, "Q"), get(p, "lambda"), get(p, "P"))
            continue
        d = kernel_dims(ctx.params, next(iter(blocks.values())))[1]
        f = fuse_qkv(blocks, get, ("Q", "lambda"), ("P",), d)
        per_mod[mod] = (f["Q"], f["lambda"], f["P"])
    rank = max(q.shape[0] for q, _, _ in per_mod.values())
    tensors = {}
    for mod, (q, lam, pm) in per_mod.items():
        pad = rank - q.shape[0]
        tensors[f"{mod}.lora_A"] = np.pad(q, ((0, pad), (0, 0)))
        tensors[f"{mod}.lora_E"] = np.pad(lam, (0, pad))[:, None]
        tensors[f"{mod}.lora_B"] = np.pad(pm, ((0, 0), (0, pad)))
    config = dict(
        peft_type="ADALORA",
        init_r=rank,
        target_r=rank,
        r=rank,
        lora_alpha=float(scale * (rank + 1e-5)),  # PEFT divides by ranknum + 1e-5
        target_modules=sorted(groups),
        total_step=1,
        tinit=0,
        tfinal=0,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=False,
        init_lora_weights=True,
        rank_pattern=None,
    )
    return config, tensors


def _adalora_load_method(config, tensors, params, base):
    mods = parse_tensors(tensors, ("lora_A", "lora_B", "lora_E"))
    per_path = {}
    for mod, t in mods.items():
        # ranknum is the rank held (PEFT trims saved tensors to a rank_pattern's kept ranks)
        r = t["lora_A"].shape[0]
        s = config["lora_alpha"] / (np.float32(r) + np.float32(1e-5))
        for path, rows in split_rows(mod, base, params):
            f = {"Q": t["lora_A"], "lambda": t["lora_E"][:, 0], "P": t["lora_B"][rows], "s": s}
            per_path[path] = f
    rank, s0, group = one_rank(per_path, "lambda", ("Q",))
    method = base_lib.get_method(
        "adalora",
        init_rank=rank,
        target_rank=rank,
        alpha=float(s0 * rank),
        targets=exact_targets([ws.path_of(k) for k in group]),
    )
    return method, {"adalora": group}


def _lycoris_config(peft_type: str, hp: dict, groups: dict, **extra) -> dict:
    """The config fields LoHa and LoKr share (PEFT's LyCORIS family), plus ``extra``."""
    return dict(
        peft_type=peft_type,
        r=hp["rank"],
        alpha=hp["alpha"],
        target_modules=sorted(groups),
        rank_dropout=0.0,
        module_dropout=0.0,
        use_effective_conv2d=False,
        init_weights=True,
        **extra,
    )


_HADA_STACK = ("hada_w1_b", "hada_w2_b")  # (r, in)
_HADA_DIAG = ("hada_w1_a", "hada_w2_a")  # (out, r)


def _loha_save(ctx: Ctx) -> tuple[dict, dict]:
    """LoHa (arXiv:2108.06098): guft_jax uses PEFT's factor names; on timm's fused ``qkv`` both
    products are fused (``(B1 A1) ⊙ (B2 A2)`` row block ``j`` is block ``j``'s own)."""
    hp = ctx.method.hparams
    fac = ctx.trainable["loha"]
    scale = hp["alpha"] / hp["rank"]
    groups = by_module([ws.path_of(k) for k in fac], ctx.base)
    tensors, ranks, alphas, get = {}, {}, {}, factor_getter(fac)
    for mod, blocks in groups.items():
        if None in blocks:
            f = {k: get(blocks[None], k) for k in _HADA_STACK + _HADA_DIAG}
        else:
            d = kernel_dims(ctx.params, next(iter(blocks.values())))[1]
            f = fuse_qkv(blocks, get, _HADA_STACK, _HADA_DIAG, d)
            r = f["hada_w1_b"].shape[0]
            ranks[pattern_key(mod)], alphas[pattern_key(mod)] = r, scale * r
        tensors.update({f"{mod}.{k}": v for k, v in f.items()})
    return _lycoris_config("LOHA", hp, groups, rank_pattern=ranks, alpha_pattern=alphas), tensors


def _loha_load_method(config, tensors, params, base):
    mods = parse_tensors(tensors, _HADA_STACK + _HADA_DIAG)
    per_path = {}
    for mod, t in mods.items():
        r = t["hada_w1_b"].shape[0]
        s = pattern_lookup(config.get("alpha_pattern"), mod, config["alpha"]) / r
        for path, rows in split_rows(mod, base, params):
            f = {k: t[k] for k in _HADA_STACK} | {k: t[k][rows] for k in _HADA_DIAG}
            if np.any(f["hada_w1_a"]) and np.any(f["hada_w2_a"]):
                per_path[path] = {**f, "s": s}
    rank, s0, group = one_rank(per_path, "hada_w1_a", _HADA_STACK)
    targets = exact_targets([ws.path_of(k) for k in group])
    return base_lib.get_method("loha", rank=rank, alpha=s0 * rank, targets=targets), {"loha": group}


_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _lokr_save(ctx: Ctx) -> tuple[dict, dict]:
    """LoKr (arXiv:2309.14859): guft_jax uses PEFT's names, shapes and scale; a Kronecker update
    of timm's fused ``qkv`` has no exact split form (refused)."""
    hp = ctx.method.hparams
    fac = ctx.trainable["lokr"]
    groups = by_module([ws.path_of(k) for k in fac], ctx.base)
    refuse_fused("lokr", groups)
    tensors = {
        f"{mod}.{k}": to_np(v) for mod, b in groups.items() for k, v in fac[ws.key(b[None])].items()
    }
    extra = {k: hp[k] for k in ("decompose_both", "decompose_factor")}
    return _lycoris_config("LOKR", hp, groups, **extra), tensors


def _lokr_load_method(config, tensors, params, base):
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("load_peft: LoKr with rank_pattern/alpha_pattern is not supported")
    mods = parse_tensors(tensors, _LOKR)
    group = {}
    for mod, t in mods.items():
        rows = split_rows(mod, base, params)
        if len(rows) > 1:
            raise ValueError(f"load_peft: LoKr on timm's fused {mod} has no exact split form")
        group[ws.key(rows[0][0])] = {k: jnp.asarray(v) for k, v in t.items()}
    method = base_lib.get_method(
        "lokr",
        rank=int(config["r"]),
        alpha=float(config["alpha"]),
        decompose_both=bool(config.get("decompose_both", False)),
        decompose_factor=int(config.get("decompose_factor", -1)),
        targets=exact_targets([ws.path_of(k) for k in group]),
    )
    want = jax.eval_shape(lambda p: method.init(jax.random.key(0), p), params)["lokr"]
    got = jax.tree_util.tree_map(lambda x: x.shape, group)
    if jax.tree_util.tree_map(lambda x: x.shape, want) != got:
        raise ValueError("load_peft: LoKr factor shapes differ from those of its config")
    return method, {"lokr": group}


LORA = Converter("LORA", _lora_save, _lora_load_method)  # LoRA and DoRA (``use_dora``)
ADALORA = Converter("ADALORA", _adalora_save, _adalora_load_method)
LOHA = Converter("LOHA", _loha_save, _loha_load_method)
LOKR = Converter("LOKR", _lokr_save, _lokr_load_method)
