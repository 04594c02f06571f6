"""Saliency scores over a training set (GUFT, SNIP, SalUN, Fisher, magnitude).

``G = Σ |∇_w L|`` accumulated by one jitted step called once per batch (one compile: every batch
is padded to the same size and padded examples get weight 0). Modes (docs: GUFT guide):

- ``batch`` (default; SalUN/GPS): ``Σ_batches |∇ mean-loss(batch)|``. Depends on the batch size,
  which GUFT records with the mask.
- ``example`` (the paper's Eq. 2): ``Σ_examples |∇ loss(example)|``; per-example gradients by
  ``vmap`` over chunks of ``chunk`` examples inside a ``lax.scan``, so memory stays bounded.

Scores for the one-shot baselines: ``salun`` = ``|Σ_batches ∇|`` (signed sum, abs at the end),
``fisher`` = ``Σ_batches (∇)²``, ``snip`` = ``|∇ ⊙ w|`` on the first batch, ``magnitude`` = ``|w|``.
Everything runs deterministically (the loss is evaluated with ``deterministic=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("batch", "example")
SCORES = ("guft", "salun", "fisher", "snip", "magnitude")


def _pad(x, y, batch_size):
    """Pads a short batch with zero examples of weight 0. Integer labels become int32 (what a
    jitted function sees anyway); any other target (float regression targets, soft labels of
    shape ``(B, C)``) passes unchanged."""
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    w = np.ones(batch_size, np.float32)
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros((batch_size - n,) + y.shape[1:], y.dtype)])
        w[n:] = 0.0
    if np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int32)
    return x, y, w


def make_accumulator(
    loss_per_example: Callable[[Any, jax.Array, jax.Array], jax.Array],
    *,
    score: str = "guft",
    mode: str = "batch",
    chunk: int = 8,
) -> Callable:
    """A jitted ``acc(G, theta, x, y, w) -> G`` adding one batch's contribution.

    ``loss_per_example(theta, x, y)`` returns per-example losses ``(B,)``; ``w`` weights the
    examples (0 for padding).
    """
    if mode not in MODES:
        raise ValueError(f"saliency.mode: {mode!r} not in {list(MODES)}")
    if score not in SCORES:
        raise ValueError(f"saliency.score: {score!r} not in {list(SCORES)}")

    def batch_mean(theta, x, y, w):
        return jnp.sum(loss_per_example(theta, x, y) * w) / jnp.maximum(jnp.sum(w), 1.0)

    def acc_batch(g_acc, theta, x, y, w):
        g = jax.grad(batch_mean)(theta, x, y, w)
        if score == "salun":
            return jax.tree_util.tree_map(jnp.add, g_acc, g)
        if score == "fisher":
            return jax.tree_util.tree_map(lambda a, b: a + b * b, g_acc, g)
        return jax.tree_util.tree_map(lambda a, b: a + jnp.abs(b), g_acc, g)

    def acc_example(g_acc, theta, x, y, w):
        b = x.shape[0]
        if b % chunk:
            raise ValueError(f"saliency.chunk: {chunk} must divide the batch size {b}")
        xs = x.reshape((b // chunk, chunk) + x.shape[1:])
        ys = y.reshape((b // chunk, chunk) + y.shape[1:])
        ws = w.reshape(b // chunk, chunk)

        def one(theta, xi, yi, wi):
            return wi * loss_per_example(theta, xi[None], yi[None])[0]

        per_ex = jax.vmap(jax.grad(one), in_axes=(None, 0, 0, 0))

        def body(acc, inp):
            gs = per_ex(theta, *inp)
            return jax.tree_util.tree_map(lambda a, g: a + jnp.sum(jnp.abs(g), 0), acc, gs), None

        out, _ = jax.lax.scan(body, g_acc, (xs, ys, ws))
        return out

    return jax.jit(acc_example if mode == "example" else acc_batch)


def compute(
    loss_per_example: Callable,
    theta: Any,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    score: str = "guft",
    mode: str = "batch",
    chunk: int = 8,
    accumulator: Callable | None = None,
) -> tuple[Any, dict]:
    """Scores shaped like ``theta`` over all ``batches``; returns ``(G, info)``.

    ``info`` has ``batch_size``, ``num_examples``, ``num_batches``, ``mode`` and ``score``.
    """
    if score == "magnitude":
        return jax.tree_util.tree_map(jnp.abs, theta), {"score": score}
    acc = accumulator or make_accumulator(loss_per_example, score=score, mode=mode, chunk=chunk)
    g = jax.tree_util.tree_map(jnp.zeros_like, theta)
    batch_size = n = nb = 0
    for x, y in batches:
        batch_size = batch_size or len(x)
        x, y, w = _pad(x, y, batch_size)
        g = acc(g, theta, x, y, w)
        n += int(w.sum())
        nb += 1
        if score == "snip":
            break
    if nb == 0:
        raise ValueError("saliency: no batches")
    if score == "salun":
        g = jax.tree_util.tree_map(jnp.abs, g)
    if score == "snip":
        g = jax.tree_util.tree_map(lambda a, t: a * jnp.abs(t), g, theta)
    info = dict(score=score, mode=mode, batch_size=batch_size, num_examples=n, num_batches=nb)
    return g, info
