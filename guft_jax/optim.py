"""Optimisers: AdamW with linear warm-up + cosine decay, separate head / method learning rates.

The VTAB-1K protocol (SPEC.md §6): AdamW, lr 1e-3, weight decay 1e-4, batch 64, 100 epochs,
cosine with 10 warm-up epochs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from guft_jax.methods.base import HEAD, METHOD


def schedule(*, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine to ``min_lr_ratio*lr``."""
    if lr < 0:
        raise ValueError(f"lr: must be >= 0, got {lr}")
    if total_steps < 1:
        raise ValueError(f"total_steps: must be >= 1, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1) if total_steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=lr * min_lr_ratio,
    )


def make_optimizer(
    *,
    labels: Any,
    lr: float,
    head_lr: float | None = None,
    weight_decay: float = 1e-4,
    warmup_steps: int = 0,
    total_steps: int,
    clip_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """AdamW per optimizer group (``"head"`` / ``"method"`` labels from ``Method.labels``).

    Args:
      labels: pytree of group names shaped like the trainable tree.
      lr: peak learning rate of the method's parameters.
      head_lr: peak learning rate of the head (defaults to ``lr``).
      weight_decay: decoupled weight decay (applied by AdamW to every trainable leaf).
      warmup_steps, total_steps: the schedule.
      clip_norm: optional global gradient-norm clipping.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
    head_lr = lr if head_lr is None else head_lr

    def adamw(peak):
        return optax.adamw(
            schedule(lr=peak, warmup_steps=warmup_steps, total_steps=total_steps),
            b1=b1,
            b2=b2,
            weight_decay=weight_decay,
        )

    tx = optax.multi_transform({HEAD: adamw(head_lr), METHOD: adamw(lr)}, labels)
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


def expand_mask(mask: Any, like: Any) -> Any:
    """Broadcasts a mask *prefix* (a bool leaf may cover a whole subtree) to ``like``'s leaves."""
    return jax.tree_util.tree_map(
        lambda m, sub: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(m, jnp.shape(x)), sub),
        mask,
        like,
    )


def masked_step(
    tx: optax.GradientTransformation,
    grads: Any,
    opt_state: Any,
    params: Any,
    mask: Any | None,
    scale: Any | None = None,
) -> tuple[Any, Any]:
    """One optimizer step that leaves entries outside an element-level ``mask`` bitwise unchanged.

    ``mask`` is a bool pytree shaped like ``params`` (True = trainable) passed as a traced value,
    so changing it never retraces. Gradients outside the mask are zeroed before the update (so
    Adam moments there stay exactly zero and an entry that is unfrozen later starts with zero
    moments), and the new value is selected with ``jnp.where`` rather than adding a zero update
    (which would turn -0.0 into 0.0 and let decoupled weight decay move frozen weights).
    Adam's bias correction uses the global step count for every entry.

    ``scale`` (a pytree of scalars shaped like ``params``, optional) multiplies the updates: with
    a learning-rate-1 optimizer it makes the learning rates data (packed runs, one per lr).
    """
    if mask is None:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, _scaled(updates, scale)), opt_state
    mask = expand_mask(mask, grads)
    grads = jax.tree_util.tree_map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, _scaled(updates, scale))
    new = jax.tree_util.tree_map(lambda n, p, m: jnp.where(m, n, p), new, params, mask)
    return new, opt_state


def _scaled(updates: Any, scale: Any | None) -> Any:
    if scale is None:
        return updates
    return jax.tree_util.tree_map(lambda u, s: (u * s).astype(u.dtype), updates, scale)


def resize_leaves(tree: Any, sizes: dict[str, int], *, suffix: bool = False) -> Any:
    """Zero-pads (or truncates) 1-D leaves to new lengths, by ``/``-joined path.

    ``sizes`` maps a leaf path of the trainable tree to its new length. With ``suffix=True`` a
    leaf matches when its path *ends* with one of those paths, which is how an optimizer state
    (Adam's moments mirror the trainable tree under ``mu/`` and ``nu/``) is resized along with
    the trainable tree; scalar leaves (counts) never match.
    """
    from guft_jax.paths import key_to_str

    def fix(path, x):
        p = key_to_str(path)
        hit = next(
            (n for q, n in sizes.items() if p == q or (suffix and p.endswith("/" + q))), None
        )
        if hit is None or getattr(x, "ndim", 0) != 1:
            return x
        pad = jnp.zeros((max(hit - x.shape[0], 0),), x.dtype)
        return jnp.concatenate([x, pad])[:hit]

    return jax.tree_util.tree_map_with_path(fix, tree)
