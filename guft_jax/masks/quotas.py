"""Per-tensor budgets: exact largest-remainder splits (on the host and inside a traced program)
and explicit quotas."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
