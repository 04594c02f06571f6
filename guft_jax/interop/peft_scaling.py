"""PEFT converters of multiplicative adapters: OFT, BOFT, HRA, (IA)³ and LN tuning.

OFT / BOFT / HRA (arXiv:2306.07280, 2311.06243, 2405.17484) transform a kernel's input, which
timm's fused ``qkv`` shares between q, k and v (exact only when all three carry the same one);
(IA)³ (arXiv:2205.05638) scales outputs (q at 1 on a fused ``qkv`` where it is not adapted) or
feed-forward inputs; LN tuning (arXiv:2312.11420) trains the LayerNorms' affine parameters.
guft_jax keeps PEFT 0.17's array names and shapes for all of them.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from guft_jax import paths as paths_lib
from guft_jax.interop import timm_io as timm_lib
from guft_jax.interop.peft_common import (
    Converter,
    Ctx,
    by_module,
    exact_targets,
    factor_getter,
    kernel_dims,
    parse_tensors,
    split_rows,
    to_np,
)
from guft_jax.methods import base as base_lib
from guft_jax.methods import weight_space as ws


def _input_side(
    peft_type: str, group: str, shared: dict, rows: dict, fields: tuple[str, ...]
) -> Converter:
    """An entry for a method that transforms the input side of a kernel (OFT, BOFT, HRA: guft_jax
    keeps PEFT's arrays, names and shapes). ``shared``/``rows``: ``{PEFT suffix: guft leaf}`` of
    the arrays acting on the input (one for a fused ``qkv``, which rotates the input q, k and v
    share: exact only when all three carry the same one) and of per-output-row arrays (split
    and stacked by rows). ``fields``: hyperparameters named alike in both libraries."""

    def save(ctx: Ctx) -> tuple[dict, dict]:
        fac = ctx.trainable[group]
        groups = by_module([ws.path_of(k) for k in fac], ctx.base)
        tensors, get = {}, factor_getter(fac)
        for mod, blocks in groups.items():
            ps = [blocks[None]] if None in blocks else [blocks.get(j) for j in range(3)]
            same = None not in ps and all(
                np.array_equal(get(p, k), get(ps[0], k)) for p in ps for k in shared.values()
            )
            if not same:
                raise ValueError(
                    f"save_peft: {group} on timm's fused {mod} transforms the input q, k and v "
                    "share: it needs all three adapted with equal factors"
                )
            tensors.update({f"{mod}.{s}": get(ps[0], g) for s, g in shared.items()})
            tensors.update(
                {f"{mod}.{s}": np.concatenate([get(p, g) for p in ps]) for s, g in rows.items()}
            )
        hp = ctx.method.hparams
        config = dict(peft_type=peft_type, target_modules=sorted(groups), init_weights=True)
        return {**config, **{f: hp[f] for f in fields}}, tensors

    def load(config, tensors, params, base):
        mods = parse_tensors(tensors, tuple(shared) + tuple(rows))
        out = {}
        for mod, t in mods.items():
            for path, rws in split_rows(mod, base, params):
                f = {g: jnp.asarray(t[s]) for s, g in shared.items()}
                out[ws.key(path)] = f | {g: jnp.asarray(t[s][rws]) for s, g in rows.items()}
        kw = {f: config[f] for f in fields if f in config}
        targets = exact_targets([ws.path_of(k) for k in out])
        return base_lib.get_method(group, targets=targets, **kw), {group: out}

    return Converter(peft_type, save, load)


_OFT_FIELDS = ("r", "oft_block_size", "block_share", "coft", "eps", "use_cayley_neumann")
_BOFT_FIELDS = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout")


def _ia3_save(ctx: Ctx) -> tuple[dict, dict]:
    hp = ctx.method.hparams
    vecs = ctx.trainable["ia3"]
    ff = {
        ws.path_of(k) for k in vecs if any(re.search(r, ws.path_of(k)) for r in hp["feedforward"])
    }
    groups = by_module([ws.path_of(k) for k in vecs], ctx.base)
    tensors, ff_mods = {}, []
    for mod, blocks in groups.items():
        get = lambda p: to_np(vecs[ws.key(p)]["ia3_l"])  # noqa: E731
        is_ff = {p in ff for p in blocks.values()}
        if len(is_ff) > 1:
            raise ValueError(f"save_peft: ia3 on timm's fused {mod} mixes input and output scaling")
        if True in is_ff:  # the fused Linear's input: q, k and v must share one vector
            vs = [get(p) for p in blocks.values()]
            if None not in blocks and (len(blocks) < 3 or any(np.any(v != vs[0]) for v in vs)):
                raise ValueError(
                    f"save_peft: ia3 feed-forward scaling on timm's fused {mod} needs one vector "
                    "shared by query, key and value"
                )
            tensors[f"{mod}.ia3_l"] = vs[0][None, :]
            ff_mods.append(mod)
        elif None in blocks:
            tensors[f"{mod}.ia3_l"] = get(blocks[None])[:, None]
        else:  # output scaling of the fused qkv: ones where a block is not adapted
            d = kernel_dims(ctx.params, next(iter(blocks.values())))[1]
            parts = [get(blocks[j]) if j in blocks else np.ones(d, np.float32) for j in range(3)]
            tensors[f"{mod}.ia3_l"] = np.concatenate(parts)[:, None]
    config = dict(
        peft_type="IA3",
        target_modules=sorted(groups),
        feedforward_modules=sorted(ff_mods),
        init_ia3_weights=True,
        fan_in_fan_out=False,
    )
    return config, tensors


def _named(names, module: str) -> bool:
    """PEFT's module matching: a regex string matches the whole name; a list entry matches the
    name or its dotted tail."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == n or module.endswith("." + n) for n in names or ())


def _ia3_load_method(config, tensors, params, base):
    mods = parse_tensors(tensors, ("ia3_l",))
    group, ff = {}, []
    for mod, t in mods.items():
        is_ff = _named(config.get("feedforward_modules"), mod)
        vec = t["ia3_l"].reshape(-1)
        for path, rows in split_rows(mod, base, params):
            v = vec if is_ff else vec[rows]
            if not is_ff and np.all(v == 1):
                continue  # a block the fused vector leaves as it is
            group[ws.key(path)] = {"ia3_l": jnp.asarray(v)}
            if is_ff:
                ff.append(path)
    paths = [ws.path_of(k) for k in group]
    method = base_lib.get_method("ia3", targets=exact_targets(paths), feedforward=exact_targets(ff))
    return method, {"ia3": group}


def _ln_tuning_save(ctx: Ctx) -> tuple[dict, dict]:
    trained = {
        k: v for k, v in base_lib.flat_arrays(ctx.trainable).items() if not k.startswith("head/")
    }
    layers = sorted({k.rsplit("/", 1)[0] for k in trained})
    tensors = {}
    for layer in layers:
        mod = timm_lib.torch_norm(layer, ctx.base)
        for leaf, name in (("scale", "weight"), ("bias", "bias")):
            v = trained.get(f"{layer}/{leaf}", paths_lib.get(ctx.params, f"{layer}/{leaf}"))
            tensors[f"{mod}.ln_tuning_layers.{name}"] = to_np(v)
    config = dict(
        peft_type="LN_TUNING",
        target_modules=sorted(timm_lib.torch_norm(x, ctx.base) for x in layers),
    )
    return config, tensors


def _ln_tuning_load_method(config, tensors, params, base):
    del config
    mods = parse_tensors(tensors, ("ln_tuning_layers.weight", "ln_tuning_layers.bias"))
    group: dict = {}
    leaves = []
    for mod, t in mods.items():
        layer = timm_lib.guft_norm(mod, base)
        for leaf, name in (("scale", "weight"), ("bias", "bias")):
            paths_lib.set(group, f"{layer}/{leaf}", jnp.asarray(t[f"ln_tuning_layers.{name}"]))
            leaves.append(f"{layer}/{leaf}")
    return base_lib.get_method("ln_tuning", targets=exact_targets(leaves)), group


OFT = _input_side(
    "OFT",
    "oft",
    {"oft_R.weight": "oft_R"},
    {},
    (*_OFT_FIELDS, "num_cayley_neumann_terms", "module_dropout"),
)
BOFT = _input_side("BOFT", "boft", {"boft_R": "boft_R"}, {"boft_s": "boft_s"}, _BOFT_FIELDS)
HRA = _input_side("HRA", "hra", {"hra_u": "hra_u"}, {}, ("r", "apply_GS"))
IA3 = Converter("IA3", _ia3_save, _ia3_load_method)
LN_TUNING = Converter("LN_TUNING", _ln_tuning_save, _ln_tuning_load_method)
