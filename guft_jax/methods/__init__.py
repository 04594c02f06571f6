"""The method registry: ``get_method(name, **hparams) -> Method``."""

from __future__ import annotations

import importlib
import inspect

from guft_jax.methods.base import HEAD, METHOD, EpochContext, Method, MethodHooks, default_labels

# name -> (module, factory, fixed keyword arguments)
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "full": ("guft_jax.methods.simple", "full", {}),
    "linear": ("guft_jax.methods.simple", "linear", {}),
    "bitfit": ("guft_jax.methods.simple", "bitfit", {}),
    "lora": ("guft_jax.methods.lora", "lora", {}),
    "dora": ("guft_jax.methods.lora", "dora", {}),
    "vera": ("guft_jax.methods.vera", "vera", {}),
    "fourierft": ("guft_jax.methods.fourierft", "fourierft", {}),
    "guft": ("guft_jax.guft", "guft", {}),
    "magnitude": ("guft_jax.guft", "oneshot", {"score": "magnitude"}),
    "snip": ("guft_jax.guft", "oneshot", {"score": "snip"}),
    "salun": ("guft_jax.guft", "oneshot", {"score": "salun"}),
    "fisher": ("guft_jax.guft", "oneshot", {"score": "fisher"}),
}

METHODS = tuple(_REGISTRY)


def get_method(name: str, **hparams) -> Method:
    """Builds a method by name with keyword-only hyperparameters.

    Raises:
      ValueError: unknown name (listing the allowed ones) or unknown hyperparameter (listing the
        method's keywords).
    """
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; allowed: {sorted(_REGISTRY)}")
    module, factory, fixed = _REGISTRY[name]
    fn = getattr(importlib.import_module(module), factory)
    allowed = [p for p in inspect.signature(fn).parameters if p not in fixed]
    bad = sorted(set(hparams) - set(allowed))
    if bad:
        raise ValueError(f"method.{name}: unknown hyperparameter(s) {bad}; allowed: {allowed}")
    return fn(**fixed, **hparams)


__all__ = [
    "HEAD",
    "METHOD",
    "METHODS",
    "EpochContext",
    "Method",
    "MethodHooks",
    "default_labels",
    "get_method",
]
