"""PEFT's SHiRA sparse adapter (arXiv:2406.13175) for GUFT and the one-shot masks.

A selection (indices + values per kernel) is saved as SHiRA's per-Linear indices and weights,
padded with zero-valued entries to one ``r``; what SHiRA cannot hold (a layer denser than its
budget, selected tensors that are not Linear weights) goes to ``base_updates.safetensors`` as
merged tensors in the base's names. Read back, it is :func:`shira_explicit`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from guft_jax import paths as paths_lib
from guft_jax.interop import timm_io as timm_lib
from guft_jax.interop.peft_common import (
    Converter,
    Ctx,
    ViTShape,
    kernel_dims,
    parse_tensors,
    split_rows,
    to_np,
)
from guft_jax.methods import base as base_lib
from guft_jax.methods import weight_space as ws

SHIRA = "peft_shira"  # the name of the fixed-entries method SHiRA adapters load into


def _shira_save(ctx: Ctx) -> tuple[dict, dict]:
    payload = base_lib.export_arrays(ctx.method, ctx.params, ctx.trainable, ctx.state)
    sel: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in payload:
        if name.startswith("guft/") and name.endswith("/indices"):
            p = name[len("guft/") : -len("/indices")]
            sel[p] = (np.asarray(payload[name]), to_np(payload[f"guft/{p}/values"]))
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
        d_in, d_out = kernel_dims(ctx.params, p)
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
    full = exporter(paths_lib.replaced(ctx.params, upd), ViTShape(ctx.params))
    orig = exporter(ctx.params, ViTShape(ctx.params))
    return {k: v for k, v in full.items() if not np.array_equal(v, orig[k])}


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
        out = {f"head/{k}": to_np(v) for k, v in trainable["head"].items()}
        for k, v in trainable["shira"].items():
            out[f"guft/{ws.path_of(k)}/indices"] = idx[ws.path_of(k)]
            out[f"guft/{ws.path_of(k)}/values"] = to_np(v)
        return out

    hooks = base_lib.MethodHooks(export=export)
    return ws.method(SHIRA, init=init_fn, merge=merge, hparams=dict(tensors=len(idx)), hooks=hooks)


def _shira_load_method(config, tensors, params, base):
    mods = parse_tensors(tensors, ("shira_indices", "shira_weight"))
    idx, group = {}, {}
    for mod, t in mods.items():
        ij = np.asarray(t["shira_indices"]).astype(np.int64)
        w = t["shira_weight"] * np.float32(config.get("scaling", 1.0))
        for path, rows in split_rows(mod, base, params):
            d_in, d_out = kernel_dims(params, path)
            lo = rows.start or 0
            hit = (ij[0] >= lo) & (ij[0] < lo + d_out) & (w != 0)
            if not np.any(hit):
                continue
            idx[path] = (ij[1][hit] * d_out + (ij[0][hit] - lo)).astype(np.int32)
            group[ws.key(path)] = jnp.asarray(w[hit])
    return shira_explicit(idx), {"shira": group}


SPARSE = Converter("SHIRA", _shira_save, _shira_load_method)
