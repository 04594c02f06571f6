"""How many entries GUFT selects and stores: the quota methods' per-tensor budgets and the sparse
store's capacity rule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from guft_jax import paths

QUOTA_RULES = ("rank", "row")


def capacity_rule(eligible: dict, total_budget: int, k1: int, *, slack: float, floor: int):
    """``capacities(current, needed, first=False, whole=None) -> new`` for the sparse store.

    The budget ``K = Σ k_i`` is known up front but not its split over tensors. A round ``i`` adds
    at most ``k_i`` entries, so a tensor holding ``c₁`` entries after the first round never holds
    more than ``c₁ + K − k₁``: a proven bound, but ``K − k₁`` slots for every tensor, which the
    step's scatters and gathers all visit. So at the first round each tensor gets
    ``min(size, max(c₁ + K − k₁, 1), max(floor, ⌈slack·c₁·K/k₁⌉, ⌈slack·K·size/N⌉, ⌈slack·w⌉))``
    (at least ``c₁``, and one slot: orbax cannot save a zero-size array): the bound where it is
    the smaller (small tensors, biases), else ``slack`` times the larger of the first round's
    split scaled to the budget, the tensor's share of the eligible entries, and ``w``, its entries
    among the top ``K`` of the first round's scores (``whole``, :func:`whole_budget_counts`; the
    split the whole budget would take if the scores did not move). Later, a capacity that a round
    overflows grows to ``slack`` times its need (one retrace, logged).

    Args:
      eligible: ``{key: shape}`` of the store's leaves.
      total_budget: ``K``, the whole schedule's budget.
      k1: the first round's budget.
      slack: the spare factor (>= 1).
      floor: the least capacity a tensor gets at the first round (capped by its bound).

    >>> rule = capacity_rule({"a": (100,), "b": (100,)}, 30, 10, slack=2.0, floor=1)
    >>> rule({"a": 1, "b": 1}, {"a": 10, "b": 0}, first=True, whole={"a": 12, "b": 18})
    {'a': 30, 'b': 20}
    """
    n_elig = sum(math.prod(s) for s in eligible.values())
    rest = max(total_budget - k1, 0)

    def capacities(current: dict, needed: dict, first: bool = False, whole=None) -> dict:
        out = {}
        for k, s in eligible.items():
            size, need = math.prod(s), needed[k]
            if first:
                want = max(
                    floor,
                    math.ceil(slack * need * total_budget / max(k1, 1)),
                    math.ceil(slack * total_budget * size / n_elig),
                    math.ceil(slack * whole[k]) if whole is not None else 0,
                )
                out[k] = max(need, min(size, max(need + rest, 1), want))
            elif need > current[k]:
                out[k] = min(size, max(need, math.ceil(slack * need)))
            else:
                out[k] = current[k]
        return out

    return capacities


def whole_budget_counts(scores: dict, total_budget: int) -> dict:
    """``{key: n}``: each tensor's entries among the ``total_budget`` largest ``scores`` (host
    numpy, one ``argpartition``: no program to compile; NaN ranks lowest, ties go either way).

    The first round's ranking extended to the whole schedule's budget: where the later rounds'
    entries land if saliency does not move, the estimate :func:`capacity_rule` sizes for.

    >>> whole_budget_counts({"a": np.array([3.0, 1.0]), "b": np.array([2.0, 0.0])}, 2)
    {'a': 1, 'b': 1}
    """
    keys = sorted(scores)
    host = jax.device_get([scores[k] for k in keys])
    parts = [np.nan_to_num(np.ravel(x).astype(np.float32), nan=-np.inf) for x in host]
    flat = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
    n = min(max(int(total_budget), 0), flat.size)
    if n == 0:
        return dict.fromkeys(keys, 0)
    top = np.argpartition(flat, flat.size - n)[flat.size - n :]
    ends = np.cumsum([p.size for p in parts])
    per = np.bincount(np.searchsorted(ends, top, side="right"), minlength=len(keys))
    return {k: int(c) for k, c in zip(keys, per, strict=True)}


def exact_capacities(current: dict, needed: dict) -> dict:
    """A one-round quota method's capacities: its per-tensor counts (no spare slot), >= 1."""
    return {key: max(needed[key], 1) for key in current}


def quota_budgets(
    name: str, quota: tuple[str, int], layout: Sequence[tuple[str, int]], eligible: dict
) -> tuple[dict, dict]:
    """``({key: k_t}, {key: (d_in, d_out)})`` of a quota method: ``("rank", r)``:
    ``r·(d_in + d_out)`` entries per tensor (SHiRA); ``("row", K)``: ``K·d_out`` (GPS), over the
    tensors' ``(in, out)`` views by the ``layout`` rules.

    Raises:
      ValueError: a budget larger than a tensor (``r·(d_in + d_out) > d_in·d_out``, as PEFT's
        SHiRA) or ``K > d_in``.
    """
    from guft_jax.methods.weight_space import matrix_shape  # (methods import this package)

    rule, n = quota
    views = {k: matrix_shape(paths.path_of(k), s, layout) for k, s in eligible.items()}
    quotas = {}
    for k, (d_in, d_out) in views.items():
        quotas[k] = n * (d_in + d_out) if rule == "rank" else n * d_out
        if (rule == "rank" and quotas[k] > d_in * d_out) or (rule == "row" and n > d_in):
            field = "r" if rule == "rank" else "k"
            raise ValueError(
                f"{name}.{field}: {n} selects more than {paths.path_of(k)} "
                f"(d_in, d_out) = {(d_in, d_out)} holds"
            )
    return quotas, views
