"""Kernel choices as explicit options: SDDMM, block forward, block fraction, attention.

A run's kernel choices are one frozen :class:`KernelOptions`. ``"auto"`` fields stand for the
per-backend defaults, read-only tables measured by ``benchmarks/ops_bench.py`` and
``python -m benchmarks.step_bench --group guft_real`` (see ``docs/speed.md``); :func:`resolve`
replaces every ``"auto"`` with the concrete choice for a backend once, so the resolved options
can be written
into a run's records (:func:`as_dict`) and compared on resume. The ops in :mod:`guft_jax.ops`
take these choices as explicit arguments; nothing here is a setting to reassign.

>>> resolve(KernelOptions(), backend="cpu").sddmm
'gather'
>>> as_dict(resolve({"attention": "xla"}, backend="gpu"))["attention"]
'xla'
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import jax
from jax.extend import core as jax_core

SDDMM_CHOICES = ("auto", "gather", "dense", "pallas")
BLOCK_FORWARD_CHOICES = ("auto", "on", "off")
# "cudnn_or_xla": cuDNN's fused flash attention for 16-bit inputs where its trace-time checks
# pass, XLA otherwise (what a GPU runs by default).
ATTENTION_CHOICES = ("auto", "xla", "cudnn", "einsum", "cudnn_or_xla")

# The SDDMM "auto" runs per backend. CPU: "gather" beats the dense dW matmul on 2 cores at 0.3%
# density, ViT-B/16 shapes (benchmarks/results/ops_bench.json). GPU: on one H200 (bf16, ViT-B/16
# shapes, batch 64, 0.3% random entries; benchmarks/results/ops_bench_accelerator.json) fwd+bwd
# vs the dense matmul (geomean): dense-dW 0.95, the Pallas/Triton kernel 1.35, gather 2.71. TPU:
# the MXU makes the dense dW matmul cheaper than any gather, and Mosaic has no vector gather.
SDDMM_DEFAULTS = types.MappingProxyType({"cpu": "gather", "gpu": "dense", "tpu": "dense"})

# With a block: "on" computes ``y = x W0 + scatter(x[:, rows] S_block)`` (and ``dx`` likewise),
# so no densified weight exists in either pass; "off" densifies ``W0 + S`` in each pass and takes
# only the weight gradient on the block. On 2 CPU cores (``step_bench --group guft_real``,
# DINOv2-S/14, 56 px, batch 50) step / full was 0.797 ("on") vs 0.729 ("off"), peak / LoRA's
# 0.996 vs 1.167: CPU takes the faster one, accelerators the one without weight copies.
BLOCK_FORWARD_DEFAULTS = types.MappingProxyType({"cpu": "off", "gpu": "on", "tpu": "on"})

# CPU: the einsum form measured faster than dot_product_attention's XLA path on 2 cores
# (ViT-B/16 shape, fwd+bwd, 1.1-1.8x; benchmarks/results/ops_bench.json "attention").
ATTENTION_DEFAULTS = types.MappingProxyType({"cpu": "einsum", "gpu": "cudnn_or_xla", "tpu": "xla"})

# A backend missing from the tables above gets these.
FALLBACK = types.MappingProxyType({"sddmm": "dense", "block_forward": "on", "attention": "xla"})

# The block SDDMM is taken for a layer whose block has R·C <= this fraction of in·out. On 2 CPU
# cores its matmul + column gathers took 72 real DINOv2-S/14 kernels (blocks ~10% of each
# matrix) from 511 ms (dense dW) to 200 ms; a block near the whole matrix only adds gathers.
BLOCK_MAX_FRACTION = 0.5

# "gather" falls back to the dense dW matmul for a layer whose capacity is more than this
# fraction of its weight entries: on 2 CPU cores (ViT-S shapes, 850 and 1576 tokens) the two
# cross near 0.4-0.5% of filled entries, and GUFT's capacities hold about twice what they fill.
GATHER_MAX_DENSITY = 0.008

_TABLES = {
    "sddmm": SDDMM_DEFAULTS,
    "block_forward": BLOCK_FORWARD_DEFAULTS,
    "attention": ATTENTION_DEFAULTS,
}
_CHOICES = {
    "sddmm": SDDMM_CHOICES,
    "block_forward": BLOCK_FORWARD_CHOICES,
    "attention": ATTENTION_CHOICES,
}


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Which kernels a run uses (``"auto"``: the backend's default, :func:`resolve`).

    Attributes:
      sddmm: the weight-gradient SDDMM of GUFT's sparse path outside blocks
        (:func:`guft_jax.ops.sparse_delta_matmul`): "auto", "gather", "dense" or "pallas".
      block_forward: with a block, "on" never densifies the weight (the block's part is
        scattered into ``x W0``), "off" densifies it and takes only the weight gradient on the
        block; "auto" per backend.
      block_max_fraction: the block SDDMM is taken where ``R·C <= block_max_fraction · in·out``;
        0 never takes it. In ``[0, 1]``.
      attention: :func:`guft_jax.attention.attention`'s implementation: "auto", "xla", "cudnn",
        "einsum" or "cudnn_or_xla".
      gather_max_density: a "gather" SDDMM becomes the dense dW matmul for a layer whose
        capacity is more than this fraction of its weight entries (1 keeps "gather" everywhere).
        In ``(0, 1]``.

    Raises:
      ValueError: a field outside its allowed values (the message names the field).

    >>> KernelOptions(sddmm="dense").block_forward
    'auto'
    """

    sddmm: str = "auto"
    block_forward: str = "auto"
    block_max_fraction: float = BLOCK_MAX_FRACTION
    attention: str = "auto"
    gather_max_density: float = GATHER_MAX_DENSITY

    def __post_init__(self):
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(
                    f"kernels.{field}={value!r} is not supported; allowed: {', '.join(allowed)}"
                )
        _check_fraction("block_max_fraction", self.block_max_fraction, zero_ok=True)
        _check_fraction("gather_max_density", self.gather_max_density, zero_ok=False)

    @property
    def resolved(self) -> bool:
        """Whether no field is ``"auto"``."""
        return all(getattr(self, f) != "auto" for f in _CHOICES)


