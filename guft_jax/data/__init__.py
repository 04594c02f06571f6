"""Data sources for VTAB-1K (tensorflow-datasets) and offline real datasets, one interface.

Every source yields numpy batches ``(images float32 (B, S, S, 3), labels int32 (B,))`` for the
four VTAB-1K splits, preprocessed the VTAB-1K way (resize straight to ``image_size``, grey -> RGB,
``"imagenet"`` or ``"0.5"`` normalisation), deterministically for a given ``(seed, epoch)``.

>>> src = get_source("digits")  # doctest: +SKIP
>>> x, y = next(src.batches("train800", batch_size=64, image_size=32))  # doctest: +SKIP
>>> x.shape, y.shape  # doctest: +SKIP
((64, 32, 32, 3), (64,))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

from guft_jax.data.offline import (
    OFFLINE,
    dedupe,
    load_offline,
    offline_source,
    split_indices,
)
from guft_jax.data.pipeline import (
    NORMALIZATIONS,
    SPLITS,
    ArraySource,
    normalize,
    preprocess,
    resize_images,
    resize_matrix,
)


@runtime_checkable
class DataSource(Protocol):
    """What the training engine reads. ``ArraySource`` and ``vtab.TfdsSource`` implement it."""

    name: str
    num_classes: int

    def size(self, split: str) -> int:
        """Number of examples in ``split`` (one of :data:`SPLITS`)."""
        ...

    def batches(
        self,
        split: str,
        *,
        batch_size: int,
        image_size: int,
        normalization: str = "imagenet",
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_remainder: bool = False,
        start_step: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of batches; ``start_step`` skips that many batches (mid-epoch resume)."""
        ...


def get_source(name: str, **kw) -> DataSource:
    """Builds a data source by name.

    Args:
      name: "fashion_mnist", "animal_mnist", "digits", "npz:/path/file.npz",
        "folder:/path/dir", or "vtab/<task>" (one of ``vtab.TASKS``, e.g. "vtab/cifar100").
      **kw: offline sources: ``seed``, ``test_size``, ``train_size``, ``val_size``, ``data_dir``,
        ``num_classes``, ``resize_method``; VTAB: ``data_dir``, ``version``, ``resize_method``,
        ``test_size``.

    Returns:
      A :class:`DataSource`.

    Raises:
      ValueError: unknown name (the message lists the allowed ones) or bad options.
    """
    if name.startswith("vtab/"):
        from guft_jax.data import vtab  # imports tensorflow lazily

        return vtab.vtab_source(name[len("vtab/") :], **kw)
    return offline_source(name, **kw)


__all__ = [
    "NORMALIZATIONS",
    "OFFLINE",
    "SPLITS",
    "ArraySource",
    "DataSource",
    "dedupe",
    "get_source",
    "load_offline",
    "normalize",
    "offline_source",
    "preprocess",
    "resize_images",
    "resize_matrix",
    "split_indices",
]
