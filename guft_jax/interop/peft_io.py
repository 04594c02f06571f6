"""Hugging Face PEFT adapters out of and into guft_jax (PEFT 0.17 on-disk format).

:func:`save_peft` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``PeftModel.from_pretrained(model, directory)`` loads onto a timm ``VisionTransformer`` or a
Hugging Face ``ViTForImageClassification`` (``base="timm"|"hf"``); :func:`load_peft` reads the
same format back into a guft_jax method and trainable tree. Both go through :data:`CONVERTERS`, a
table keyed by guft_jax method name (one entry per method, each a pair of pure functions), so a
later method is one entry.

Conventions each entry handles (all exact; where no exact form exists the call fails with one
line naming the layer):

- PyTorch Linear weights are ``(out, in)``, guft_jax kernels ``(in, out)``; the task head is
  saved as PEFT's ``modules_to_save`` (``head`` / ``classifier``).
- timm fuses q, k, v in one ``qkv`` Linear (rows ``[q | k | v]``). LoRA (Hu et al.,
  arXiv:2106.09685), DoRA (arXiv:2402.09353) and AdaLoRA (arXiv:2303.10512) on it map exactly onto
  split q/k/v adapters: rank-r adapters on q, k, v are one rank-3r fused adapter (``A`` stacked,
  ``B`` block diagonal) and a fused adapter is three split ones sharing ``A`` (``B`` row blocks).
  VeRA (arXiv:2310.11454) and FourierFT (arXiv:2405.03003) on a fused ``qkv`` have no exact split
  form and are refused.
- LoRA scales by ``alpha / r`` per module (fused modules get PEFT ``rank_pattern`` /
  ``alpha_pattern`` entries); modules of different ranks or scales load as one rank with the
  scale folded into ``B``.
- AdaLoRA: PEFT scales by ``lora_alpha / (ranknum + 1e-5)``, guft_jax by ``alpha / r`` exactly;
  the exported ``lora_alpha`` carries the difference.
- VeRA: the frozen projections are saved (``save_projection=True``); guft_jax draws them
  U(±1/sqrt(fan_in)), PEFT Kaiming-uniform U(±sqrt(6/fan_in)), so the adapter carries them both
  ways and imported ones are used as they are.
- FourierFT: PEFT draws its entries as ``torch.randperm(out·in, seed)[:n]``, guft_jax with its own
  RNG; the entries travel with the adapter. Out, the spectrum is laid out in PEFT's permutation
  order (:func:`torch_randperm`, a numpy replica of torch's CPU ``randperm``) up to the last of
  guft_jax's entries (often most of ``out·in``: exact, not compact). In, the entries PEFT would
  draw are computed and kept explicitly.
- GUFT (arXiv id in :mod:`guft_jax.guft`) and the one-shot masks are saved as PEFT's SHiRA sparse
  adapter (indices + values per Linear). SHiRA holds ``r·(in+out)`` entries per layer: every layer
  is padded with zero-valued entries to one ``r``; a layer whose selection exceeds
  ``in·out`` entries' budget, and every selected tensor that is not a Linear weight (biases,
  LayerNorms, embeddings), goes to ``base_updates.safetensors`` as full merged tensors in the
  base's names, listed in the config (``guft_jax.base_updates``); load them with
  ``model.load_state_dict(..., strict=False)`` before ``PeftModel.from_pretrained``.

Also 1:1 in PEFT's own names (guft_jax's implementations follow PEFT 0.17.1): (IA)³
(arXiv:2205.05638; on a fused ``qkv`` output scaling with q at 1), LN tuning
(arXiv:2312.11420), LoHa (arXiv:2108.06098; fused like LoRA), LoKr (arXiv:2309.14859; fused
``qkv`` refused), and OFT / BOFT / HRA (arXiv:2306.07280, 2311.06243, 2405.17484), whose input
transform a fused ``qkv`` shares: exact only when q, k and v carry one and the same.

Methods without an entry are exported as merged weights (``model.safetensors`` in the base's
names, :func:`guft_jax.interop.timm_io.export_timm` / ``export_hf``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import guft as guft_lib
from guft_jax import paths as paths_lib
from guft_jax.interop import timm_io as timm_lib
from guft_jax.methods import base as base_lib
from guft_jax.methods import fourierft as fourierft_lib
from guft_jax.methods import vera as vera_lib
from guft_jax.methods import weight_space as ws

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BASE_UPDATES = "base_updates.safetensors"
MERGED = "model.safetensors"
PREFIX = "base_model.model."
META = "guft_jax"  # our key in adapter_config.json (PEFT drops unknown keys with a warning)
SHIRA = "peft_shira"  # the name of the fixed-entries method SHiRA adapters load into


class Loaded(NamedTuple):
    """What :func:`load_peft` returns: ``base_lib.forward(model, method, params, trainable, ())``
    gives the adapter's logits."""

    method: base_lib.Method
    trainable: dict
    params: dict  # the base params (with ``base_updates`` applied, if the adapter has them)


class Ctx(NamedTuple):
    """Everything an exporter may use."""

    method: base_lib.Method
    params: Any
    trainable: Any
    state: Any
    base: str


class Converter(NamedTuple):
    """One table entry: ``save(ctx) -> (config, tensors)`` in PEFT's names (module prefixes
    without ``base_model.model.``; the head is added by the caller) and ``load(config, tensors,
    params, base) -> (method, trainable_without_head)``."""

    peft_type: str
    save: Callable[[Ctx], tuple[dict, dict]]
    load: Callable[[dict, dict, Any, str], tuple[base_lib.Method, dict]]


