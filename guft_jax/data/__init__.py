"""Data sources for VTAB-1K (tensorflow-datasets) and offline real datasets, one interface.

Every source yields numpy batches ``(images float32 (B, S, S, 3), labels int32 (B,))`` for the
splits ``train``, ``val``, ``trainval`` and ``test`` (VTAB-1K tasks and the packaged datasets
also under VTAB-1K's names ``train800``, ``val200``, ``train800val200``: :mod:`.splits`),
preprocessed the VTAB-1K way (resize straight to ``image_size``, grey -> RGB,
``"imagenet"`` or ``"0.5"`` normalisation), deterministically for a given ``(seed, epoch)``.

>>> src = get_source("digits")  # doctest: +SKIP
>>> x, y = next(src.batches("train", batch_size=64, image_size=32))  # doctest: +SKIP
>>> x.shape, y.shape  # doctest: +SKIP
((64, 32, 32, 3), (64,))
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

from guft_jax.data.offline import OFFLINE, dedupe, load_offline, offline_source
from guft_jax.data.pipeline import (
    NORMALIZATIONS,
    ArraySource,
    describe_source,
    normalize,
    preprocess,
    resize_images,
    resize_matrix,
    summary_line,
)
from guft_jax.data.splits import (
    SPLIT_NAMES,
    SPLITS,
    VTAB_ALIASES,
    canonical_split,
    record_name,
    split_indices,
    split_parts,
    split_sizes,
)
from guft_jax.data.user import load_user_data
from guft_jax.errors import InputError


@runtime_checkable
class DataSource(Protocol):
    """What the training engine reads. ``ArraySource`` and ``vtab.TfdsSource`` implement it."""

    name: str
    num_classes: int

    def size(self, split: str) -> int:
        """Number of examples in ``split`` (one of :data:`SPLITS` the source accepts)."""
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


def _hash_split(parts) -> str:
    """SHA-256 over ``[(images, labels), ...]``: each image's dtype, shape and bytes, then the
    labels as int64."""
    h = hashlib.sha256()
    for images, labels in parts:
        for image in [images] if isinstance(images, np.ndarray) else images:
            a = np.ascontiguousarray(image)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        h.update(b"labels")
        h.update(np.ascontiguousarray(np.asarray(labels, np.int64)).tobytes())
    return h.hexdigest()


def data_identity(source, splits) -> dict[str, dict]:
    """What a resume checks the data against: per split, the image count and a content hash.

    The hash is SHA-256 over every image's dtype, shape and bytes, then the labels (int64), of
    the split as an :class:`ArraySource` holds it (``source.splits``, not ``raw``, which a
    multi-process run reads per process); other sources (VTAB's tfds,
    whose data the config's ``version`` fixes) give the count only. Hashing reads the images
    once at memory speed (about 1 s per GB); :func:`guft_jax.train.fit` calls it once per run.

    Args:
      source: a :class:`DataSource`.
      splits: the split names a run reads (``None`` entries are skipped).

    Returns:
      ``{split: {"count": int, "sha256": str | None}}`` (JSON-serialisable).

    Entries are keyed by the source's record name of the split
    (:func:`guft_jax.data.splits.record_name`: VTAB-1K's where the source has them), so a run
    that reads ``trainval`` checks the entry a run that read ``train800val200`` wrote.

    >>> src = ArraySource("toy", 2, {s: (np.zeros((2, 2, 2, 1), np.uint8), np.array([0, 1]))
    ...     for s in ("train", "val", "test")})
    >>> data_identity(src, ["test"])["test"]["count"]
    2
    """
    out = {}
    vtab_names = getattr(source, "vtab_names", True)
    for split in dict.fromkeys(s for s in splits if s):
        digest = None
        if isinstance(source, ArraySource):  # in-memory arrays; tfds' raw() is a tf.data pipeline
            parts = split_parts(split, vtab_names=vtab_names)
            digest = _hash_split(source.splits[n] for n in parts)
        key = record_name(split, vtab_names=vtab_names)
        out[key] = {"count": int(source.size(split)), "sha256": digest}
    return out


def get_source(name: str, **kw) -> DataSource:
    """Builds a data source by name.

    Args:
      name: "fashion_mnist", "animal_mnist", "digits", "npz:/path/file.npz",
        "folder:/path/dir", or "vtab/<task>" (one of ``vtab.TASKS``, e.g. "vtab/cifar100").
      **kw: offline sources: ``seed``, ``train_size``, ``val_size``, ``test_size`` (counts or
        fractions, ``None`` for the default), ``data_dir``, ``num_classes``, ``resize_method``,
        ``skip_bad`` (user folders: skip unreadable images); VTAB: ``data_dir``, ``version``,
        ``resize_method``. User data (``npz:`` / ``folder:``) of any size is split by the
        stratified rule of :mod:`guft_jax.data.splits` (VTAB-1K 800/200/rest from 1,250 images,
        70/10/20 below) and takes the split names of :data:`SPLIT_NAMES` only; the source
        records ``class_names``, ``split_sizes``, ``notes`` and
        ``info`` (see :func:`describe_source`).

    Returns:
      A :class:`DataSource`.

    Raises:
      InputError: (a ``ValueError``) unknown name (the message lists the allowed ones), bad
        options, or a bad user file; one line naming the field or path.
    """
    if name.startswith("vtab/"):
        from guft_jax.data import vtab  # imports tensorflow lazily

        for field in ("train_size", "val_size", "test_size", "skip_bad", "seed"):
            if kw.get(field) not in (None, False, 0):
                raise InputError(
                    f"{field}={kw[field]!r}: VTAB-1K tasks have fixed splits; allowed only for "
                    "fashion_mnist, animal_mnist, digits, npz:PATH and folder:PATH"
                )
            kw.pop(field, None)
        return vtab.vtab_source(name[len("vtab/") :], **kw)
    return offline_source(name, **kw)


__all__ = [
    "NORMALIZATIONS",
    "OFFLINE",
    "SPLITS",
    "SPLIT_NAMES",
    "VTAB_ALIASES",
    "ArraySource",
    "DataSource",
    "canonical_split",
    "data_identity",
    "dedupe",
    "describe_source",
    "get_source",
    "load_offline",
    "load_user_data",
    "normalize",
    "offline_source",
    "preprocess",
    "resize_images",
    "resize_matrix",
    "split_indices",
    "split_parts",
    "split_sizes",
    "summary_line",
]
