"""GUFT's configuration (validated hyperparameters) and its checkpointed method state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax

from guft_jax import kernels as kernels_lib
from guft_jax import masks as masks_lib
from guft_jax.guft.blocks import BLOCK_SLACK
from guft_jax.guft.schedule import auto_schedule
from guft_jax.guft.stores import DeltaStore, store_of

ELIGIBLE = ("all", "blocks")
# How the first round sizes the sparse store (:func:`guft_jax.guft.capacity_rule`): "split"
# scales the first round's split to the budget; "ranking" also sizes for the first round's
# ranking of the whole budget (the registered default: no later growth on our benchmarks).
CAPACITY_ESTIMATES = ("split", "ranking")
ALLOCATIONS = masks_lib.ALLOCATIONS


class GuftState(NamedTuple):
    """GUFT's method state (checkpointed). Keys of the dicts are eligible leaves' keys
    (``paths.key_of`` of the param path).

    - ``selected``: dense store: bool masks shaped like the leaves; sparse store: int32 flat
      indices of fixed capacity, padded with the leaf's size.
    - ``count``: selected entries per leaf (int32 scalars).
    - ``round``: recomputes done.
    - ``history``: per round, ``epoch``, ``k``, ``selected`` (total after the round) and the
      saliency ``batch_size`` (the ranking depends on it).
    - ``size``: entries per leaf (int32 scalars; the sparse store's padding index).
    - ``blocks``: sparse store, per kernel: ``{"rows", "cols"}``, the sorted unique rows and
      columns (of the layer's ``(in, out)`` matrix) that its entries lie in, padded with
      ``in`` / ``out`` to a capacity of their own; the weight gradient is taken on that
      sub-block where it is small (:func:`guft_jax.ops.block_sddmm`). Dense store: empty.
    """

    selected: dict
    count: dict
    round: jax.Array
    history: dict
    size: dict
    blocks: dict


@dataclasses.dataclass(frozen=True)
class GuftConfig:
    """GUFT's hyperparameters (validated by :func:`guft_jax.guft.guft`); the method's functions
    take it."""

    recompute_epochs: tuple[int, ...] | None
    ratios: tuple[float, ...]
    mode: str
    score: str
    exclude_selected: bool
    eligible: str
    allocation: str
    normalize: str | None
    include: tuple[str, ...] | None
    exclude: tuple[str, ...] | None
    sparse: bool
    capacity_slack: float
    capacity_floor: int
    blocks: bool
    chunk: int
    head_warmup: bool
    name: str
    block_slack: float = BLOCK_SLACK
    capacity_estimate: str = "split"
    kernels: kernels_lib.KernelOptions = dataclasses.field(
        default_factory=kernels_lib.KernelOptions
    )
    # One-shot methods with explicit per-tensor budgets (SHiRA, GPS; :func:`quota_oneshot`):
    # ("rank", r): r·(d_in + d_out) entries per tensor; ("row", K): K per output unit. None: the
    # ratios' budget. ``layout``: the (regex, n_in) rules of the tensors' (in, out) views there.
    quota: tuple[str, int] | None = None
    layout: tuple[tuple[str, int], ...] = ()
    seed: int = 0  # score "random": the permutation's seed
    # (ctx, eligible, dense_params, *, score, mode, chunk) -> (scores, info); None: the saliency
    # pass over ctx.batches() (:func:`guft_jax.guft.saliency_scores`). Not a hyperparameter.
    saliency_fn: Callable | None = None

    def eligible_of(self, params) -> dict:
        """``{key: shape}`` of the leaves this configuration may edit."""
        return masks_lib.eligible_leaves(params, self.include, self.exclude, preset=self.eligible)

    def store(self, params) -> DeltaStore:
        """The delta store over ``params``' eligible leaves."""
        opts = dict(floor=self.capacity_floor, blocks=self.blocks, block_slack=self.block_slack)
        opts.update(kernels=self.kernels)
        return store_of(self.eligible_of(params), sparse=self.sparse, **opts)

    def schedule(self, epochs: int) -> list[int]:
        """The recompute epochs of a run of ``epochs`` epochs."""
        return list(self.recompute_epochs or auto_schedule(epochs, len(self.ratios)))

    def hparams(self) -> dict:
        """The hyperparameters as a JSON-ready dict (what a run records)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("name", "quota", "layout", "seed", "saliency_fn", "kernels")
        }
        for k in ("recompute_epochs", "ratios", "include", "exclude"):
            out[k] = list(out[k]) if out[k] is not None else None
        out["kernels"] = kernels_lib.as_dict(self.kernels)
        return out
