"""Boolean parameter masks (True = trainable): eligibility, exact top-k, OR-merge, reports.

Masks here are dicts ``{key: bool array}`` over the *eligible* leaves (``key`` is the leaf's
``/``-joined path with ``/`` -> ``.``), the layout GUFT keeps in its state.

- Eligibility (:data:`ELIGIBILITY`, :func:`eligible_leaves`): which leaves a selective method may
  edit, as a named preset plus include/exclude regexes.
- Selection (:func:`topk_mask`): exactly ``k`` entries, by one of three budget allocations
  (``"global"``, ``"per_tensor"``, ``"per_row"``), optionally after a per-tensor score
  normalisation, always honouring an ``exclude`` mask (GUFT's ``exclude_selected``).
- Reports (:func:`mask_report`, :func:`budget_breakdown`): where the budget went, per tensor,
  per module type and per layer.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths, vit

SEP = "."

# Preset name -> regex over ``/``-joined param paths (``re.search``) choosing the leaves it
# names; ``None`` names every leaf. The head is never eligible, whatever the preset.
ELIGIBILITY: dict[str, str | None] = {
    # The GUFT paper's literal rule: every backbone parameter.
    "all": None,
    # The encoder blocks' Dense kernels and biases: attention query/key/value/out and the MLP's
    # two Dense layers. Not the patch embedding, cls, position embedding, LayerScale, LayerNorm
    # or encoder_norm.
    "blocks": (
        r"^Transformer/encoderblock_\d+/"
        r"(MultiHeadDotProductAttention_\d+/(query|key|value|out)|MlpBlock_\d+/Dense_[01])"
        r"/(kernel|bias)$"
    ),
}

ALLOCATIONS = ("global", "per_tensor", "per_row")
NORMALIZATIONS = (None, "mean")

# Order keys: int32 images of float32 scores that compare like the floats (NaN -> -inf) and
# leave one value, INT32_MIN, strictly below every score for entries that may never be chosen.
_EXCLUDED = np.iinfo(np.int32).min


def leaf_key(path: str) -> str:
    return path.replace("/", SEP)


def key_path(key: str) -> str:
    return key.replace(SEP, "/")


def eligible_leaves(
    params: Any,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
    *,
    preset: str = "all",
) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the eligible leaves: those the ``preset`` names, matching an
    ``include`` regex (all if None) and no ``exclude`` regex; never the head.

    Presets (:data:`ELIGIBILITY`):

    - ``"all"``: every backbone leaf, the GUFT paper's literal rule (seed 000). A global Σ|g|
      ranking over it is dominated by the patch embedding (its gradient sums over every patch of
      every image), ``cls`` and the LayerScale/bias vectors: on Animal-MNIST (issue 12) 94% of
      GUFT's entries landed in ``embedding/kernel`` and the attention/MLP kernels got ≤ 0.02%.
    - ``"blocks"``: the encoder blocks' Dense kernels and biases (attention query/key/value/out,
      MLP ``Dense_0``/``Dense_1``), what GPS (Zhang et al., arXiv:2312.10136) and SPT (He et al.,
      arXiv:2303.08566) select sparse entries from. Measured lead (issue 12, one seed, one task,
      DINOv2-S/14): 96.65 test vs 94.15 for ``"all"``, above LoRA r=8 (96.00).

    User regexes apply on top of the preset: the preset's leaves ∩ ``include`` − ``exclude``.

    Args:
      params: a Flax param tree (with or without a ``head``).
      include: regexes over ``/``-joined paths; a leaf must match one (all leaves if None).
      exclude: regexes over ``/``-joined paths; a leaf matching one is dropped.
      preset: a key of :data:`ELIGIBILITY`.

    Returns:
      ``{key: shape}`` in ``tree_leaves`` order.

    Raises:
      ValueError: an unknown preset (``guft.eligible``); a preset naming no leaf of ``params``; a
        regex matching no parameter, or an include regex matching no leaf of the preset
        (``guft.include`` / ``guft.exclude``); nothing eligible.

    >>> model = vit.build_model("ViT-tiny/4", num_classes=3)
    >>> params = vit.init_params(model, jax.random.key(0), 8)
    >>> sorted(eligible_leaves(params, preset="blocks"))[0]
    'Transformer.encoderblock_0.MlpBlock_3.Dense_0.bias'
    """
    if preset not in ELIGIBILITY:
        raise ValueError(
            f"guft.eligible: unknown preset {preset!r}; allowed: {sorted(ELIGIBILITY)}"
        )
    sel = paths.select(params, include, exclude, field="guft.include")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    all_paths = [paths.key_to_str(p) for p, _ in flat]
    rx = ELIGIBILITY[preset]
    named = [rx is None or re.search(rx, p) is not None for p in all_paths]
    if not any(n and not p.startswith("head/") for n, p in zip(named, all_paths, strict=True)):
        raise ValueError(
            f"guft.eligible: preset {preset!r} names no parameter of this model; "
            f"example paths: {all_paths[:6]}"
        )
    in_preset = [p for n, p in zip(named, all_paths, strict=True) if n]
    for pat in paths._as_list(include):
        if not any(re.search(pat, p) for p in in_preset):
            raise ValueError(
                f"guft.include: regex {pat!r} matches no parameter of preset {preset!r}"
            )
    out = {}
    for (_, x), path, n, m in zip(
        flat, all_paths, named, jax.tree_util.tree_leaves(sel), strict=True
    ):
        if n and m and not path.startswith("head/"):
            out[leaf_key(path)] = tuple(x.shape)
    if not out:
        raise ValueError("guft.include: no eligible parameter (the head is never eligible)")
    return out


