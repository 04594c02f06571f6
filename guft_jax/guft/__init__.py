"""GUFT — Gradual Unfreeze Fine-Tuning (docs: GUFT guide), and one-shot saliency masks.

At the start of each epoch of the schedule (1-indexed) a saliency pass sums ``|∇L|`` over the
training set at the current weights (:mod:`guft_jax.saliency`), the top
``k = round(ratio · N_eligible)`` entries become a new mask (:func:`guft_jax.masks.topk_mask`,
``allocation`` says how the budget is spread) and it is OR-merged into the mask so far. Only
masked entries (and the head) train.

Defaults, and why (each a documented choice):

- ``eligible="blocks"``: the encoder blocks' Dense kernels and biases, what GPS/SPT-style sparse
  fine-tuning selects from. ``"all"`` is the paper's literal rule (every backbone tensor); with it
  the patch embedding, whose gradient sums over every patch of every image, took 94% of the
  budget in our offline benchmark and GUFT fell below LoRA; restricted to the blocks it did not.
- ``recompute_epochs=None``: :func:`auto_schedule` of the run length, the rounds spread like the
  paper's E_list ``[1, 6, 11]`` of 100 epochs (which it equals at 100 epochs).
- ``head_warmup=True``: our task head starts at zero (as vit_jax's), so the backbone's gradient,
  and GUFT's saliency, is exactly zero until the head has trained. A recompute that meets an
  all-zero head takes its saliency through a head fitted on the frozen backbone first
  (:func:`warm_head`, one pass over the training set; the run's head is untouched). A round whose
  scores are still all zero is an error.
- ``ratios=(0.001,) * 3``: the paper's 0.1% per round.

Both stores parametrise the backbone as ``W = W0 + δ`` and train ``δ`` (so AdamW's decoupled
weight decay pulls toward the pretrained weights, and the two stores follow one trajectory):

- ``sparse=False`` — the dense reference store (:class:`DenseStore`): ``δ`` is a dense tree of the
  eligible leaves, an element-level mask goes to the optimizer through ``update_mask``; entries
  outside it stay exactly 0, so the effective weights stay bitwise equal to ``W0`` there.
- ``sparse=True`` (default) — the efficient store (:class:`SparseStore`): per eligible leaf a
  fixed-capacity vector of flat indices (in the state) and values ``δ`` (trainable), padded with an
  out-of-range index. Linear kernels are intercepted at ``vit.Linear.matmul``, whose replacement
  (:func:`guft_jax.ops.sparse_delta_matmul`) computes the weight gradient only at the selected
  entries; other leaves use ``W0.ravel().at[idx].add(δ)``. Optimizer state ∝ the capacity.

Capacity (sparse store, :func:`capacity_rule`): sized at the first recompute for the whole schedule,
so a run traces its step once. The budget ``K = Σ k_i`` is known up front but not its split over
tensors. A round ``i`` adds at most ``k_i`` entries (its top-``k_i``, merged), so a tensor holding
``c₁`` entries after the first round never holds more than ``c₁ + K − k₁``: a proven bound, but ``K
− k₁`` slots for every tensor, which the step's scatters and gathers all visit (DINOv2-S/14, 56 px,
10 epochs, 2 busy CPU cores, ``fit_bench --compare runs``: one trace, but train epochs of 126 s and
compiles of 65 s against 92 s and 52 s with the estimate below, also one trace). So each tensor gets
``min(size, c₁ + K − k₁, max(floor, ⌈slack·c₁·K/k₁⌉, ⌈slack·K·size/N⌉))``: the bound where it is the
smaller (small tensors, biases), else ``slack`` times the first round's split scaled to the budget;
a later round overflowing that grows it (values and Adam moments zero-padded; one retrace, logged).
Per kernel, the row × column block is sized at the first round for the growth the schedule allows
(:func:`block_capacity`) and then fixed; a later round whose rows or columns outgrow it switches
that kernel's weight gradient to the block-free SDDMM at run time (``lax.cond`` on
:func:`guft_jax.ops.block_covers`, logged), without a retrace. Resuming restores the capacities
(``MethodHooks.resize``). Padding and unused slots hold ``δ = 0`` with zero gradient and moments, so
a newly selected entry starts with zero Adam moments (Adam's bias correction uses the global step).

Modules: :mod:`~guft_jax.guft.schedule` (recompute epochs, ratios, budgets),
:mod:`~guft_jax.guft.state` (configuration and state), :mod:`~guft_jax.guft.stores` (the dense
and sparse delta stores), :mod:`~guft_jax.guft.indices` (index vectors and the flat store),
:mod:`~guft_jax.guft.blocks` (per-kernel blocks and the intercepted matmul),
:mod:`~guft_jax.guft.capacity` (quotas and the capacity rule), :mod:`~guft_jax.guft.ranking`
(a round's selection), :mod:`~guft_jax.guft.recompute` (saliency, head warm-up, the round),
:mod:`~guft_jax.guft.readout` (what a run selected, the artifact format),
:mod:`~guft_jax.guft.method` (:func:`guft`) and :mod:`~guft_jax.guft.one_shot` (the one-shot and
quota methods).
"""

from guft_jax.guft.blocks import (
    BLOCK_SLACK,
    block_capacity,
    store_dims,
)
from guft_jax.guft.capacity import (
    QUOTA_RULES,
    capacity_rule,
    quota_budgets,
)
from guft_jax.guft.method import (
    guft,
)
from guft_jax.guft.one_shot import (
    ONESHOT_INFO,
    ONESHOT_SCORES,
    oneshot,
    quota_oneshot,
)
from guft_jax.guft.ranking import (
    select,
    topk_merge_global,
)
from guft_jax.guft.readout import (
    apply_arrays,
    selected_counts,
    selected_indices,
    selection,
    store_payload,
)
from guft_jax.guft.recompute import (
    random_scores,
    saliency_scores,
    warm_head,
)
from guft_jax.guft.schedule import (
    auto_schedule,
    round_budgets,
    schedule_steps,
    store_needs,
    validate_ratios,
    validate_schedule,
)
from guft_jax.guft.state import (
    ALLOCATIONS,
    ELIGIBLE,
    GuftConfig,
    GuftState,
)
from guft_jax.guft.stores import (
    DeltaStore,
    DenseStore,
    SparseStore,
)

__all__ = [
    "ALLOCATIONS",
    "BLOCK_SLACK",
    "DeltaStore",
    "DenseStore",
    "ELIGIBLE",
    "GuftConfig",
    "GuftState",
    "ONESHOT_INFO",
    "ONESHOT_SCORES",
    "QUOTA_RULES",
    "SparseStore",
    "apply_arrays",
    "auto_schedule",
    "block_capacity",
    "capacity_rule",
    "store_payload",
    "guft",
    "store_dims",
    "oneshot",
    "quota_budgets",
    "quota_oneshot",
    "random_scores",
    "round_budgets",
    "saliency_scores",
    "schedule_steps",
    "select",
    "selected_counts",
    "selected_indices",
    "selection",
    "store_needs",
    "topk_merge_global",
    "validate_ratios",
    "validate_schedule",
    "warm_head",
]
