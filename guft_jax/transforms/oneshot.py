"""One-shot saliency masks (SNIP, SalUN, Fisher, GUFT's score, magnitude) over any param pytree,
to feed :func:`~guft_jax.transforms.masked`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from guft_jax import masks as masks_lib
from guft_jax.transforms.leaves import DEFAULT_HEAD, PyTree, eligibility, full_mask
from guft_jax.transforms.unfreeze import check_scores, check_selection_options, scores_of


def oneshot_mask(
    scores: PyTree,
    *,
    ratio: float | None = None,
    k: int | None = None,
    eligible: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = DEFAULT_HEAD,
    allocation: str = "global",
    normalize: str | None = None,
) -> PyTree:
    """A one-shot saliency mask (docs: sparse methods): the exact top-``k`` of ``scores`` over the
    eligible entries, ``head`` leaves True, every other leaf False; feed it to :func:`masked`.

    The scores say which method it is: :func:`guft_jax.saliency.compute` with
    ``score="snip"`` (``|g ⊙ w|`` on one batch), ``"salun"`` (``|Σ g|``), ``"fisher"``
    (``Σ g²``), ``"guft"`` (``Σ|g|``), or ``|w|`` for magnitude (:func:`magnitude_mask`).

    Args:
      scores: a score pytree shaped like the params.
      ratio: fraction of the eligible entries (``k = round(ratio · N)``); or give ``k``.
      k: the number of entries.
      eligible, include, exclude, head, allocation, normalize: as :func:`gradual_unfreeze`.

    Returns:
      A bool pytree shaped like ``scores`` with exactly ``k`` True entries outside ``head``.

    Raises:
      ValueError: neither or both of ``ratio`` and ``k``, an invalid option, or scores that
        are all zero or not finite over the eligible entries.

    >>> s = {"head": {"w": jnp.ones(2)}, "a": jnp.array([3.0, 1.0, 2.0])}
    >>> m = oneshot_mask(s, k=2)
    >>> m["a"].tolist(), m["head"]["w"].tolist()
    ([True, False, True], [True, True])
    """
    if (ratio is None) == (k is None):
        raise ValueError("ratio, k: give exactly one of them")
    check_selection_options(allocation, normalize, eligible)
    sel = eligibility(scores, eligible=eligible, include=include, exclude=exclude, head=head)
    n = sum(math.prod(s) for s in sel.eligible.values())
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
        k = masks_lib.budget(ratio, n)
    kw = {} if normalize is None else dict(normalize=normalize)
    picked = scores_of(scores, sel)
    check_scores(picked, "oneshot_mask")
    chosen = masks_lib.topk_mask(picked, k, allocation=allocation, **kw)
    return full_mask(scores, sel, chosen)


def magnitude_mask(params: PyTree, **kwargs: Any) -> PyTree:
    """The magnitude (lottery-ticket) mask: :func:`oneshot_mask` of ``|w|``.

    >>> magnitude_mask({"w": jnp.array([0.1, -3.0, 2.0])}, k=1, head=None)["w"].tolist()
    [False, True, False]
    """
    return oneshot_mask(jax.tree_util.tree_map(jnp.abs, params), **kwargs)