# ------------------------------------------------------------------------------------ helpers


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def _dims(params, path: str) -> tuple[int, int]:
    """``(in, out)`` of the kernel at ``path``."""
    return tuple(ws.matrix(params, path).shape)


def _by_module(paths: list[str], base: str) -> dict[str, dict[int | None, str]]:
    """Groups kernel paths by PyTorch module: ``{module: {block: path}}``."""
    out: dict[str, dict] = {}
    for p in paths:
        mod, blk = timm_lib.torch_linear(p, base)
        out.setdefault(mod, {})[blk] = p
    return out


def _refuse_fused(method: str, groups: dict) -> None:
    for mod, blocks in groups.items():
        if None not in blocks:
            raise ValueError(
                f"save_peft: {method} on timm's fused {mod} has no exact split form; "
                "adapt other layers or export with base='hf'"
            )


def _pattern(module: str) -> str:
    """A PEFT ``*_pattern`` key matching exactly ``module``: its name after the first dot,
    escaped (LoRA matches keys as ``(.*\\.)?key$``, FourierFT as ``.*\\.key$``)."""
    return re.escape(module.split(".", 1)[1] if "." in module else module)


def _lookup(pattern: dict, module: str, default):
    """PEFT's ``get_pattern_key`` rule: the first key whose regex matches the name's tail."""
    for k, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def _targets(paths: list[str]) -> tuple[str, ...]:
    return tuple(f"^{re.escape(p)}$" for p in paths)


def _split_rows(module: str, base: str, params) -> list[tuple[str, slice]]:
    """``[(guft kernel path, row slice of the PyTorch weight)]`` of a PyTorch Linear (three row
    blocks for timm's fused ``qkv``)."""
    layers = timm_lib.guft_linear(module, base)
    d = _dims(params, f"{layers[0]}/kernel")[1]
    return [(f"{lay}/kernel", slice(j * d, (j + 1) * d)) for j, lay in enumerate(layers)]


