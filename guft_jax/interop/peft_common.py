"""The PEFT converter table's types and the helpers its entries share.

A :class:`Converter` is one table entry of :data:`guft_jax.interop.peft_io.CONVERTERS`: a pair of
pure functions between a guft_jax method's trainable tree and PEFT 0.17's adapter config and
tensors. The helpers map guft_jax kernel paths to PyTorch module names (timm's fused ``qkv``
included), parse PEFT state-dict keys and fold per-module ranks and scales into one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax.interop import timm_io as timm_lib
from guft_jax.methods import base as base_lib
from guft_jax.methods import weight_space as ws

PREFIX = "base_model.model."


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


def to_np(x) -> np.ndarray:
    """A (device) array as a float32 numpy array, the dtype PEFT's tensors are saved in."""
    return np.asarray(jax.device_get(x), np.float32)


def factor_getter(tree: dict) -> Callable[[str, str], np.ndarray]:
    """``get(path, name)``: the factor ``name`` of the kernel at ``path`` in a method's trainable
    group ``tree`` (keyed by :func:`guft_jax.methods.weight_space.key`), as float32 numpy."""
    return lambda path, name: to_np(tree[ws.key(path)][name])


def kernel_dims(params, path: str) -> tuple[int, int]:
    """``(in, out)`` of the kernel at ``path``."""
    return tuple(ws.matrix(params, path).shape)


def by_module(paths: list[str], base: str) -> dict[str, dict[int | None, str]]:
    """Groups kernel paths by PyTorch module: ``{module: {block: path}}``."""
    out: dict[str, dict] = {}
    for p in paths:
        mod, blk = timm_lib.torch_linear(p, base)
        out.setdefault(mod, {})[blk] = p
    return out


def refuse_fused(method: str, groups: dict) -> None:
    """Raises a one-line ``ValueError`` if ``method`` adapts timm's fused ``qkv`` (no exact split
    form): ``groups`` as :func:`by_module` returns them."""
    for mod, blocks in groups.items():
        if None not in blocks:
            raise ValueError(
                f"save_peft: {method} on timm's fused {mod} has no exact split form; "
                "adapt other layers or export with base='hf'"
            )


def pattern_key(module: str) -> str:
    """A PEFT ``*_pattern`` key matching exactly ``module``: its name after the first dot,
    escaped (LoRA matches keys as ``(.*\\.)?key$``, FourierFT as ``.*\\.key$``)."""
    return re.escape(module.split(".", 1)[1] if "." in module else module)


def pattern_lookup(pattern: dict, module: str, default):
    """PEFT's ``get_pattern_key`` rule: the first key whose regex matches the name's tail."""
    for k, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def exact_targets(paths: list[str]) -> tuple[str, ...]:
    """Target regexes that match exactly ``paths`` (a method's ``targets`` for a loaded adapter)."""
    return tuple(f"^{re.escape(p)}$" for p in paths)


def split_rows(module: str, base: str, params) -> list[tuple[str, slice]]:
    """``[(guft kernel path, row slice of the PyTorch weight)]`` of a PyTorch Linear (three row
    blocks for timm's fused ``qkv``)."""
    layers = timm_lib.guft_linear(module, base)
    d = kernel_dims(params, f"{layers[0]}/kernel")[1]
    return [(f"{lay}/kernel", slice(j * d, (j + 1) * d)) for j, lay in enumerate(layers)]


def parse_tensors(tensors: dict, suffixes: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
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


def fuse_qkv(blocks: dict, get: Callable, stack: tuple[str, ...], diag: tuple[str, ...], d: int):
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


def one_rank(per_path: dict, fold: str, pad_rows: tuple[str, ...]):
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


class ViTShape(NamedTuple):
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
