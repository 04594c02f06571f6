"""PEFT converters of adapters with seeded frozen parts: VeRA's projections, FourierFT's entries.

VeRA (arXiv:2310.11454) and FourierFT (arXiv:2405.03003) draw a frozen part from a seed, and the
two libraries draw differently: the adapter carries VeRA's projections both ways, and FourierFT's
entries are laid out in PEFT's ``torch.randperm`` order (:func:`torch_randperm`) out and kept
explicitly in (:func:`vera_explicit`, :func:`fourierft_explicit`). On timm's fused ``qkv``
neither has an exact split form (refused).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from guft_jax.interop.peft_common import (
    Converter,
    Ctx,
    by_module,
    exact_targets,
    kernel_dims,
    parse_tensors,
    pattern_key,
    refuse_fused,
    split_rows,
    to_np,
)
from guft_jax.methods import base as base_lib
from guft_jax.methods import fourierft as fourierft_lib
from guft_jax.methods import vera as vera_lib
from guft_jax.methods import weight_space as ws


def _vera_save(ctx: Ctx) -> tuple[dict, dict]:
    hp = ctx.method.hparams
    lam = ctx.trainable["vera"]
    paths = [ws.path_of(k) for k in lam]
    groups = by_module(paths, ctx.base)
    refuse_fused("vera", groups)
    dims = [kernel_dims(ctx.params, p) for p in paths]
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
        tensors[k] = tensors[f"{k}.default"] = to_np(v)
    for mod, blocks in groups.items():
        s = lam[ws.key(blocks[None])]
        tensors[f"{mod}.vera_lambda_b"] = to_np(s["lambda_b"])
        tensors[f"{mod}.vera_lambda_d"] = to_np(s["lambda_d"])
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
                "lambda_b": jnp.zeros((kernel_dims(params, p)[1],), jnp.float32),
            }
        return {"head": params["head"], "vera": out}

    def merge(params, trainable):
        deltas = {}
        for k, s in trainable["vera"].items():
            d_in, d_out = kernel_dims(params, ws.path_of(k))
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
    mods = parse_tensors(tensors, ("vera_lambda_b", "vera_lambda_d"))
    group = {}
    for mod, t in mods.items():
        ((path, _),) = split_rows(mod, base, params)
        group[ws.key(path)] = {
            "lambda_b": jnp.asarray(t["vera_lambda_b"]),
            "lambda_d": jnp.asarray(t["vera_lambda_d"]),
        }
    method = vera_explicit((a_all, b_all), exact_targets([ws.path_of(k) for k in group]))
    return method, {"vera": group}


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
    groups = by_module([ws.path_of(k) for k in coefs], ctx.base)
    refuse_fused("fourierft", groups)
    seed = int(hp["seed"] if hp.get("seed") is not None else 2024)
    tensors, n_pattern = {}, {}
    perms: dict[tuple[int, int], np.ndarray] = {}
    for mod, blocks in groups.items():
        path = blocks[None]
        d_in, d_out = kernel_dims(ctx.params, path)
        ent = _entries(ctx, path, (d_out, d_in))
        flat = ent[0].astype(np.int64) * d_in + ent[1]
        if (d_out, d_in) not in perms:
            perms[(d_out, d_in)] = np.argsort(torch_randperm(d_out * d_in, seed))
        pos = perms[(d_out, d_in)][flat]
        spec = np.zeros(int(pos.max()) + 1, np.float32)
        spec[pos] = to_np(coefs[ws.key(path)])
        tensors[f"{mod}.fourierft_spectrum"] = spec
        n_pattern[pattern_key(mod)] = spec.shape[0]
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
    targets = exact_targets(list(ent))

    def init_fn(rng, params):
        del rng
        ws.target_paths(params, targets, field="fourierft.targets")
        out = {ws.key(p): jnp.zeros((e.shape[1],), jnp.float32) for p, e in ent.items()}
        return {"head": params["head"], "fourierft": out}

    def merge(params, trainable):
        deltas = {}
        for k, c in trainable["fourierft"].items():
            p = ws.path_of(k)
            d_in, d_out = kernel_dims(params, p)
            deltas[p] = fourierft_lib.delta_w(c, jnp.asarray(ent[p]), (d_out, d_in), alpha).T
        return ws.add_deltas(params, deltas, trainable["head"])

    hp = dict(alpha=alpha, entries=ent, seed=None, targets=list(targets))
    return ws.method("fourierft", init=init_fn, merge=merge, hparams=hp)


def _fourierft_load_method(config, tensors, params, base):
    mods = parse_tensors(tensors, ("fourierft_spectrum",))
    seed = int(config["random_loc_seed"])
    entries, group = {}, {}
    for mod, t in mods.items():
        spec = t["fourierft_spectrum"]
        ((path, _),) = split_rows(mod, base, params)
        d_in, d_out = kernel_dims(params, path)
        idx = torch_randperm(d_out * d_in, seed)[: spec.shape[0]]
        entries[path] = np.stack([idx // d_in, idx % d_in])
        group[ws.key(path)] = jnp.asarray(spec)
    return fourierft_explicit(entries, float(config["scaling"])), {"fourierft": group}


VERA = Converter("VERA", _vera_save, _vera_load_method)
FOURIERFT = Converter("FOURIERFT", _fourierft_save, _fourierft_load_method)
