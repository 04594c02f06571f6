"""Optimisers: AdamW with linear warm-up + cosine decay, separate head / method learning rates.

The VTAB-1K protocol (docs: VTAB-1K): AdamW, lr 1e-3, weight decay 1e-4, batch 64, 100 epochs,
cosine with 10 warm-up epochs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

# The optimizer groups of a trainable tree: the task head, and everything the method trains.
HEAD = "head"
METHOD = "method"


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


def expand_mask(mask: Any, like: Any, *, field: str = "mask") -> Any:
    """Broadcasts a mask *prefix* (a bool leaf may cover a whole subtree) to ``like``'s leaves.

    Each mask leaf must be bool (a Python bool or a bool array) and either a scalar or shaped
    exactly like every leaf it covers: a 0/1 integer or float score mask would otherwise train
    every nonzero entry, and a wrongly shaped one would broadcast silently or fail naming no leaf.

    Raises:
      ValueError: a non-bool or wrongly shaped mask leaf (naming ``field`` and the leaf's path).
    """
    from guft_jax.paths import key_to_str

    def cover(mpath, m, sub):
        dtype = jnp.result_type(m) if not isinstance(m, bool) else jnp.bool_
        name = key_to_str(mpath)
        if dtype != jnp.bool_:
            raise ValueError(
                f"{field}: leaf {name or '<root>'!r} has dtype {dtype}; a mask must be bool "
                "(True = trainable): turn scores into a mask first (e.g. guft_jax.oneshot_mask)"
            )

        def leaf(spath, x):
            shape = jnp.shape(x)
            if jnp.shape(m) not in ((), shape):
                path = "/".join(p for p in (name, key_to_str(spath)) if p) or "<root>"
                raise ValueError(
                    f"{field}: leaf {path!r} has shape {jnp.shape(m)}, the parameter "
                    f"{shape} (a mask leaf is a scalar or shaped like its parameter)"
                )
            return jnp.broadcast_to(m, shape)

        return jax.tree_util.tree_map_with_path(leaf, sub)

    return jax.tree_util.tree_map_with_path(cover, mask, like)


def masked_update(
    tx: optax.GradientTransformation,
    grads: Any,
    opt_state: Any,
    params: Any,
    mask: Any,
    **extra: Any,
) -> tuple[Any, Any]:
    """``tx``'s update restricted to an element-level ``mask`` (True = trainable): the one
    implementation of element masking, used by :func:`masked_step` (the engine) and
    :func:`guft_jax.transforms.masked` (optax users).

    Gradients outside the mask reach ``tx`` as exact zeros (its moments stay zero there, and an
    entry unfrozen later starts from zero moments); the updates outside it are ``-0.0``, so
    ``optax.apply_updates`` leaves those entries bitwise unchanged (``x + -0.0 == x`` for every
    float ``x``, ``-0.0`` included), whatever ``tx`` adds (decoupled weight decay, momentum).

    Args:
      tx: the optimizer.
      grads: the gradients (a pytree shaped like ``params``).
      opt_state: ``tx``'s state.
      params: the parameters (passed to ``tx``; may be None).
      mask: a bool pytree prefix of ``grads`` (see :func:`expand_mask`); traced values are fine.
      **extra: extra arguments for ``tx.update``.

    Returns:
      ``(updates, opt_state)``.

    Raises:
      ValueError: a non-bool or wrongly shaped mask leaf (see :func:`expand_mask`).
    """
    mask = expand_mask(mask, grads)
    grads = jax.tree_util.tree_map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, mask)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    updates = jax.tree_util.tree_map(
        lambda u, m: jnp.where(m, u, jnp.asarray(-0.0, jnp.result_type(u))), updates, mask
    )
    return updates, opt_state


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
    so changing it never retraces. The update is :func:`masked_update`: gradients outside the mask
    are zeroed before the update (so Adam moments there stay exactly zero and an entry that is
    unfrozen later starts with zero moments) and the updates there are ``-0.0``, which adds to
    every float (``-0.0`` included) without changing its bits, so decoupled weight decay cannot
    move a frozen weight. Adam's bias correction uses the global step count for every entry.

    ``scale`` (a pytree of scalars shaped like ``params``, optional) multiplies the updates: with
    a learning-rate-1 optimizer it makes the learning rates data (packed runs, one per lr);
    ``-0.0`` times a non-negative scale stays ``-0.0``.
    """
    if mask is None:
        updates, opt_state = tx.update(grads, opt_state, params)
    else:
        updates, opt_state = masked_update(tx, grads, opt_state, params, mask)
    return optax.apply_updates(params, _scaled(updates, scale)), opt_state


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
