"""Reports: where a mask's budget went, per tensor, per module type and per layer."""

from __future__ import annotations

import math
import re

import jax
import numpy as np

from guft_jax.masks.eligibility import SEP, key_path
from guft_jax.masks.topk import per_leaf_counts


def layer_of(key: str) -> str:
    """``"encoderblock_<i>"`` for a leaf inside an encoder block, else ``"other"``."""
    return next((p for p in key.split(SEP) if p.startswith("encoderblock_")), "other")


def mask_report(mask: dict, *, top: int | None = None) -> dict:
    """Per-tensor selected counts, per module type and layer, and the total density."""
    per = {k: int(v) for k, v in jax.device_get(per_leaf_counts(mask)).items()}
    n = sum(math.prod(np.shape(m)) for m in mask.values())
    total = sum(per.values())
    by_type: dict[str, int] = {}
    by_layer: dict[str, int] = {}
    for k, c in per.items():
        by_type[module_type(k)] = by_type.get(module_type(k), 0) + c
        by_layer[layer_of(k)] = by_layer.get(layer_of(k), 0) + c
    tensors = dict(sorted(per.items(), key=lambda kv: -kv[1])[:top]) if top else per
    return {
        "selected": total,
        "eligible": n,
        "density": total / max(n, 1),
        "per_tensor": tensors,
        "per_module_type": by_type,
        "per_layer": by_layer,
    }


def budget_breakdown(mask: dict, eligible_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Where a mask's budget went: selected/eligible counts and density per module type and layer.

    For plots and run reports: the same mask under different eligibility
    presets or allocations is compared by these rows. An eligible key missing from ``mask``
    counts as 0 selected, so every module type and layer of the eligible set appears.

    Args:
      mask: ``{key: bool array}``, keys a subset of ``eligible_shapes``.
      eligible_shapes: ``{key: shape}`` as returned by :func:`eligible_leaves`.

    Returns:
      ``{"total": row, "per_module_type": {type: row}, "per_layer": {layer: row}}`` with
      ``row = {"selected": int, "eligible": int, "density": float}``; layers are
      ``"encoderblock_<i>"`` in block order, then ``"other"`` (embeddings, ``cls``,
      ``encoder_norm``).

    Raises:
      ValueError: a mask key that is not eligible, or whose shape differs.

    >>> m = {"a.kernel": np.array([True, False]), "b.bias": np.array([False])}
    >>> budget_breakdown(m, {"a.kernel": (2,), "b.bias": (1,)})["total"]
    {'selected': 1, 'eligible': 3, 'density': 0.3333333333333333}
    """
    for key, m in mask.items():
        if key not in eligible_shapes or tuple(np.shape(m)) != tuple(eligible_shapes[key]):
            raise ValueError(
                f"mask: key {key!r} with shape {np.shape(m)} is not an eligible leaf "
                f"({eligible_shapes.get(key)})"
            )
    per = {k: int(v) for k, v in jax.device_get(per_leaf_counts(mask)).items()}

    def rows(group) -> dict:
        acc: dict[str, list[int]] = {}
        for key, shape in eligible_shapes.items():
            row = acc.setdefault(group(key), [0, 0])
            row[0] += per.get(key, 0)
            row[1] += math.prod(shape)
        return {
            g: {"selected": s, "eligible": n, "density": s / max(n, 1)} for g, (s, n) in acc.items()
        }

    def layer_order(name: str) -> tuple[int, int]:
        m = re.fullmatch(r"encoderblock_(\d+)", name)
        return (0, int(m.group(1))) if m else (1, 0)

    by_layer = rows(layer_of)
    empty = {"selected": 0, "eligible": 0, "density": 0.0}
    return {
        "total": rows(lambda _: "total").get("total", empty),
        "per_module_type": dict(sorted(rows(module_type).items())),
        "per_layer": {g: by_layer[g] for g in sorted(by_layer, key=layer_order)},
    }


def module_type(key: str) -> str:
    """A coarse module type of a leaf key, for reports and plots."""
    p = key_path(key)
    for name, tag in (
        ("/query/", "attn.query"),
        ("/key/", "attn.key"),
        ("/value/", "attn.value"),
        ("/out/", "attn.out"),
        ("Dense_0", "mlp.fc1"),
        ("Dense_1", "mlp.fc2"),
        ("LayerNorm", "layernorm"),
        ("encoder_norm", "layernorm"),
        ("LayerScale", "layerscale"),
        ("pos_embedding", "pos_embed"),
        ("embedding", "patch_embed"),
        ("cls", "cls"),
    ):
        if name in p or p == name:
            return tag + (
                "" if tag in ("layernorm", "cls", "pos_embed") else "." + p.split("/")[-1]
            )
    return "other"