def row_view(key: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D ``(d_in, d_out)`` view of a leaf for ``allocation="per_row"``.

    A ``kernel`` is viewed as :func:`guft_jax.vit.kernel_as_matrix` multiplies it (attention
    query/key/value ``(d, h, hd)`` -> ``(d, h·hd)``, out ``(h, hd, d)`` -> ``(h·hd, d)``, others
    ``(prod(shape[:-1]), shape[-1])``), so a row (output unit) is one column of that view. Every
    other leaf (biases, scales, embeddings) has no input dimension: ``(1, size)``, each entry is
    its own output unit.
    """
    if key.split(SEP)[-1] == "kernel" and len(shape) >= 1:
        return _kernel_view(key_path(key), tuple(shape))
    return 1, math.prod(shape)


@functools.lru_cache(maxsize=4096)
def _kernel_view(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    # Abstract evaluation of the model's own rule: one source of truth, no array allocated.
    out = jax.eval_shape(
        lambda w: vit.kernel_as_matrix(w, path), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    return int(out.shape[0]), int(out.shape[1])


def topk_mask(
    scores: dict[str, jax.Array],
    k: int,
    *,
    exclude: dict[str, jax.Array] | None = None,
    allocation: str = "global",
    normalize: str | None = None,
    row_dims: dict[str, tuple[int, int]] | None = None,
    quotas: dict[str, int] | None = None,
) -> dict[str, jax.Array]:
    """Exactly ``k`` of the highest-scoring entries of ``scores``, by a budget allocation rule.

    Allocations (``N`` = selectable entries, ``s_t`` those of tensor ``t``; an entry is selectable
    unless ``exclude`` marks it):

    - ``"global"`` (GUFT paper, seed 000): one ranking over all entries of all tensors.
    - ``"per_tensor"``: tensor ``t`` gets ``k_t`` entries, ``k·s_t/N`` rounded by the
      largest-remainder (Hamilton) method: every ``k_t`` is the floor or ceiling of its exact
      share and ``Σ k_t = k`` exactly (remainder ties go to the earlier key in sorted order). The
      top ``k_t`` within each tensor are chosen. A global ranking concentrates in the tensors with
      the largest gradient sums (the patch embedding, issue 12); this spreads the budget like
      the parameters.
    - ``"per_row"``: GPS-style (Zhang et al., arXiv:2312.10136) quota per output neuron. Each
      tensor's ``k_t`` (as ``per_tensor``) is split equally over its ``R`` rows, its output units:
      the columns of its 2-D ``(d_in, d_out)`` view (:func:`row_view`, overridden by
      ``row_dims[key]``), i.e. the rows of the ``(out, in)`` weight matrix, by water-filling:
      every row gets ``min(c_r, q)`` entries, ``c_r`` its selectable entries and ``q`` the largest
      level with ``Σ_r min(c_r, q) ≤ k_t``; the ``k_t − Σ_r min(c_r, q)`` left over go, one each,
      to rows with ``c_r > q`` ranked by their ``(q+1)``-th best score (ties: lower row). Without
      ``exclude`` (or with no row short of entries) every row so gets ``⌊k_t/R⌋`` or ``⌈k_t/R⌉``;
      a row with fewer selectable entries than its share takes all of them and its deficit is
      redistributed evenly over the others, so ``Σ = k_t`` exactly. Every output unit adapts,
      instead of a few neurons taking the whole budget.

    ``normalize="mean"`` divides each tensor's scores by their mean over its selectable finite
    entries before ranking (a tensor whose mean is not positive is left unscaled), so tensors
    compete by relative saliency rather than by gradient scale. It changes ``"global"`` only: a
    positive per-tensor factor preserves every within-tensor order, so for ``"per_tensor"`` and
    ``"per_row"`` it is the identity (and is skipped, avoiding rounding ties).

    Order: scores compare as float32 with NaN as -inf and -0.0 == 0.0; ties go to the lower flat
    position in the concatenation of the tensors in sorted-key order (the lower index within a
    tensor or row). Excluded entries rank strictly below every selectable entry (also -inf and
    NaN ones), so they are never chosen.

    Under ``jax.jit`` (traced ``scores`` or ``exclude``, as in
    :func:`guft_jax.transforms.gradual_unfreeze`) the result is the same; the check of ``k``
    against the selectable count is then left to the caller and the ``"per_tensor"`` /
    ``"per_row"`` quotas under ``exclude`` are computed inside the program
    (:func:`largest_remainder_traced`).

    Cost: at most two compiled programs per call (counting the selectable entries when
    ``exclude`` is given, then selecting with ``lax.top_k``), no eager op per tensor. The
    per-tensor quotas are data, so a changing ``exclude`` does not recompile; ``"per_row"`` does
    not specialise on ``k`` either.

    Args:
      scores: ``{key: score array}``.
      k: the number of entries to select, ``0 ≤ k ≤ N``.
      exclude: ``{key: bool array}`` of entries never to choose (GUFT's ``exclude_selected``);
        ``None`` excludes nothing.
      allocation: ``"global"`` (default, today's rule), ``"per_tensor"`` or ``"per_row"``.
      normalize: ``None`` (default) or ``"mean"``.
      row_dims: ``{key: (d_in, d_out)}`` 2-D views for ``"per_row"`` (missing keys use
        :func:`row_view`).
      quotas: ``{key: k_t}``, explicit per-tensor budgets for ``"per_tensor"`` / ``"per_row"``
        instead of the proportional split (SHiRA's ``r·(d_in + d_out)`` per Linear, GPS's
        ``K·d_out``); they must sum to ``k``. ``None``: the largest-remainder split.

    Returns:
      ``{key: bool array}`` shaped like ``scores``, with exactly ``k`` True entries in total.

    Raises:
      ValueError: ``k`` out of range, an unknown ``allocation`` or ``normalize``, a
        ``row_dims`` entry whose product is not the tensor's size, or ``quotas`` that do not
        name every tensor, exceed one's selectable entries or do not sum to ``k``.

    >>> s = {"a": jnp.array([3.0, 1.0, 2.0]), "b": jnp.array([5.0, 0.0])}
    >>> {k: v.tolist() for k, v in topk_mask(s, 2, allocation="per_tensor").items()}
    {'a': [True, False, False], 'b': [True, False]}
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    keys = sorted(scores)
    sizes = [math.prod(np.shape(scores[key])) for key in keys]
    if not 0 <= k <= sum(sizes):
        raise ValueError(f"k: must be in [0, {sum(sizes)}] entries, got {k}")
    traced = _is_traced(scores, exclude)
    if exclude is None:
        sel = sizes
    elif not traced:
        got = jax.device_get(_selectable_counts({key: exclude[key] for key in keys}))
        sel = [int(got[key]) for key in keys]
        if k > sum(sel):
            raise ValueError(f"k: must be in [0, {sum(sel)}] selectable entries, got {k}")
    if quotas is not None:
        sel_ = sizes if exclude is None or traced else sel
        quotas = jnp.asarray(given_quotas(quotas, keys, sel_, k, allocation), jnp.int32)
    elif allocation == "global":
        return _select_global(scores, exclude, k=k, normalize=normalize)
    elif exclude is not None and traced:
        check_traced_bound(k, sum(sizes))
        counts = _selectable_counts({key: exclude[key] for key in keys})
        quotas = largest_remainder_traced(k, jnp.stack([counts[key] for key in keys]))
    else:
        quotas = jnp.asarray(largest_remainder(k, sel), jnp.int32)
    if allocation == "per_tensor":
        return _select_per_tensor(scores, exclude, quotas, k=k)
    views = []
    for key, size in zip(keys, sizes, strict=True):
        view = tuple(int(d) for d in (row_dims or {}).get(key, ()))
        if not view:
            view = row_view(key, tuple(np.shape(scores[key])))
        if len(view) != 2 or math.prod(view) != size:
            raise ValueError(f"row_dims: {key!r} has {size} entries, (d_in, d_out) = {view}")
        views.append(view)
    return _select_per_row(scores, exclude, quotas, views=tuple(views))


def given_quotas(
    quotas: dict[str, int], keys: list[str], selectable: list[int], k: int, allocation: str
) -> list[int]:
    """Explicit per-tensor quotas in ``keys`` order, checked against the selectable counts.

    Raises:
      ValueError: a global allocation, missing or unknown keys, a quota outside
        ``[0, selectable]``, or quotas not summing to ``k``.
    """
    if allocation == "global":
        raise ValueError("quotas: need allocation 'per_tensor' or 'per_row', got 'global'")
    if sorted(quotas) != keys:
        raise ValueError(f"quotas: must name every tensor {keys[:4]}..., got {sorted(quotas)[:4]}")
    out = [int(quotas[key]) for key in keys]
    bad = [(key, q, n) for key, q, n in zip(keys, out, selectable, strict=True) if not 0 <= q <= n]
    if bad:
        raise ValueError(f"quotas: each must be in [0, selectable entries], got {bad[:4]}")
    if sum(out) != k:
        raise ValueError(f"quotas: must sum to k = {k}, got {sum(out)}")
    return out


def largest_remainder(k: int, weights: list[int]) -> list[int]:
    """``k`` split in proportion to ``weights`` (non-negative ints) by the largest-remainder method.

    Each share is ``⌊k·w/W⌋`` plus one for the ``k − Σ⌊·⌋`` largest remainders ``k·w mod W``
    (ties: lower index), computed in exact integer arithmetic, so every share is the floor or
    ceiling of ``k·w/W`` and the shares sum to ``k``.

    >>> largest_remainder(5, [1, 1, 1])
    [2, 2, 1]
    """
    total = sum(weights)
    if total == 0:
        if k:
            raise ValueError(f"k: {k} entries cannot be split over zero weight")
        return [0] * len(weights)
    base = [k * w // total for w in weights]
    rem = [k * w % total for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-rem[i], i))
    for i in order[: k - sum(base)]:
        base[i] += 1
    return base


def _is_traced(*trees: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees))


# (2 + 2e-7·k)·N < 2**31 keeps the int32 remainder of the float32 quotient estimate exact.
_I32 = 2**31


def largest_remainder_traced(k: int, weights: jax.Array) -> jax.Array:
    """:func:`largest_remainder` inside a traced program: ``k`` static, ``weights`` an int32
    vector of traced non-negative counts; the same shares, exactly.

    ``⌊k·w/W⌋`` and ``k·w mod W`` need 64-bit products: the quotient is estimated in float32
    and corrected with the int32 (wrap-around) remainder, exact while the estimate is off by
    less than ``2**31 / W``, i.e. for ``(2 + 2e-7·k)·W < 2**31`` (ViT-B/16: ``W`` ≈ 8.6e7).
    :func:`topk_mask` checks that bound (:func:`check_traced_bound`) at trace time from the
    static total number of entries, which bounds ``W``.

    >>> largest_remainder_traced(5, jnp.array([1, 1, 1], jnp.int32)).tolist()
    [2, 2, 1]
    """
    w = weights.astype(jnp.int32)
    total = jnp.sum(w)
    safe = jnp.maximum(total, 1)
    est = jnp.floor(jnp.float32(k) * (w.astype(jnp.float32) / safe.astype(jnp.float32)))
    q0 = est.astype(jnp.int32)
    r = jnp.int32(k) * w - q0 * safe  # exact modulo 2**32, and |r| < 2**31 by the bound
    base = q0 + jnp.floor_divide(r, safe)
    rem = jnp.mod(r, safe)
    order = jnp.lexsort((jnp.arange(w.shape[0]), -rem))  # by -rem, ties: lower index
    extra = (
        jnp.zeros_like(w)
        .at[order]
        .set((jnp.arange(w.shape[0]) < k - jnp.sum(base)).astype(jnp.int32))
    )
    return jnp.where(total > 0, base + extra, 0)


def check_traced_bound(k: int, n: int) -> None:
    """ValueError unless :func:`largest_remainder_traced` is exact for ``k`` of ``n`` entries."""
    if (2 + 2e-7 * k) * n >= _I32:
        raise ValueError(
            f"k: traced per-tensor quotas are exact for (2 + 2e-7·k)·N < 2**31; got k={k}, "
            f"N={n} (use allocation='global' or select outside jit)"
        )


@jax.jit
def _selectable_counts(exclude: dict) -> dict:
    return {key: jnp.sum(~ex.astype(bool), dtype=jnp.int32) for key, ex in exclude.items()}


def _order_key(x: jax.Array, ex: jax.Array | None) -> jax.Array:
    """int32 keys ordering like float32 ``x`` (NaN -> -inf, -0.0 -> 0.0), excluded -> INT32_MIN."""
    x = x.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    x = jnp.where(x == 0, jnp.float32(0), x)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    # Negative floats: flip the magnitude bits so that larger magnitude -> smaller int.
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    if ex is not None:
        key = jnp.where(ex.astype(bool), jnp.int32(_EXCLUDED), key)
    return key


def _mean_normalized(x: jax.Array, ex: jax.Array | None) -> jax.Array:
    x = x.astype(jnp.float32)
    ok = jnp.isfinite(x) if ex is None else jnp.isfinite(x) & ~ex.astype(bool)
    mean = jnp.sum(jnp.where(ok, x, 0)) / jnp.maximum(jnp.sum(ok), 1)
    return x / jnp.where(mean > 0, mean, 1)


@functools.partial(jax.jit, static_argnames=("k", "normalize"))
def _select_global(scores: dict, exclude: dict | None, *, k: int, normalize: str | None) -> dict:
    # One compiled program, one top_k over the concatenated keys: no sort of the whole vector.
    keys = sorted(scores)
    parts = []
    for key in keys:
        ex = None if exclude is None else exclude[key]
        x = _mean_normalized(scores[key], ex) if normalize == "mean" else scores[key]
        parts.append(jnp.ravel(_order_key(x, ex)))
    flat = jnp.concatenate(parts)
    chosen = jnp.zeros(flat.shape, bool)
    if k:
        chosen = chosen.at[jax.lax.top_k(flat, k)[1]].set(True)
    out, off = {}, 0
    for key in keys:
        size = math.prod(np.shape(scores[key]))
        out[key] = chosen[off : off + size].reshape(np.shape(scores[key]))
        off += size
    return out


@functools.partial(jax.jit, static_argnames=("k",))
def _select_per_tensor(scores: dict, exclude: dict | None, quotas: jax.Array, *, k: int) -> dict:
    out = {}
    for i, key in enumerate(sorted(scores)):
        shape = np.shape(scores[key])
        key_ = jnp.ravel(_order_key(scores[key], None if exclude is None else exclude[key]))
        # k_t ≤ min(size, k): a static top_k of that width holds the tensor's top k_t in order.
        cap = min(key_.size, k)
        chosen = jnp.zeros(key_.shape, bool)
        if cap:
            idx = jax.lax.top_k(key_, cap)[1]
            chosen = chosen.at[idx].set(jnp.arange(cap) < quotas[i])
        out[key] = chosen.reshape(shape)
    return out


@functools.partial(jax.jit, static_argnames=("views",))
def _select_per_row(scores: dict, exclude: dict | None, quotas: jax.Array, *, views: tuple) -> dict:
    # k is not static here (quotas are data): one compile per tree structure, whatever k.
    out = {}
    for i, key in enumerate(sorted(scores)):
        shape = np.shape(scores[key])
        d_in, d_out = views[i]
        ex = None if exclude is None else exclude[key]
        rows = _order_key(scores[key], ex).reshape(d_in, d_out).T  # (output unit, its inputs)
        k_t = quotas[i]
        cap_r = jnp.sum(rows != _EXCLUDED, axis=1, dtype=jnp.int32)  # selectable per row
        # Water-filling level q: f(q) = Σ_r min(c_r, q) from a histogram of the capacities.
        hist = jnp.zeros(d_in + 1, jnp.int32).at[cap_r].add(1)
        below = jnp.cumsum(hist) - hist  # rows with c_r < q
        mass = jnp.cumsum(hist * jnp.arange(d_in + 1)) - hist * jnp.arange(d_in + 1)
        f = mass + jnp.arange(d_in + 1) * (d_out - below)
        q = jnp.sum(f <= k_t) - 1
        base = jnp.minimum(cap_r, q)
        left = k_t - jnp.sum(base)
        vals, idx = jax.lax.top_k(rows, d_in)  # each row's entries, best first
        # A row with c_r > q has a (q+1)-th selectable entry; q = d_in only when no row does.
        nxt = vals[:, jnp.minimum(q, d_in - 1)]
        cand = jnp.where(cap_r > q, nxt, jnp.int32(_EXCLUDED))
        order = jax.lax.top_k(cand, d_out)[1]
        extra = (
            jnp.zeros(d_out, jnp.int32).at[order].set((jnp.arange(d_out) < left).astype(jnp.int32))
        )
        n_r = base + extra
        sel = jnp.zeros((d_out, d_in), bool)
        sel = sel.at[jnp.arange(d_out)[:, None], idx].set(jnp.arange(d_in)[None, :] < n_r[:, None])
        out[key] = sel.T.reshape(shape)
    return out


def budget(ratio: float, n_eligible: int) -> int:
    """``k = round(ratio · N_eligible)`` (Python's round-half-even)."""
    return int(round(ratio * n_eligible))


@jax.jit
def merge_masks(a: dict, b: dict) -> dict:
    """Element-wise OR (``jnp.logical_or``) of two masks with the same keys."""
    return {k: jnp.logical_or(a[k], b[k]) for k in a}


@jax.jit
def _per_leaf_counts(mask: dict) -> dict:
    return {k: jnp.sum(m, dtype=jnp.int32) for k, m in mask.items()}


def count(mask: dict) -> int:
    return int(sum(int(v) for v in jax.device_get(_per_leaf_counts(mask)).values()))


def layer_of(key: str) -> str:
    """``"encoderblock_<i>"`` for a leaf inside an encoder block, else ``"other"``."""
    return next((p for p in key.split(SEP) if p.startswith("encoderblock_")), "other")


def mask_report(mask: dict, *, top: int | None = None) -> dict:
    """Per-tensor selected counts, per module type and layer, and the total density."""
    per = {k: int(v) for k, v in jax.device_get(_per_leaf_counts(mask)).items()}
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

    For plots and run reports (issue 12, item 9): the same mask under different eligibility
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
    per = {k: int(v) for k, v in jax.device_get(_per_leaf_counts(mask)).items()}

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
