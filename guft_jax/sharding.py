"""Sharding as data: a Mesh and ``(regex, PartitionSpec)`` rules over ``/``-joined param paths.

Batches are split over the ``data`` axis; params and the train state are replicated unless a rule
says otherwise (e.g. FSDP of large frozen kernels over ``data``: ``(r"kernel$", P(None, "data"))``
only applies where the dimension divides). Used as ``jax.jit(in_shardings=..., out_shardings=...)``;
no ``pmap``. Multi-host: every process builds the same mesh over ``jax.devices()`` and feeds its
own slice of the global batch (:func:`process_batch_slice`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from guft_jax.paths import path_map

DATA = "data"


def make_mesh(num_devices: int | None = None, *, axis: str = DATA) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices: must be in [1, {len(devices)}], got {num_devices}")
    return Mesh(np.asarray(devices[:n]), (axis,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = ()) -> Any:
    """Per-leaf ``NamedSharding``: the first matching rule whose spec fits the leaf's shape
    (each sharded dim divisible by its mesh axis size), else replicated."""
    compiled = [(re.compile(r), spec) for r, spec in rules]

    def fits(spec: P, shape: tuple) -> bool:
        if len(spec) > len(shape):
            return False
        for dim, ax in zip(shape, spec, strict=False):
            if ax is not None and dim % mesh.shape[ax]:
                return False
        return True

    def one(path: str, x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        for rx, spec in compiled:
            if rx.search(path) and fits(spec, shape):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return path_map(one, tree)


def process_batch_slice(global_batch: int) -> slice:
    """The rows of a global batch that this process feeds (multi-host data loading)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"batch_size: {global_batch} is not divisible by {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def put_batch(batch: Any, mesh: Mesh | None) -> Any:
    """Places a host batch on the mesh, split over ``data`` (a no-op copy without a mesh)."""
    if mesh is None:
        return jax.tree_util.tree_map(jax.numpy.asarray, batch)
    return jax.device_put(batch, batch_sharding(mesh))
