"""Trainable-parameter accounting, printed at the start of every run (head counted apart)."""

from __future__ import annotations

import math
from typing import Any

import jax

from guft_jax import paths
from guft_jax.methods.base import Method


def _size(x) -> int:
    return math.prod(getattr(x, "shape", ()))


def per_tensor(trainable: Any, state: Any = None) -> dict[str, int]:
    """Trained numbers per tensor (GUFT: the selected entries per eligible tensor)."""
    if isinstance(state, dict) and ("count" in state or "mask" in state):
        from guft_jax.guft import selected_counts

        return selected_counts(state)
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        path = paths.key_to_str(p)
        if not path.startswith("head/"):
            out[path] = _size(x)
    return out


def count_trainable(trainable: Any, state: Any = None) -> tuple[int, int]:
    """``(method_params, head_params)``."""
    head = sum(_size(x) for x in jax.tree_util.tree_leaves(trainable.get("head", {})))
    return sum(per_tensor(trainable, state).values()), head


def trainable_report(method: Method, params: Any, trainable: Any, state: Any = None) -> str:
    """A short report: per-tensor counts (largest first, 12 shown), total, % of the backbone."""
    backbone = sum(_size(x) for k, v in params.items() if k != "head" for x in jax.tree.leaves(v))
    tensors = per_tensor(trainable, state)
    total, head = count_trainable(trainable, state)
    lines = [
        f"method {method.name} {method.hparams}",
        f"  trainable: {total:,} params = {100 * total / max(backbone, 1):.4f}% of the "
        f"{backbone:,}-param backbone, + head {head:,}",
    ]
    shown = sorted(tensors.items(), key=lambda kv: -kv[1])[:12]
    lines += [f"    {n:>10,}  {k}" for k, n in shown if n]
    if len(tensors) > len(shown):
        lines.append(f"    ... {len(tensors) - len(shown)} more tensors")
    return "\n".join(lines)
