"""Multi-process runs on JAX's own multi-controller runtime (``jax.distributed`` + GSPMD).

Every process runs the same program: it calls :func:`initialize` (the coordinator address,
the process count and this process's id from arguments or JAX's usual environment variables
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; on TPU pods and SLURM
JAX detects them itself), builds the same mesh over ``jax.devices()``
(:func:`guft_jax.sharding.make_mesh`) and feeds its own rows of every global batch
(:func:`global_batches`), which ``jax.make_array_from_process_local_data`` assembles into one
global array. Process 0 alone writes logs, metrics, results and progress bars; orbax writes
checkpoints from all processes (each its own shards).

A source whose ``raw(split)`` returns indexable ``(images, labels)`` (``ArraySource``) is read
row by row: a process loads and preprocesses only the examples of its rows, in the epoch's
permutation (:func:`guft_jax.data.pipeline.epoch_order`), so the global batches equal a single
process's. Other sources (tfds) are read batch by batch and each process keeps its rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from guft_jax import sharding as shard_lib
from guft_jax.data.pipeline import check_batch_args, epoch_order, normalization_stats, preprocess

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: dict | None = None,
) -> bool:
    """``jax.distributed.initialize`` from arguments or the environment (``ENV``); returns
    whether it was called. Nothing given and no ``JAX_*`` variable set: a single process
    (auto-detection on TPU / SLURM is asked for with ``coordinator_address="auto"``).
    """
    env = os.environ if environ is None else environ
    addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    i = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    if addr is None and n is None and i is None:
        return False
    if addr == "auto":  # JAX's cluster detection (TPU pod slices, SLURM, ...)
        jax.distributed.initialize()
        return True
    jax.distributed.initialize(
        coordinator_address=addr,
        num_processes=None if n is None else int(n),
        process_id=None if i is None else int(i),
    )
    return True


def gather_processes(tree: Any) -> Any:
    """Host numpy copies of (possibly multi-process, sharded) global arrays, on every process."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def _indexable(source, split):
    raw = getattr(source, "raw", None)
    if raw is None:
        return None
    got = raw(split)
    if isinstance(got, tuple) and len(got) == 2 and hasattr(got[0], "__getitem__"):
        return got
    return None


def global_batches(
    source,
    split: str,
    *,
    mesh,
    batch_size: int,
    image_size: int,
    normalization: str = "imagenet",
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
    on_load: Callable[[np.ndarray], None] | None = None,
) -> Iterator[tuple[jax.Array, jax.Array, jax.Array, int]]:
    """One epoch of global ``(images, labels int32, weights float32, n)`` batches on ``mesh``.

    Each process loads only the examples of its rows (:func:`guft_jax.sharding.local_rows`);
    a last, smaller batch is padded to ``batch_size`` with zero-weight rows (``n`` is its real
    size, the same on every process). ``on_load`` receives the example indices this process
    read (tests).
    """
    rows = shard_lib.local_rows(mesh, batch_size)
    arrays = _indexable(source, split)
    if arrays is None:
        yield from _sliced_batches(
            source, split, rows, mesh=mesh, batch_size=batch_size, image_size=image_size,
            normalization=normalization, shuffle=shuffle, seed=seed, epoch=epoch,
            drop_remainder=drop_remainder,
        )  # fmt: skip
        return
    images, labels = arrays
    n = len(labels)
    nb = check_batch_args(split, batch_size, image_size, 0, n, drop_remainder)
    normalization_stats(normalization)
    order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    resize = getattr(source, "resize_method", "bilinear")
    for step in range(nb):
        idx = order[step * batch_size : (step + 1) * batch_size]
        mine = idx[rows]  # rows past a short batch's end: padding
        if on_load is not None:
            on_load(np.asarray(mine))
        if hasattr(images, "shape"):  # one array (or a view of one); else a list of images
            batch = images[mine]
        else:
            batch = [images[i] for i in mine]
        x = preprocess(
            batch, image_size=image_size, normalization=normalization, resize_method=resize
        )
        y = np.asarray(labels[mine], np.int32)
        yield _assemble(x, y, rows, mesh, batch_size, image_size, len(idx))


def _assemble(x, y, rows, mesh, batch_size, image_size, m):
    """Pads this process's rows to ``rows``' length and makes the global arrays."""
    want = rows.stop - rows.start
    w = np.ones(want, np.float32)
    if len(y) < want:
        pad = want - len(y)
        x = np.concatenate([x, np.zeros((pad, image_size, image_size, 3), np.float32)])
        y = np.concatenate([y, np.zeros((pad,), np.int32)])
        w[want - pad :] = 0
    x, y, w = shard_lib.put_local_batch((x, y, w), mesh, batch_size)
    return x, y, w, m


def _sliced_batches(source, split, rows, *, mesh, batch_size, image_size, **kw):
    for x, y in source.batches(split, batch_size=batch_size, image_size=image_size, **kw):
        m = len(y)
        yield _assemble(
            np.asarray(x[rows]), np.asarray(y[rows], np.int32), rows, mesh, batch_size,
            image_size, m,
        )  # fmt: skip
