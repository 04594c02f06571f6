"""Boolean parameter masks (True = trainable): eligibility, exact top-k, OR-merge, reports.

Masks here are dicts ``{key: bool array}`` over the *eligible* leaves (``key`` is the leaf's
``/``-joined path with ``/`` -> ``.``), the layout GUFT keeps in its state.

- Eligibility (:data:`ELIGIBILITY`, :func:`eligible_leaves`): which leaves a selective method may
  edit, as a named preset plus include/exclude regexes.
- Selection (:func:`topk_mask`): exactly ``k`` entries, optionally after a per-tensor score
  normalisation, always honouring an ``exclude`` mask (GUFT's ``exclude_selected``). Budget
  allocations (``N`` selectable entries, ``s_t`` those of tensor ``t``):

  - ``"global"`` (the GUFT paper): one ranking over all entries of all tensors.
  - ``"per_tensor"``: tensor ``t`` gets ``k_t = k·s_t/N`` rounded by the largest-remainder
    (Hamilton) method (:func:`largest_remainder`: each ``k_t`` the floor or ceiling of its share,
    ``Σ k_t = k``, remainder ties to the earlier sorted key) and keeps its top ``k_t``. A global
    ranking concentrates in the tensors with the largest gradient sums (the patch embedding);
    this spreads the budget like the parameters.
  - ``"per_row"``: GPS-style (arXiv:2312.10136) quota per output unit: each tensor's ``k_t`` is
    split over the columns of its 2-D ``(d_in, d_out)`` view (:func:`row_view`) by
    water-filling: every row gets ``min(c_r, q)`` (``c_r`` its selectable entries, ``q`` the
    largest level with ``Σ_r min(c_r, q) ≤ k_t``), the rest one each to rows with ``c_r > q``
    ranked by their ``(q+1)``-th best score (ties: lower row). Without ``exclude`` every row
    gets ``⌊k_t/R⌋`` or ``⌈k_t/R⌉``.

  ``normalize="mean"`` divides each tensor's scores by their mean over its selectable finite
  entries (a non-positive mean leaves it unscaled); it changes ``"global"`` only.
  Order (:func:`order_key`): float32 with NaN as -inf and -0.0 == 0.0; ties go to the lower flat
  position in the concatenation of the tensors in sorted-key order; excluded entries rank
  strictly below every selectable one. Under ``jax.jit`` the result is the same (the quotas are
  then computed in the program, :func:`largest_remainder_traced`).
- Reports (:func:`mask_report`, :func:`budget_breakdown`): where the budget went, per tensor,
  per module type and per layer.
"""

from guft_jax.masks.eligibility import (
    ELIGIBILITY,
    SEP,
    eligible_leaves,
    kernel_view,
    key_path,
    leaf_key,
    row_view,
)
from guft_jax.masks.quotas import (
    check_traced_bound,
    given_quotas,
    largest_remainder,
    largest_remainder_traced,
)
from guft_jax.masks.report import budget_breakdown, layer_of, mask_report, module_type
from guft_jax.masks.topk import (
    ALLOCATIONS,
    NORMALIZATIONS,
    budget,
    count,
    is_traced,
    merge_masks,
    order_key,
    per_leaf_counts,
    select_global,
    select_per_row,
    select_per_tensor,
    topk_mask,
)

__all__ = [
    "ALLOCATIONS",
    "ELIGIBILITY",
    "NORMALIZATIONS",
    "SEP",
    "budget",
    "budget_breakdown",
    "check_traced_bound",
    "count",
    "eligible_leaves",
    "given_quotas",
    "is_traced",
    "kernel_view",
    "key_path",
    "largest_remainder",
    "largest_remainder_traced",
    "layer_of",
    "leaf_key",
    "mask_report",
    "merge_masks",
    "module_type",
    "order_key",
    "per_leaf_counts",
    "row_view",
    "select_global",
    "select_per_row",
    "select_per_tensor",
    "topk_mask",
]