def _parse(tensors: dict, suffixes: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """``{module: {suffix: array}}`` of PEFT state-dict keys; one error naming unknown keys."""
    out: dict[str, dict] = {}
    bad = []
    for key, v in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else None
        suf = next((s for s in suffixes if name and name.endswith("." + s)), None)
        if suf is None:
            bad.append(key)
            continue
        out.setdefault(name[: -len(suf) - 1], {})[suf] = np.asarray(v, np.float32)
    if bad:
        raise ValueError(f"load_peft: unsupported tensors {bad[:4]}")
    return out


def _fused(blocks: dict, get: Callable, stack: tuple[str, ...], diag: tuple[str, ...], d: int):
    """timm's fused ``qkv`` form of split low-rank factors: the ``stack`` factors (``(r, in)``
    or ``(r,)``) concatenated over q, k, v and the ``diag`` factors (``(out, r)``) placed block
    diagonally, zero rows for a block that is not adapted. Exact: row block ``j`` of the fused
    product is block ``j``'s own product."""
    items = sorted(blocks.items())
    out = {k: np.concatenate([get(p, k) for _, p in items]) for k in stack}
    for k in diag:
        parts = [get(p, k) for _, p in items]
        m = np.zeros((3 * d, sum(x.shape[1] for x in parts)), np.float32)
        col = 0
        for (j, _), x in zip(items, parts, strict=True):
            m[j * d : (j + 1) * d, col : col + x.shape[1]] = x
            col += x.shape[1]
        out[k] = m
    return out


# ------------------------------------------------------------------------------------ LoRA/DoRA


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
    groups = _by_module([ws.path_of(k) for k in fac], ctx.base)
    tensors, ranks, alphas = {}, {}, {}
    for mod, blocks in groups.items():
        get = lambda p, f: _np(fac[ws.key(p)][f])  # noqa: E731
        if None in blocks:
            p = blocks[None]
            a, b = get(p, "A"), get(p, "B")
            m = get(p, "m") if dora else None
        else:  # timm's fused qkv: A stacked, B block diagonal, missing blocks zero
            d = _dims(ctx.params, next(iter(blocks.values())))[1]
            f = _fused(blocks, get, ("A",), ("B",), d)
            a, b = f["A"], f["B"]
            if dora:
                w = ctx.params
                qkv = timm_lib.guft_linear(mod, ctx.base)
                m = np.concatenate(
                    [
                        get(blocks[j], "m")
                        if j in blocks
                        else np.linalg.norm(_np(ws.matrix(w, f"{qkv[j]}/kernel")), axis=0)
                        for j in range(3)
                    ]
                )
            ranks[_pattern(mod)] = a.shape[0]
            alphas[_pattern(mod)] = scale * a.shape[0]
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
    mods = _parse(tensors, ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    per_path = {}
    for mod, t in mods.items():
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        r = a.shape[0]
        alpha = _lookup(config.get("alpha_pattern"), mod, config["lora_alpha"])
        s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        for path, rows in _split_rows(mod, base, params):
            bj = b[rows]
            if not dora and not np.any(bj):
                continue  # a block the fused adapter does not change
            f = {"A": a, "B": bj, "s": s}
            if dora:
                f["m"] = t["lora_magnitude_vector"][rows]
            per_path[path] = f
    return _low_rank(per_path, "B", ("A",))


def _low_rank(per_path: dict, fold: str, pad_rows: tuple[str, ...]):
    """One rank ``R`` (the largest) and one scale for all kernels: factors zero-padded to ``R``
    (``pad_rows``: the ``(r, in)`` ones; other 2-D factors are ``(out, r)``) and each kernel's
    scale ratio folded into ``fold`` (exact: the padded part is zero)."""
    rank = max(f[pad_rows[0]].shape[0] for f in per_path.values())
    s0 = next(iter(per_path.values()))["s"]
    group = {}
    for p, f in per_path.items():
        g = {k: v for k, v in f.items() if k != "s"}
        if f["s"] != s0:
            g[fold] = g[fold] * np.float32(f["s"] / s0)
        for k, v in g.items():
            if k in pad_rows:
                g[k] = np.pad(v, ((0, rank - v.shape[0]), (0, 0)))
            elif v.ndim == 2:
                g[k] = np.pad(v, ((0, 0), (0, rank - v.shape[1])))
            elif k == "lambda":
                g[k] = np.pad(v, (0, rank - v.shape[0]))
        group[ws.key(p)] = {k: jnp.asarray(v) for k, v in g.items()}
    return rank, s0, group


def _lora_load_method(config, tensors, params, base):
    name = "dora" if config.get("use_dora") else "lora"
    rank, s0, group = _lora_load(config, tensors, params, base)
    method = base_lib.get_method(
        name,
        rank=rank,
        alpha=s0 * rank,
        targets=_targets([ws.path_of(k) for k in group]),
    )
    return method, {name: group}


# ------------------------------------------------------------------------------------ AdaLoRA


def _adalora_save(ctx: Ctx) -> tuple[dict, dict]:
    hp = ctx.method.hparams
    fac = ctx.trainable["adalora"]
    scale = hp["alpha"] / hp["init_rank"]
    groups = _by_module([ws.path_of(k) for k in fac], ctx.base)
    per_mod = {}
    for mod, blocks in groups.items():
        get = lambda p, f: _np(fac[ws.key(p)][f])  # noqa: E731
        if None in blocks:
            p = blocks[None]
            per_mod[mod] = (get(p, "Q"), get(p, "lambda"), get(p, "P"))
            continue
        d = _dims(ctx.params, next(iter(blocks.values())))[1]
        f = _fused(blocks, get, ("Q", "lambda"), ("P",), d)
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
    mods = _parse(tensors, ("lora_A", "lora_B", "lora_E"))
    per_path = {}
    for mod, t in mods.items():
        # ranknum is the rank held (PEFT trims saved tensors to a rank_pattern's kept ranks)
        r = t["lora_A"].shape[0]
        s = config["lora_alpha"] / (np.float32(r) + np.float32(1e-5))
        for path, rows in _split_rows(mod, base, params):
            f = {"Q": t["lora_A"], "lambda": t["lora_E"][:, 0], "P": t["lora_B"][rows], "s": s}
            per_path[path] = f
    rank, s0, group = _low_rank(per_path, "lambda", ("Q",))
    method = base_lib.get_method(
        "adalora",
        init_rank=rank,
        target_rank=rank,
        alpha=float(s0 * rank),
        targets=_targets([ws.path_of(k) for k in group]),
    )
    return method, {"adalora": group}


# ------------------------------------------------------------------------------------ VeRA


def _vera_save(ctx: Ctx) -> tuple[dict, dict]:
    hp = ctx.method.hparams
    lam = ctx.trainable["vera"]
    paths = [ws.path_of(k) for k in lam]
    groups = _by_module(paths, ctx.base)
    _refuse_fused("vera", groups)
    dims = [_dims(ctx.params, p) for p in paths]
    if "projections" in hp:  # an imported adapter's own projections
        a_all, b_all = hp["projections"]
    else:
        a_all, b_all = vera_lib.vera_projections(
            hp["seed"], hp["rank"], max(d[0] for d in dims), max(d[1] for d in dims)
        )
    # PEFT 0.17 checks for ``base_model.vera_A`` but loads the buffers only under the adapter's
    # name (``base_model.vera_A.default``); without that key it silently keeps the projections
    # regenerated from ``projection_prng_key``. Both keys are written.
    tensors = {}
    for k, v in (("vera_A", a_all), ("vera_B", b_all)):
        tensors[k] = tensors[f"{k}.default"] = _np(v)
    for mod, blocks in groups.items():
        s = lam[ws.key(blocks[None])]
        tensors[f"{mod}.vera_lambda_b"] = _np(s["lambda_b"])
        tensors[f"{mod}.vera_lambda_d"] = _np(s["lambda_d"])
    config = dict(
        peft_type="VERA",
        r=hp["rank"],
        target_modules=sorted(groups),
        projection_prng_key=hp.get("seed", 0),
        save_projection=True,
        vera_dropout=0.0,
        d_initial=hp["d_init"],
        fan_in_fan_out=False,
        bias="none",
    )
    return config, tensors


def vera_explicit(
    projections: tuple[np.ndarray, np.ndarray], targets: tuple[str, ...]
) -> base_lib.Method:
    """VeRA (arXiv:2310.11454) with given frozen projections ``A`` (r, in_max), ``B`` (out_max,
    r), e.g. PEFT's; same trainable tree and forward as :func:`guft_jax.methods.vera.vera`."""
    a_all, b_all = (jnp.asarray(x) for x in projections)
    rank = int(a_all.shape[0])

    def init_fn(rng, params):
        del rng
        out = {}
        for p in ws.target_paths(params, targets, field="vera.targets"):
            out[ws.key(p)] = {
                "lambda_d": jnp.full((rank,), 0.1, jnp.float32),
                "lambda_b": jnp.zeros((_dims(params, p)[1],), jnp.float32),
            }
        return {"head": params["head"], "vera": out}

    def merge(params, trainable):
        deltas = {}
        for k, s in trainable["vera"].items():
            d_in, d_out = _dims(params, ws.path_of(k))
            deltas[ws.path_of(k)] = vera_lib.vera_delta(s, a_all, b_all, d_in, d_out)
        return ws.add_deltas(params, deltas, trainable["head"])

    hp = dict(rank=rank, d_init=0.1, projections=(a_all, b_all), targets=list(targets))
    return ws.method("vera", init=init_fn, merge=merge, hparams=hp)


def _vera_load_method(config, tensors, params, base):
    if "base_model.vera_A" not in tensors:
        raise ValueError("load_peft: a VeRA adapter saved without its projections is not supported")
    proj = [tensors.pop(f"base_model.{k}") for k in ("vera_A", "vera_B")]
    proj = [
        tensors.pop(f"base_model.{k}.default", v)
        for k, v in zip(("vera_A", "vera_B"), proj, strict=True)
    ]
    a_all, b_all = (np.asarray(v, np.float32) for v in proj)
    mods = _parse(tensors, ("vera_lambda_b", "vera_lambda_d"))
    group = {}
    for mod, t in mods.items():
        ((path, _),) = _split_rows(mod, base, params)
        group[ws.key(path)] = {
            "lambda_b": jnp.asarray(t["vera_lambda_b"]),
            "lambda_d": jnp.asarray(t["vera_lambda_d"]),
        }
    method = vera_explicit((a_all, b_all), _targets([ws.path_of(k) for k in group]))
    return method, {"vera": group}


# ------------------------------------------------------------------------------------ FourierFT


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` on CPU, in numpy.

    torch's CPU ``randperm`` (for ``n < 2**32 / 20``) is a Fisher-Yates shuffle driven by the
    32-bit outputs of its MT19937 engine seeded like ``init_genrand(seed)``; numpy's MT19937 with
    legacy seeding is the same engine. Checked against torch in tests/test_interop_torch.py.
    """
    if n >= 2**32 // 20:
        raise ValueError(f"torch_randperm: n={n} is above torch's small-n algorithm")
    bg = np.random.MT19937(0)
    bg._legacy_seeding(int(seed) & 0xFFFFFFFF)
    raw = bg.random_raw(max(n - 1, 0)).astype(np.int64)
    z = raw % (n - np.arange(max(n - 1, 0), dtype=np.int64))
    perm = np.arange(n, dtype=np.int64)
    for i, zi in enumerate(z.tolist()):
        j = i + zi
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _fourierft_save(ctx: Ctx) -> tuple[dict, dict]:
    hp = ctx.method.hparams
    coefs = ctx.trainable["fourierft"]
    groups = _by_module([ws.path_of(k) for k in coefs], ctx.base)
    _refuse_fused("fourierft", groups)
    seed = int(hp["seed"] if hp.get("seed") is not None else 2024)
    tensors, n_pattern = {}, {}
    perms: dict[tuple[int, int], np.ndarray] = {}
    for mod, blocks in groups.items():
        path = blocks[None]
        d_in, d_out = _dims(ctx.params, path)
        ent = _entries(ctx, path, (d_out, d_in))
        flat = ent[0].astype(np.int64) * d_in + ent[1]
        if (d_out, d_in) not in perms:
            perms[(d_out, d_in)] = np.argsort(torch_randperm(d_out * d_in, seed))
        pos = perms[(d_out, d_in)][flat]
        spec = np.zeros(int(pos.max()) + 1, np.float32)
        spec[pos] = _np(coefs[ws.key(path)])
        tensors[f"{mod}.fourierft_spectrum"] = spec
        n_pattern[_pattern(mod)] = spec.shape[0]
    config = dict(
        peft_type="FOURIERFT",
        n_frequency=max(n_pattern.values()),
        n_frequency_pattern=n_pattern,
        scaling=float(hp["alpha"]),
        random_loc_seed=seed,
        target_modules=sorted(groups),
        fan_in_fan_out=False,
        bias="none",
        init_weights=False,
    )
    return config, tensors


def _entries(ctx: Ctx, path: str, shape: tuple[int, int]) -> np.ndarray:
    hp = ctx.method.hparams
    if "entries" in hp:  # an explicit-entries method (imported)
        return np.asarray(hp["entries"][path])
    return fourierft_lib.spectral_entries(
        shape,
        hp["n"],
        seed=hp["seed"],
        frequency_bias=hp["frequency_bias"],
        fc=hp["fc"],
        bandwidth=hp["bandwidth"],
    )


def fourierft_explicit(entries: dict[str, np.ndarray], alpha: float) -> base_lib.Method:
    """FourierFT (arXiv:2405.03003) with given spectral entries per kernel path (``(2, n)``
    rows/cols of the ``(out, in)`` spectrum), e.g. PEFT's; same forward as
    :func:`guft_jax.methods.fourierft.fourierft`."""
    ent = {p: np.asarray(e, np.int32) for p, e in entries.items()}
    targets = _targets(list(ent))

    def init_fn(rng, params):
        del rng
        ws.target_paths(params, targets, field="fourierft.targets")
        out = {ws.key(p): jnp.zeros((e.shape[1],), jnp.float32) for p, e in ent.items()}
        return {"head": params["head"], "fourierft": out}

    def merge(params, trainable):
        deltas = {}
        for k, c in trainable["fourierft"].items():
            p = ws.path_of(k)
            d_in, d_out = _dims(params, p)
            deltas[p] = fourierft_lib.delta_w(c, jnp.asarray(ent[p]), (d_out, d_in), alpha).T
        return ws.add_deltas(params, deltas, trainable["head"])

    hp = dict(alpha=alpha, entries=ent, seed=None, targets=list(targets))
    return ws.method("fourierft", init=init_fn, merge=merge, hparams=hp)


def _fourierft_load_method(config, tensors, params, base):
    mods = _parse(tensors, ("fourierft_spectrum",))
    seed = int(config["random_loc_seed"])
    entries, group = {}, {}
    for mod, t in mods.items():
        spec = t["fourierft_spectrum"]
        ((path, _),) = _split_rows(mod, base, params)
        d_in, d_out = _dims(params, path)
        idx = torch_randperm(d_out * d_in, seed)[: spec.shape[0]]
        entries[path] = np.stack([idx // d_in, idx % d_in])
        group[ws.key(path)] = jnp.asarray(spec)
    return fourierft_explicit(entries, float(config["scaling"])), {"fourierft": group}


# ------------------------------------------------------------------------------------ SHiRA


def _shira_save(ctx: Ctx) -> tuple[dict, dict]:
    payload = base_lib.export_arrays(ctx.method, ctx.params, ctx.trainable, ctx.state)
    sel: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in payload:
        if name.startswith("guft/") and name.endswith("/indices"):
            p = name[len("guft/") : -len("/indices")]
            sel[p] = (np.asarray(payload[name]), _np(payload[f"guft/{p}/values"]))
    linear, rest = {}, {}
    for p, iv in sel.items():
        try:
            timm_lib.torch_linear(p, ctx.base)
            ok = p.endswith("/kernel") and p != "head/kernel"
        except ValueError:
            ok = False
        (linear if ok else rest)[p] = iv
    # torch (out, in) coordinates per module
    coords: dict[str, list] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for p, (idx, vals) in linear.items():
        mod, blk = timm_lib.torch_linear(p, ctx.base)
        d_in, d_out = _dims(ctx.params, p)
        row_in, col_out = np.divmod(idx.astype(np.int64), d_out)
        off = 0 if blk is None else blk * d_out
        coords.setdefault(mod, []).append((col_out + off, row_in, vals))
        n_out = d_out if blk is None else 3 * d_out
        shapes[mod] = (n_out, d_in)
    if not coords:
        raise ValueError("save_peft: the selection holds no Linear weight entry (SHiRA has none)")
    r = max(math.ceil(sum(len(c[2]) for c in cs) / sum(shapes[m])) for m, cs in coords.items())
    tensors, too_dense = {}, []
    for mod, cs in sorted(coords.items()):
        n_out, d_in = shapes[mod]
        cap = r * (n_out + d_in)
        if cap > n_out * d_in:
            too_dense.append(mod)
            continue
        flat = np.concatenate([o * d_in + i for o, i, _ in cs])
        vals = np.concatenate([v for _, _, v in cs])
        free = np.setdiff1d(np.arange(n_out * d_in), flat)[: cap - flat.shape[0]]
        flat_all = np.concatenate([flat, free])
        vals_all = np.concatenate([vals, np.zeros(free.shape[0], np.float32)])
        order = np.argsort(flat_all)
        tensors[f"{mod}.shira_indices"] = np.stack(np.divmod(flat_all[order], d_in)).astype(
            np.int32
        )
        tensors[f"{mod}.shira_weight"] = vals_all[order]
    for mod in too_dense:  # no SHiRA form at this r: the layer's merged weight instead
        for p in linear:
            if timm_lib.torch_linear(p, ctx.base)[0] == mod:
                rest[p] = linear[p]
    updates = _base_updates(ctx, rest)
    config = dict(
        peft_type="SHIRA",
        r=r,
        mask_type="random",
        target_modules=sorted(set(coords) - set(too_dense)),
        fan_in_fan_out=False,
        init_weights=True,
    )
    meta = {"base_updates": sorted(updates), "selected_outside_linears": sorted(rest)}
    return {**config, "_meta": meta, "_base_updates": updates}, tensors


def _base_updates(ctx: Ctx, rest: dict) -> dict[str, np.ndarray]:
    """Full tensors (base's names) of the tensors ``rest`` selects entries of, with them added."""
    if not rest:
        return {}
    upd = {}
    for p, (idx, vals) in rest.items():
        w0 = paths_lib.get(ctx.params, p)
        upd[p] = w0.reshape(-1).at[jnp.asarray(idx)].add(jnp.asarray(vals)).reshape(w0.shape)
    exporter = timm_lib.export_timm if ctx.base == "timm" else timm_lib.export_hf
    full = exporter(paths_lib.replaced(ctx.params, upd), _ViTShape(ctx.params))
    orig = exporter(ctx.params, _ViTShape(ctx.params))
    return {k: v for k, v in full.items() if not np.array_equal(v, orig[k])}


class _ViTShape(NamedTuple):
    """The few model fields the state-dict exporters read, from a param tree."""

    params: Any

    @property
    def num_layers(self) -> int:
        return sum(k.startswith("encoderblock_") for k in self.params["Transformer"])

    @property
    def layerscale(self) -> bool:
        return "LayerScale_attn" in self.params["Transformer"]["encoderblock_0"]

    classifier = "token"
    representation_size = None
    posemb_grid = None


def shira_explicit(indices: dict[str, np.ndarray]) -> base_lib.Method:
    """A fixed sparse update: ``W0.ravel().at[indices].add(values)`` per kernel path (PEFT SHiRA,
    arXiv:2406.13175, or a GUFT selection read back). Trainable: ``{"head", "shira": {key:
    values}}``."""
    idx = {p: np.asarray(i, np.int32) for p, i in indices.items()}

    def init_fn(rng, params):
        del rng
        out = {ws.key(p): jnp.zeros((i.shape[0],), jnp.float32) for p, i in idx.items()}
        return {"head": params["head"], "shira": out}

    def merge(params, trainable):
        upd = {}
        for k, v in trainable["shira"].items():
            w0 = paths_lib.get(params, ws.path_of(k))
            flat = w0.reshape(-1).at[jnp.asarray(idx[ws.path_of(k)])].add(v.astype(w0.dtype))
            upd[ws.path_of(k)] = flat.reshape(w0.shape)
        return {**paths_lib.replaced(params, upd), "head": trainable["head"]}

    def export(params, trainable, state=None):
        del params, state
        out = {f"head/{k}": _np(v) for k, v in trainable["head"].items()}
        for k, v in trainable["shira"].items():
            out[f"guft/{ws.path_of(k)}/indices"] = idx[ws.path_of(k)]
            out[f"guft/{ws.path_of(k)}/values"] = _np(v)
        return out

    hooks = base_lib.MethodHooks(export=export)
    return ws.method(SHIRA, init=init_fn, merge=merge, hparams=dict(tensors=len(idx)), hooks=hooks)


def _shira_load_method(config, tensors, params, base):
    mods = _parse(tensors, ("shira_indices", "shira_weight"))
    idx, group = {}, {}
    for mod, t in mods.items():
        ij = np.asarray(t["shira_indices"]).astype(np.int64)
        w = t["shira_weight"] * np.float32(config.get("scaling", 1.0))
        for path, rows in _split_rows(mod, base, params):
            d_in, d_out = _dims(params, path)
            lo = rows.start or 0
            hit = (ij[0] >= lo) & (ij[0] < lo + d_out) & (w != 0)
            if not np.any(hit):
                continue
            idx[path] = (ij[1][hit] * d_out + (ij[0][hit] - lo)).astype(np.int32)
            group[ws.key(path)] = jnp.asarray(w[hit])
    return shira_explicit(idx), {"shira": group}


# ------------------------------------------------------------------------------------ LoHa

_HADA_STACK = ("hada_w1_b", "hada_w2_b")  # (r, in)
_HADA_DIAG = ("hada_w1_a", "hada_w2_a")  # (out, r)


def _loha_save(ctx: Ctx) -> tuple[dict, dict]:
    """LoHa (arXiv:2108.06098): guft_jax uses PEFT's factor names; on timm's fused ``qkv`` both
    products are fused (``(B1 A1) ⊙ (B2 A2)`` row block ``j`` is block ``j``'s own)."""
    hp = ctx.method.hparams
    fac = ctx.trainable["loha"]
    scale = hp["alpha"] / hp["rank"]
    groups = _by_module([ws.path_of(k) for k in fac], ctx.base)
    tensors, ranks, alphas = {}, {}, {}
    for mod, blocks in groups.items():
        get = lambda p, f: _np(fac[ws.key(p)][f])  # noqa: E731
        if None in blocks:
            f = {k: get(blocks[None], k) for k in _HADA_STACK + _HADA_DIAG}
        else:
            d = _dims(ctx.params, next(iter(blocks.values())))[1]
            f = _fused(blocks, get, _HADA_STACK, _HADA_DIAG, d)
            r = f["hada_w1_b"].shape[0]
            ranks[_pattern(mod)], alphas[_pattern(mod)] = r, scale * r
        tensors.update({f"{mod}.{k}": v for k, v in f.items()})
    config = dict(
        peft_type="LOHA",
        r=hp["rank"],
        alpha=hp["alpha"],
        rank_pattern=ranks,
        alpha_pattern=alphas,
        target_modules=sorted(groups),
        rank_dropout=0.0,
        module_dropout=0.0,
        use_effective_conv2d=False,
        init_weights=True,
    )
    return config, tensors


def _loha_load_method(config, tensors, params, base):
    mods = _parse(tensors, _HADA_STACK + _HADA_DIAG)
    per_path = {}
    for mod, t in mods.items():
        r = t["hada_w1_b"].shape[0]
        s = _lookup(config.get("alpha_pattern"), mod, config["alpha"]) / r
        for path, rows in _split_rows(mod, base, params):
            f = {k: t[k] for k in _HADA_STACK} | {k: t[k][rows] for k in _HADA_DIAG}
            if np.any(f["hada_w1_a"]) and np.any(f["hada_w2_a"]):
                per_path[path] = {**f, "s": s}
    rank, s0, group = _low_rank(per_path, "hada_w1_a", _HADA_STACK)
    targets = _targets([ws.path_of(k) for k in group])
    return base_lib.get_method("loha", rank=rank, alpha=s0 * rank, targets=targets), {"loha": group}


# ------------------------------------------------------------------------------------ LoKr

_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _lokr_save(ctx: Ctx) -> tuple[dict, dict]:
    """LoKr (arXiv:2309.14859): guft_jax uses PEFT's names, shapes and scale; a Kronecker update
    of timm's fused ``qkv`` has no exact split form (refused)."""
    hp = ctx.method.hparams
    fac = ctx.trainable["lokr"]
    groups = _by_module([ws.path_of(k) for k in fac], ctx.base)
    _refuse_fused("lokr", groups)
    tensors = {
        f"{mod}.{k}": _np(v) for mod, b in groups.items() for k, v in fac[ws.key(b[None])].items()
    }
    config = dict(
        peft_type="LOKR",
        r=hp["rank"],
        alpha=hp["alpha"],
        decompose_both=hp["decompose_both"],
        decompose_factor=hp["decompose_factor"],
        target_modules=sorted(groups),
        rank_dropout=0.0,
        module_dropout=0.0,
        use_effective_conv2d=False,
        init_weights=True,
    )
    return config, tensors


def _lokr_load_method(config, tensors, params, base):
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("load_peft: LoKr with rank_pattern/alpha_pattern is not supported")
    mods = _parse(tensors, _LOKR)
    group = {}
    for mod, t in mods.items():
        rows = _split_rows(mod, base, params)
        if len(rows) > 1:
            raise ValueError(f"load_peft: LoKr on timm's fused {mod} has no exact split form")
        group[ws.key(rows[0][0])] = {k: jnp.asarray(v) for k, v in t.items()}
    method = base_lib.get_method(
        "lokr",
        rank=int(config["r"]),
        alpha=float(config["alpha"]),
        decompose_both=bool(config.get("decompose_both", False)),
        decompose_factor=int(config.get("decompose_factor", -1)),
        targets=_targets([ws.path_of(k) for k in group]),
    )
    want = jax.eval_shape(lambda p: method.init(jax.random.key(0), p), params)["lokr"]
    got = jax.tree_util.tree_map(lambda x: x.shape, group)
    if jax.tree_util.tree_map(lambda x: x.shape, want) != got:
        raise ValueError("load_peft: LoKr factor shapes differ from those of its config")
    return method, {"lokr": group}


# ------------------------------------------------------------------------- OFT, BOFT, HRA


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
        groups = _by_module([ws.path_of(k) for k in fac], ctx.base)
        tensors = {}
        for mod, blocks in groups.items():
            get = lambda p, k: _np(fac[ws.key(p)][k])  # noqa: E731
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
        mods = _parse(tensors, tuple(shared) + tuple(rows))
        out = {}
        for mod, t in mods.items():
            for path, rws in _split_rows(mod, base, params):
                f = {g: jnp.asarray(t[s]) for s, g in shared.items()}
                out[ws.key(path)] = f | {g: jnp.asarray(t[s][rws]) for s, g in rows.items()}
        kw = {f: config[f] for f in fields if f in config}
        targets = _targets([ws.path_of(k) for k in out])
        return base_lib.get_method(group, targets=targets, **kw), {group: out}

    return Converter(peft_type, save, load)


_OFT_FIELDS = ("r", "oft_block_size", "block_share", "coft", "eps", "use_cayley_neumann")
_BOFT_FIELDS = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout")


# ------------------------------------------------------------------------------------ (IA)3


def _ia3_save(ctx: Ctx) -> tuple[dict, dict]:
    hp = ctx.method.hparams
    vecs = ctx.trainable["ia3"]
    ff = {
        ws.path_of(k) for k in vecs if any(re.search(r, ws.path_of(k)) for r in hp["feedforward"])
    }
    groups = _by_module([ws.path_of(k) for k in vecs], ctx.base)
    tensors, ff_mods = {}, []
    for mod, blocks in groups.items():
        get = lambda p: _np(vecs[ws.key(p)]["ia3_l"])  # noqa: E731
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
            d = _dims(ctx.params, next(iter(blocks.values())))[1]
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
    mods = _parse(tensors, ("ia3_l",))
    group, ff = {}, []
    for mod, t in mods.items():
        is_ff = _named(config.get("feedforward_modules"), mod)
        vec = t["ia3_l"].reshape(-1)
        for path, rows in _split_rows(mod, base, params):
            v = vec if is_ff else vec[rows]
            if not is_ff and np.all(v == 1):
                continue  # a block the fused vector leaves as it is
            group[ws.key(path)] = {"ia3_l": jnp.asarray(v)}
            if is_ff:
                ff.append(path)
    paths = [ws.path_of(k) for k in group]
    method = base_lib.get_method("ia3", targets=_targets(paths), feedforward=_targets(ff))
    return method, {"ia3": group}


# ------------------------------------------------------------------------------------ LN tuning


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
            tensors[f"{mod}.ln_tuning_layers.{name}"] = _np(v)
    config = dict(
        peft_type="LN_TUNING",
        target_modules=sorted(timm_lib.torch_norm(x, ctx.base) for x in layers),
    )
    return config, tensors


def _ln_tuning_load_method(config, tensors, params, base):
    del config
    mods = _parse(tensors, ("ln_tuning_layers.weight", "ln_tuning_layers.bias"))
    group: dict = {}
    leaves = []
    for mod, t in mods.items():
        layer = timm_lib.guft_norm(mod, base)
        for leaf, name in (("scale", "weight"), ("bias", "bias")):
            paths_lib.set(group, f"{layer}/{leaf}", jnp.asarray(t[f"ln_tuning_layers.{name}"]))
            leaves.append(f"{layer}/{leaf}")
    return base_lib.get_method("ln_tuning", targets=_targets(leaves)), group


# ------------------------------------------------------------------------------------ the table


_LORA = Converter("LORA", _lora_save, _lora_load_method)
_SHIRA = Converter("SHIRA", _shira_save, _shira_load_method)
CONVERTERS: dict[str, Converter] = {
    "lora": _LORA,
    "dora": _LORA,
    "adalora": Converter("ADALORA", _adalora_save, _adalora_load_method),
    "ia3": Converter("IA3", _ia3_save, _ia3_load_method),
    "loha": Converter("LOHA", _loha_save, _loha_load_method),
    "lokr": Converter("LOKR", _lokr_save, _lokr_load_method),
    "oft": _input_side(
        "OFT",
        "oft",
        {"oft_R.weight": "oft_R"},
        {},
        (*_OFT_FIELDS, "num_cayley_neumann_terms", "module_dropout"),
    ),
    "boft": _input_side("BOFT", "boft", {"boft_R": "boft_R"}, {"boft_s": "boft_s"}, _BOFT_FIELDS),
    "hra": _input_side("HRA", "hra", {"hra_u": "hra_u"}, {}, ("r", "apply_GS")),
    "ln_tuning": Converter("LN_TUNING", _ln_tuning_save, _ln_tuning_load_method),
    "vera": Converter("VERA", _vera_save, _vera_load_method),
    "fourierft": Converter("FOURIERFT", _fourierft_save, _fourierft_load_method),
    SHIRA: _SHIRA,
    "shira": _SHIRA,  # GUFT-family methods with a per-tensor quota: the same payload
    "gps": _SHIRA,
    "guft": _SHIRA,
    **{s: _SHIRA for s in guft_lib.ONESHOT_SCORES},
}
_BY_TYPE = {c.peft_type: c for c in CONVERTERS.values()}


def save_peft(
    directory: str,
    method: base_lib.Method,
    trainable: Any,
    *,
    params: Any,
    state: Any = None,
    base: str = "timm",
) -> dict:
    """Writes a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``PeftModel.from_pretrained(timm_or_hf_model, directory)`` then gives guft_jax's logits;
    the task head is saved as PEFT's ``modules_to_save``. Methods without a PEFT form are saved
    as merged weights (``model.safetensors``, no adapter config).

    Args:
      directory: created if missing.
      method: the guft_jax method that trained ``trainable``.
      trainable: its trainable tree.
      params: the frozen base params the method was applied to.
      state: the method state (GUFT's selection).
      base: ``"timm"`` (``VisionTransformer``, fused ``qkv``) or ``"hf"``
        (``ViTForImageClassification``).

    Returns:
      The config written (``{"format": "merged"}`` for a merged export).

    Raises:
      ValueError: an unknown ``base``; a method/target without an exact PEFT form (one line
        naming the layer).

    >>> save_peft("out/", method, trainable, params=params, base="timm")  # doctest: +SKIP
    """
    timm_lib.check_base(base)
    os.makedirs(directory, exist_ok=True)
    conv = CONVERTERS.get(method.name)
    if conv is None:
        if method.merge is None:
            raise ValueError(f"save_peft: method {method.name!r} has no PEFT form and no merge")
        merged = method.merge(params, trainable, state)
        exporter = timm_lib.export_timm if base == "timm" else timm_lib.export_hf
        exporter(merged, _ViTShape(params), os.path.join(directory, MERGED))
        return {"format": "merged"}
    config, tensors = conv.save(Ctx(method, params, trainable, state, base))
    for field in ("target_modules", "feedforward_modules"):
        if config.get(field):  # one regex of the exact names: PEFT's list form matches name
            # tails (timm's ``norm`` would also hit every ``attn.norm`` Identity)
            config[field] = "^(?:" + "|".join(re.escape(m) for m in config[field]) + ")$"
    updates = config.pop("_base_updates", {})
    meta = {"method": method.name, "hparams": _jsonable(method.hparams), "base": base}
    meta.update(config.pop("_meta", {}))
    head = "head" if base == "timm" else "classifier"
    tensors = {
        PREFIX + k if not k.startswith("vera_") else f"base_model.{k}": v
        for k, v in tensors.items()
    }
    tensors[f"{PREFIX}{head}.weight"] = timm_lib.kernel_to_torch(
        trainable["head"]["kernel"], "head/kernel"
    )
    tensors[f"{PREFIX}{head}.bias"] = _np(trainable["head"]["bias"])
    config.update(
        modules_to_save=[head],
        task_type=None,
        inference_mode=True,
        base_model_name_or_path=None,
        revision=None,
        **{META: meta},
    )
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(directory, WEIGHTS)
    )
    if updates:
        save_file(updates, os.path.join(directory, BASE_UPDATES))
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return f"array{tuple(np.shape(x))}"
    return x


def load_peft(directory: str, params: Any, *, base: str = "timm") -> Loaded:
    """Reads a PEFT adapter into a guft_jax method and trainable tree.

    Fused timm ``qkv`` adapters become split q/k/v ones where that is exact; the task head comes
    from ``modules_to_save`` (else ``params["head"]``).

    Args:
      directory: holding ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base params (guft_jax layout) the adapter was trained on.
      base: ``"timm"`` or ``"hf"``: the PyTorch model the adapter's module names refer to.

    Returns:
      :class:`Loaded` ``(method, trainable, params)``.

    Raises:
      ValueError: one line naming an unknown ``peft_type``, a target that is not a Linear of
        the ViT, or tensors the format does not have.
    """
    timm_lib.check_base(base)
    from safetensors.numpy import load_file

    with open(os.path.join(directory, CONFIG)) as f:
        config = json.load(f)
    ptype = config.get("peft_type")
    if ptype not in _BY_TYPE:
        raise ValueError(f"load_peft: peft_type {ptype!r} not in {sorted(_BY_TYPE)}")
    tensors = dict(load_file(os.path.join(directory, WEIGHTS)))
    head_name = "head" if base == "timm" else "classifier"
    head = dict(params["head"])
    for leaf, key in (("kernel", "weight"), ("bias", "bias")):
        v = tensors.pop(f"{PREFIX}{head_name}.{key}", None)
        if v is not None:
            head[leaf] = jnp.asarray(v.T if leaf == "kernel" else v)
    upd_path = os.path.join(directory, BASE_UPDATES)
    if os.path.exists(upd_path):
        params = _apply_updates(params, load_file(upd_path), base)
    method, group = _BY_TYPE[ptype].load(config, tensors, params, base)
    return Loaded(method, {"head": head, **group}, params)


def _apply_updates(params: Any, state: dict, base: str) -> Any:
    from guft_jax import checkpoint_import as ci

    num_heads = _num_heads(params)
    if base == "timm":
        flat, unknown = timm_lib.timm_to_flat(state, num_heads=num_heads)
    else:
        flat, unknown = ci.hf_to_flat(state, num_heads=num_heads)
    if unknown:
        raise ValueError(f"load_peft: base updates with unknown names {unknown[:4]}")
    return paths_lib.replaced(params, {k: jnp.asarray(v) for k, v in flat.items()})


def _num_heads(params: Any) -> int:
    k = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]
    return int(k["kernel"].shape[1])
