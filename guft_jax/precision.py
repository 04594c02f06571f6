"""Mixed-precision policy: one flag, ``"fp32"`` or ``"bf16"`` (or ``"auto"``).

``"bf16"`` runs the ViT's matmuls, attention and activations in bfloat16 while everything that
accumulates stays float32: master weights and optimizer state (the trainable tree is never cast),
LayerNorm statistics, the softmax of attention, the logits' cross-entropy (``train`` casts the
logits to float32) and GUFT's saliency sums (gradients are taken with respect to the float32
parameters, so they arrive in float32). Frozen entries stay bitwise unchanged under every policy:
the masked update selects old values with ``jnp.where`` (``tests/test_precision.py``).

``"auto"`` is bf16 on GPU and TPU and the measured faster choice on CPU (:data:`CPU_DEFAULT`).

>>> compute_dtype("bf16")
<class 'jax.numpy.bfloat16'>
>>> resolve_precision("auto", backend="gpu")
'bf16'
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

POLICIES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
CHOICES = (*POLICIES, "auto")
# Measured with ``python -m benchmarks.step_bench --precision fp32,bf16`` on the 2-core CPU
# (benchmarks/results/step_bench_precision.json): XLA's CPU backend has no native bf16 matmul
# and runs bf16 steps slower than fp32 ones, so "auto" keeps fp32 there.
CPU_DEFAULT = "fp32"
# Models whose clones are kept (a model and its bf16 clone hold no arrays; a process rarely has
# more than a few).
CLONE_CACHE_SIZE = 32


def resolve_precision(precision: str, backend: str | None = None) -> str:
    """``"fp32"`` or ``"bf16"`` for a policy name (``"auto"``: by ``backend``, default JAX's).

    Raises:
      ValueError: ``precision`` not in ``"fp32"``, ``"bf16"``, ``"auto"``.
    """
    if precision not in CHOICES:
        raise ValueError(f"precision: must be one of {', '.join(CHOICES)}; got {precision!r}")
    if precision != "auto":
        return precision
    backend = backend or jax.default_backend()
    return CPU_DEFAULT if backend == "cpu" else "bf16"


def compute_dtype(precision: str, backend: str | None = None) -> Any:
    """The compute dtype of a policy (``jnp.float32`` or ``jnp.bfloat16``)."""
    return POLICIES[resolve_precision(precision, backend)]


def with_precision(model: Any, precision: str | None, backend: str | None = None) -> Any:
    """``model`` computing in the policy's dtype (``model.clone(dtype=...)``); ``None`` or a
    model already in that dtype returns ``model`` itself.

    Raises:
      ValueError: an unknown policy, or a model without a ``dtype`` field.
    """
    if precision is None:
        return model
    dtype = compute_dtype(precision, backend)
    if not hasattr(model, "dtype"):
        raise ValueError(
            f"precision={precision!r} needs a model with a `dtype` field (guft_jax.vit models "
            f"have one); got {type(model).__name__}: pass precision=None to keep its own"
        )
    own = jnp.float32 if model.dtype is None else model.dtype  # None: the params' float32
    if jnp.dtype(own) == jnp.dtype(dtype):
        return model
    try:
        hash(model)
    except TypeError:  # an unhashable model: nothing to cache on
        return model.clone(dtype=dtype)
    return _clone(model, dtype)


# One clone per (model, dtype) so that jit caches keyed on the model keep hitting; keyed on the
# (hashable, value-compared) model itself rather than its id, and bounded, so a finished run's
# models are let go.
@functools.lru_cache(maxsize=CLONE_CACHE_SIZE)
def _clone(model: Any, dtype: Any) -> Any:
    return model.clone(dtype=dtype)


__all__ = [
    "CHOICES",
    "CPU_DEFAULT",
    "POLICIES",
    "compute_dtype",
    "resolve_precision",
    "with_precision",
]