def _check_fraction(field: str, value: Any, *, zero_ok: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (0.0 <= value <= 1.0) or (value == 0.0 and not zero_ok):
        allowed = "[0, 1]" if zero_ok else "(0, 1]"
        raise ValueError(f"kernels.{field}={value!r}: must be a number in {allowed}")


def default(field: str, backend: str | None = None) -> str:
    """The concrete choice ``"auto"`` stands for in ``field`` on ``backend``.

    Args:
      field: "sddmm", "block_forward" or "attention".
      backend: a JAX platform name ("cpu", "gpu", "tpu"); defaults to ``jax.default_backend()``.

    Returns:
      The backend's entry of the field's table (:data:`FALLBACK` for an unknown backend).

    Raises:
      ValueError: an unknown ``field``.

    >>> default("attention", "cpu")
    'einsum'
    """
    if field not in _TABLES:
        allowed = ", ".join(_TABLES)
        raise ValueError(f"field={field!r} has no per-backend default; allowed: {allowed}")
    return _TABLES[field].get(backend or jax.default_backend(), FALLBACK[field])


def resolve(
    options: KernelOptions | Mapping[str, Any] | None = None, backend: str | None = None
) -> KernelOptions:
    """``options`` with every ``"auto"`` replaced by the backend's default.

    Args:
      options: a :class:`KernelOptions`, a mapping of some of its fields, or None (all defaults).
      backend: a JAX platform name; defaults to ``jax.default_backend()``.

    Returns:
      A :class:`KernelOptions` with no ``"auto"`` left.

    Raises:
      ValueError: an unknown field name, or a field outside its allowed values.

    >>> resolve({"sddmm": "pallas"}, backend="cpu").block_forward
    'off'
    """
    options = from_any(options)
    backend = backend or jax.default_backend()
    auto = {f: default(f, backend) for f in _CHOICES if getattr(options, f) == "auto"}
    return dataclasses.replace(options, **auto)


def from_any(options: KernelOptions | Mapping[str, Any] | None) -> KernelOptions:
    """A :class:`KernelOptions` from itself, a mapping of its fields, or None (the defaults).

    Raises:
      ValueError: a mapping key that is not a field, or a value outside the field's choices.
    """
    if options is None:
        return KernelOptions()
    if isinstance(options, KernelOptions):
        return options
    if not isinstance(options, Mapping):
        raise ValueError(
            f"kernels: expected a KernelOptions or a mapping of its fields; got "
            f"{type(options).__name__}"
        )
    fields = [f.name for f in dataclasses.fields(KernelOptions)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"kernels: unknown field(s) {unknown}; allowed: {', '.join(fields)}")
    return KernelOptions(**options)


def as_dict(options: KernelOptions | Mapping[str, Any] | None) -> dict[str, Any]:
    """The options as a plain JSON-ready dict (field -> value), for records and fingerprints.

    >>> as_dict(KernelOptions())["block_max_fraction"]
    0.5
    """
    return dataclasses.asdict(from_any(options))


def count_calls(jaxpr: Any, name: str) -> int:
    """How many calls of the jitted function ``name`` a jaxpr holds (sub-jaxprs included).

    The ops that a test or a report may want to see in a traced step (e.g.
    :func:`guft_jax.ops.block_sddmm`) are jitted under their own name, so they appear as named
    calls in ``jax.make_jaxpr(f)(...)``: counting them shows which kernel a trace took, without
    replacing anything.

    Args:
      jaxpr: a ``ClosedJaxpr`` or ``Jaxpr``.
      name: the function's name.

    Returns:
      The number of call equations with ``params["name"] == name``.

    >>> f = jax.jit(lambda x: x + 1)
    >>> count_calls(jax.make_jaxpr(lambda x: f(f(x)))(1.0), "<lambda>")
    2
    """
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    n = 0
    for eqn in inner.eqns:
        n += eqn.params.get("name") == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax_core.Jaxpr | jax_core.ClosedJaxpr):
                    n += count_calls(sub, name)
    return n


__all__ = [
    "ATTENTION_CHOICES",
    "ATTENTION_DEFAULTS",
    "BLOCK_FORWARD_CHOICES",
    "BLOCK_FORWARD_DEFAULTS",
    "BLOCK_MAX_FRACTION",
    "FALLBACK",
    "GATHER_MAX_DENSITY",
    "KernelOptions",
    "SDDMM_CHOICES",
    "SDDMM_DEFAULTS",
    "as_dict",
    "count_calls",
    "default",
    "from_any",
    "resolve",
]
