"""GUFT's schedule: the recompute epochs (or steps) and the per-round ratios and budgets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from guft_jax import masks as masks_lib


def validate_schedule(recompute_epochs: Sequence[int], ratios: Sequence[float]) -> None:
    """Raises ValueError naming the field unless the schedule is well-formed.

    Raises:
      ValueError: no epoch, a ratio count unlike the epochs', an epoch below 1 or out of order,
        or a bad ratio (:func:`validate_ratios`).
    """
    e, r = list(recompute_epochs), list(ratios)
    if not e:
        raise ValueError("guft.recompute_epochs: must name at least one epoch (1-indexed)")
    if len(e) != len(r):
        raise ValueError(
            f"guft.ratios: needs one ratio per recompute epoch ({len(e)}), got {len(r)}"
        )
    if any((not isinstance(x, int | np.integer)) or x < 1 for x in e):
        raise ValueError(f"guft.recompute_epochs: must be integers >= 1 (1-indexed), got {e}")
    if sorted(set(e)) != e:
        raise ValueError(f"guft.recompute_epochs: must be strictly increasing, got {e}")
    validate_ratios(r)


def validate_ratios(r: Sequence[float]) -> None:
    """Raises ValueError (``guft.ratios``) unless every ratio is in ``(0, 1]`` and they sum to at
    most 1."""
    if not r:
        raise ValueError("guft.ratios: must name at least one round")
    if any(not 0 < x <= 1 for x in r):
        raise ValueError(f"guft.ratios: each must be in (0, 1], got {list(r)}")
    if sum(r) > 1 + 1e-12:
        raise ValueError(f"guft.ratios: total must be <= 1, got {sum(r)}")


def auto_schedule(epochs: int, rounds: int) -> list[int]:
    """The default recompute epochs of a run of ``epochs`` epochs with ``rounds`` rounds.

    The paper recomputes at epochs ``[1, 6, 11]`` of 100: rounds 5% of the run apart, starting at
    epoch 1. Here: start at epoch 1, ``gap = max(2, round(0.05 · epochs))`` (100 epochs:
    ``[1, 6, 11]``, the paper's E_list; 10 or 20 epochs: ``[1, 3, 5]``), the gap shrinking when the
    run is too short to hold the rounds (4 epochs, 3 rounds: ``[1, 2, 3]``).

    Raises:
      ValueError: fewer epochs than rounds.
    """
    if epochs < rounds:
        raise ValueError(
            f"guft.recompute_epochs: a {epochs}-epoch run cannot hold {rounds} rounds; give "
            "recompute_epochs explicitly or train longer"
        )
    gap = max(2, round(0.05 * epochs))
    if rounds > 1:
        gap = max(1, min(gap, (epochs - 1) // (rounds - 1)))
    return [1 + i * gap for i in range(rounds)]


def schedule_steps(recompute_epochs: Sequence[int], *, steps_per_epoch: int) -> list[int]:
    """Optimizer steps of GUFT's 1-indexed recompute epochs: the first step of each.

    Raises:
      ValueError: ``steps_per_epoch`` below 1, or epochs that are not strictly increasing
        integers >= 1.

    >>> schedule_steps([1, 6, 11], steps_per_epoch=16)
    [0, 80, 160]
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch}")
    e = [int(x) for x in recompute_epochs]
    if not e or e[0] < 1 or sorted(set(e)) != e:
        raise ValueError(f"recompute_epochs: must be strictly increasing integers >= 1, got {e}")
    return [(int(e) - 1) * steps_per_epoch for e in recompute_epochs]


def round_budgets(ratios: Sequence[float], n_eligible: int) -> list[int]:
    """Each round's ``k_i = round(ratio_i · N)`` (:func:`guft_jax.masks.budget`).

    Raises:
      ValueError: budgets that together exceed the ``N`` eligible entries.
    """
    ks = [masks_lib.budget(r, n_eligible) for r in ratios]
    if sum(ks) > n_eligible:
        raise ValueError(f"ratios: budgets {ks} exceed the {n_eligible} eligible entries")
    return ks


def store_needs(ks: Sequence[int], n_eligible: int) -> list[int]:
    """Slots a store of the union of the rounds needs once round ``i`` is done:
    ``min(N, k_0 + ... + k_i)``, at least 1 (orbax cannot save a zero-size array)."""
    return [max(1, min(n_eligible, sum(ks[: i + 1]))) for i in range(len(ks))]
