"""Trainable-parameter accounting, printed at the start of every run (head counted apart).

Counts come from the method itself (``MethodHooks.trained``, default: the size of every non-head
trainable leaf), keyed by ``/``-joined param paths, so no method is special-cased here.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from guft_jax.methods.base import Method, head_count, trained_counts


def _size(x) -> int:
    return math.prod(getattr(x, "shape", ()))


def per_tensor(method: Method, params: Any, trainable: Any, state: Any = None) -> dict[str, int]:
    """Trained numbers per backbone tensor (GUFT: the selected entries per eligible tensor)."""
    return trained_counts(method, params, trainable, state)


def count_trainable(method: Method, params: Any, trainable: Any, state: Any = None):
    """``(method_params, head_params)``."""
    return sum(per_tensor(method, params, trainable, state).values()), head_count(trainable)


def trainable_report(
    method: Method, params: Any, trainable: Any, state: Any = None, *, backbone: int | None = None
) -> str:
    """A short report: per-tensor counts (largest first, 12 shown), total, % of the backbone
    (``backbone``: its size before ``prepare_base``, which may pack or quantise the tree)."""
    if backbone is None:
        backbone = sum(
            _size(x) for k, v in params.items() if k != "head" for x in jax.tree.leaves(v)
        )
    tensors = per_tensor(method, params, trainable, state)
    total, head = sum(tensors.values()), head_count(trainable)
    lines = [
        f"method {method.name} {method.hparams or {}}",
        f"  trainable: {total:,} params = {100 * total / max(backbone, 1):.4f}% of the "
        f"{backbone:,}-param backbone, + head {head:,}",
    ]
    shown = sorted(tensors.items(), key=lambda kv: -kv[1])[:12]
    lines += [f"    {n:>10,}  {k}" for k, n in shown if n]
    if len(tensors) > len(shown):
        lines.append(f"    ... {len(tensors) - len(shown)} more tensors")
    return "\n".join(lines)
