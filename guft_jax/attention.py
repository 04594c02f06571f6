"""Multi-head dot-product attention: fused (cuDNN / XLA) and the einsum reference.

:func:`attention` goes through ``jax.nn.dot_product_attention`` (XLA, or cuDNN's fused flash
attention on GPU); which implementation ``"auto"`` means per backend is
:data:`guft_jax.kernels.ATTENTION_DEFAULTS`.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from guft_jax import kernels

Array = jax.Array

ATTENTION_IMPLS = kernels.ATTENTION_CHOICES

_log = logging.getLogger(__name__)


def attention_einsum(q: Array, k: Array, v: Array) -> Array:
    """Reference multi-head attention: ``softmax(q kᵀ / √D) v`` with the softmax in float32.

    Args:
      q: ``(B, T, H, D)`` queries.
      k: ``(B, S, H, D)`` keys.
      v: ``(B, S, H, D)`` values.

    Returns:
      ``(B, T, H, D)`` in ``v.dtype``.
    """
    d = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(d).astype(q.dtype), k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attention(
    q: Array, k: Array, v: Array, *, impl: str = "auto", dtype: jnp.dtype | None = None
) -> Array:
    """Multi-head scaled dot-product attention (Vaswani et al., arXiv:1706.03762), fused.

    Goes through ``jax.nn.dot_product_attention`` (logits accumulated and softmax computed in
    float32 for 16-bit inputs), which on GPU can run cuDNN's flash attention: the ``(B, H, T, S)``
    probabilities are never written to memory. No masks, no dropout (ViT fine-tuning uses
    attention dropout 0; keep the einsum path where it is not).

    Args:
      q: ``(B, T, H, D)`` queries.
      k: ``(B, S, H, D)`` keys.
      v: ``(B, S, H, D)`` values.
      impl: "auto" (the backend's entry of :data:`guft_jax.kernels.ATTENTION_DEFAULTS`),
        "xla" (``implementation=None``: JAX picks, XLA today), "cudnn" (raises where
        unsupported), "einsum" (:func:`attention_einsum`, the reference) or "cudnn_or_xla"
        (cuDNN for 16-bit inputs where its trace-time checks pass, else XLA).
      dtype: compute dtype q, k, v are cast to first (e.g. ``jnp.bfloat16``); ``None`` keeps them.

    Returns:
      ``(B, T, H, D)`` in the compute dtype.

    Raises:
      ValueError: for an unknown ``impl`` or shapes that are not ``(B, T, H, D)``.

    >>> q = jnp.ones((1, 3, 2, 4))
    >>> attention(q, q, q, impl="xla").shape
    (1, 3, 2, 4)
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; allowed: {', '.join(ATTENTION_IMPLS)}")
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need (B, T, H, D) each")
    if dtype is not None:
        q, k, v = (a.astype(dtype) for a in (q, k, v))
    if impl == "auto":
        impl = kernels.default("attention")
    if impl == "cudnn_or_xla":
        if q.dtype in (jnp.bfloat16, jnp.float16):
            try:  # cuDNN's support checks (version, head dim, GPU generation) run at trace time
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (NotImplementedError, RuntimeError, ValueError) as e:
                _log_once(f"attention: cuDNN flash attention unavailable ({e}); using XLA")
        impl = "xla"
    if impl == "einsum":
        return attention_einsum(q, k, v)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, implementation=None)


@functools.lru_cache(maxsize=16)
def _log_once(message: str) -> None:
    _log.info(message)


__all__ = ["ATTENTION_IMPLS", "attention", "attention_einsum"]
