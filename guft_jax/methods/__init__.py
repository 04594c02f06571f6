"""The method registry: ``get_method(name, **hparams) -> Method``.

Each method registers itself in its own file with :func:`register` (name, defaults, val grid);
importing this package imports the built-in method modules once. A method defined elsewhere
(a user's file, a test) registers the same way and is then known to ``get_method``, the configs,
the offline benchmark and artifacts.
"""

from __future__ import annotations

from guft_jax.methods.base import (
    FAMILIES,
    HEAD,
    METHOD,
    Defaults,
    EpochContext,
    Info,
    Method,
    MethodHooks,
    MethodSpec,
    StepInfo,
    default_labels,
    forward,
    get_method,
    method_names,
    register,
    spec,
    unregister,
)

# Built-in methods register on import: these first (the order of tables), then every other module
# of this package, so a new method is one new file here.
from guft_jax.methods import simple  # noqa: E402  isort: skip
from guft_jax.methods import lora as _lora  # noqa: E402  isort: skip
from guft_jax.methods import vera as _vera  # noqa: E402  isort: skip
from guft_jax.methods import fourierft as _fourierft  # noqa: E402  isort: skip
from guft_jax import guft as _guft  # noqa: E402  isort: skip
from guft_jax.methods.combine import combine  # noqa: E402  isort: skip


def _import_all() -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()


def __getattr__(name):
    # ``METHODS`` is live: methods registered after import (a user's, a test's) appear in it.
    if name == "METHODS":
        return method_names()
    raise AttributeError(name)


__all__ = [
    "HEAD",
    "METHOD",
    "METHODS",
    "FAMILIES",
    "Defaults",
    "EpochContext",
    "Info",
    "Method",
    "combine",
    "MethodHooks",
    "MethodSpec",
    "StepInfo",
    "default_labels",
    "forward",
    "get_method",
    "method_names",
    "register",
    "spec",
    "unregister",
]
