"""LoSiA's subnet selection (arXiv:2507.04487): importance scores, the greedy subnet search and
a block re-indexed to a new subnet."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _block_sum(score: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    return jnp.sum(score[rows[:, None], cols[None, :]])


def greedy_subnet(score: jax.Array, kr: int, kc: int) -> tuple[jax.Array, jax.Array]:
    """The LoSiA subnet of a non-negative ``(in, out)`` score: ``(rows, cols)``, sorted int32.

    The best, by the score summed over the ``kr × kc`` block, of three greedy candidates (the
    official ``PureGreedy``, ``Row2Column``, ``Column2Row``): top rows by row sum and top columns
    by column sum independently; top rows, then top columns by their sum within those rows; top
    columns, then top rows within them. Ties go to the earlier candidate and, within ``top_k``,
    to the lower index. Exact when the score is rank one (``u vᵀ``, ``u, v ≥ 0``).

    >>> s = jnp.outer(jnp.array([0.0, 3.0, 1.0]), jnp.array([2.0, 0.0, 5.0, 1.0]))
    >>> [a.tolist() for a in greedy_subnet(s, 1, 2)]
    [[1], [0, 2]]
    """
    top = lambda v, k: jax.lax.top_k(v, k)[1].astype(jnp.int32)
    ra, ca = top(jnp.sum(score, 1), kr), top(jnp.sum(score, 0), kc)
    cb = top(jnp.sum(score[ra], 0), kc)
    rc = top(jnp.sum(score[:, ca], 1), kr)
    rows, cols = jnp.stack([ra, ra, rc]), jnp.stack([ca, cb, ca])
    sums = jnp.stack([_block_sum(score, r, c) for r, c in zip(rows, cols, strict=True)])
    best = jnp.argmax(sums)  # first maximum: the official order breaks ties
    return jnp.sort(rows[best]), jnp.sort(cols[best])


def importance(theta: jax.Array, grad: jax.Array) -> jax.Array:
    """``|x − ½x²|`` with ``x = θ ⊙ g`` (the official ``param_mix`` Taylor score), float32."""
    x = theta.astype(jnp.float32) * grad.astype(jnp.float32)
    return jnp.abs(x - 0.5 * x * x)


def carry_retained(old_rows, old_cols, block, new_rows, new_cols):
    """``block`` re-indexed to the new subnet: values at ``(row, col)`` pairs in both, else 0."""
    hit_r = new_rows[:, None] == old_rows[None, :]
    hit_c = new_cols[:, None] == old_cols[None, :]
    ir, ic = jnp.argmax(hit_r, 1), jnp.argmax(hit_c, 1)
    keep = jnp.any(hit_r, 1)[:, None] & jnp.any(hit_c, 1)[None, :]
    return jnp.where(keep, block[ir[:, None], ic[None, :]], jnp.zeros_like(block))
