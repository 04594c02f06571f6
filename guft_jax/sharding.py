"""Sharding as data: a ``("data", "fsdp")`` Mesh and ``(regex, strategy)`` rules over ``/``-joined
paths.

Batches are split over both axes (``P(("data", "fsdp"))``: every device holds its own rows).
Params and the train state are replicated unless a rule says otherwise. A rule is
``(regex, PartitionSpec)`` (used where it fits: each sharded dim divisible by its mesh axes) or
``(regex, Fsdp(...))``: ZeRO-3 style, the leaf's largest dimension divisible by the ``fsdp``
axis size is split over it (leaves under ``min_size`` entries stay replicated). The first rule
whose regex matches and whose target fits wins; no match: replicated. Since Adam's moments
mirror the trainable tree (their paths end with the leaf's path), one rule covers a kernel,
its gradient and both moments; GSPMD all-gathers a sharded kernel where the step uses it.

The rules per method family (:data:`FSDP_RULES` is their union, the CLI's ``fsdp > 1``
default), over the frozen params and the whole :class:`~guft_jax.train.TrainState`:

- dense (frozen backbone; full fine-tuning's trainable tree and moments):
  ``(kernel|embedding|scale|bias)$`` -> ``Fsdp()``;
- LoRA-style factors ``lora/<kernel>/{A,B}`` (and their moments) -> ``Fsdp()``: the long
  (feature) side of each factor is split, the rank side never divides;
- GUFT sparse state, per leaf fixed-capacity ``(indices, values)``: the flat indices
  ``method_state/selected/<leaf>``, the values ``trainable/delta/<leaf>`` and their moments
  ``.../delta/<leaf>`` -> ``Fsdp()`` (1-D: split along the capacity where it divides; the
  gather/scatter into the all-gathered kernel is partitioned by GSPMD).

Used as ``jax.jit(in_shardings=..., out_shardings=...)``; no ``pmap``. Multi-host: every
process builds the same mesh over ``jax.devices()`` and assembles each global batch from its
own rows (:mod:`guft_jax.distributed`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from guft_jax.paths import path_map

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)
BATCH = P(AXES)  # rows over every device of the 2-D mesh


class Fsdp(NamedTuple):
    """Rule target: split the largest dimension divisible by ``axis``'s size (ZeRO-3); leaves
    with fewer than ``min_size`` entries (biases, norms, LoRA's small factors) stay replicated,
    their all-gathers would cost more than they save."""

    axis: str = FSDP
    min_size: int = 2**14


DENSE_RULES = ((r"(kernel|embedding|scale|bias)$", Fsdp()),)
LORA_RULES = ((r"lora/[^/]+/[AB]$", Fsdp()),)
GUFT_RULES = ((r"(delta|selected)/[^/]+$", Fsdp()),)
FSDP_RULES = DENSE_RULES + LORA_RULES + GUFT_RULES


def fsdp_rules(min_size: int = Fsdp().min_size, *, axis: str = FSDP) -> tuple:
    """:data:`FSDP_RULES` with another ``min_size`` (0: shard every leaf that divides)."""
    return tuple((rx, Fsdp(axis, min_size)) for rx, _ in FSDP_RULES)


def make_mesh(num_devices: int | None = None, *, fsdp: int = 1, devices=None) -> Mesh:
    """A 2-D ``("data", "fsdp")`` mesh of shape ``(n // fsdp, fsdp)`` over the first ``n``
    devices (all by default, all processes' devices in ``jax.devices()`` order, so each
    process holds whole ``data`` rows when ``fsdp`` divides its local device count).

    Both axes are ``AxisType.Auto`` (GSPMD propagation), set explicitly: newer JAX versions
    default ``jax.make_mesh`` to Explicit axes.

    >>> make_mesh(1).shape
    OrderedDict([('data', 1), ('fsdp', 1)])
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices: must be in [1, {len(devices)}], got {num_devices}")
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp: must be >= 1 and divide {n} devices, got {fsdp}")
    if n < len(devices) and jax.process_count() > 1:
        raise ValueError(f"num_devices: a multi-process run uses all {len(devices)} devices")
    return jax.make_mesh(
        (n // fsdp, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:n]
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH if FSDP in mesh.axis_names else P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, ax) -> int:
    axes = ax if isinstance(ax, tuple) else (ax,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(target: Any, shape: tuple, mesh: Mesh) -> P | None:
    """The PartitionSpec a rule target gives a leaf of ``shape`` (``None``: does not fit)."""
    if isinstance(target, Fsdp):
        if target.axis not in mesh.axis_names:
            return None
        k = mesh.shape[target.axis]
        if k == 1 or int(np.prod(shape, dtype=np.int64)) < max(target.min_size, 1):
            return None
        dims = [d for d in range(len(shape)) if shape[d] % k == 0]
        if not dims:
            return None
        best = max(dims, key=lambda d: (shape[d], -d))  # largest; ties: the first
        return P(*([None] * best + [target.axis]))
    if len(target) > len(shape):
        return None
    for dim, ax in zip(shape, target, strict=False):
        if ax is not None and dim % _axis_size(mesh, ax):
            return None
    return target


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = ()) -> Any:
    """Per-leaf ``NamedSharding``: the first matching rule whose target fits the leaf's shape,
    else replicated. ``tree`` may hold arrays or ``jax.ShapeDtypeStruct`` (no allocation)."""
    compiled = [(re.compile(r), target) for r, target in rules]

    def one(path: str, x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        for rx, target in compiled:
            if rx.search(path):
                spec = spec_for(target, shape, mesh)
                if spec is not None:
                    return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return path_map(one, tree)


def local_rows(mesh: Mesh, global_batch: int) -> slice:
    """The contiguous rows of a global batch that this process's devices hold under
    :func:`batch_sharding` (read from the sharding itself)."""
    idx = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    spans = sorted(
        {(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()}
    )
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(f"mesh: this process's batch rows are not contiguous: {spans}")
    return slice(lo, hi)


def put_batch(batch: Any, mesh: Mesh | None) -> Any:
    """Places a whole host batch on the mesh (one process), split over the batch axes (a
    no-op copy without a mesh). Multi-process: :func:`put_local_batch`."""
    if mesh is None:
        return jax.tree_util.tree_map(jax.numpy.asarray, batch)
    return jax.device_put(batch, batch_sharding(mesh))


def put_local_batch(local: Any, mesh: Mesh, global_batch: int) -> Any:
    """Global arrays of ``global_batch`` rows assembled from this process's rows
    (:func:`local_rows`) with ``jax.make_array_from_process_local_data``."""
    sh = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            sh, np.asarray(x), (global_batch,) + np.shape(x)[1:]
        ),
        local,
    )
