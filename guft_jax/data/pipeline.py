"""Preprocessing shared by every data source: resize, grey -> RGB, normalisation, batching.

VTAB-1K preprocessing is a plain resize to ``image_size`` (no crop, no augmentation)
followed by one of two normalisations. Images stay ``uint8`` at their native size until a batch is
built, so a 1,000-image split costs its native bytes, not ``1000 * 224 * 224 * 3 * 4``.

The resize is a pair of static matrices (half-pixel centres, clamped borders, no antialiasing),
which is what ``tf.image.resize(method="bilinear")`` and ``torch`` ``interpolate(mode="bilinear",
align_corners=False)`` compute; the tf.data path of :mod:`guft_jax.data.vtab` uses
``tf.image.resize`` and the tests check the two agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np

from guft_jax.data.splits import (
    SPLITS,
    report_names,
    split_parts,
    stored_splits,
)
from guft_jax.errors import InputError

NORMALIZATIONS = {
    # torchvision / timm ImageNet statistics (NOAH, VPT, FacT).
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Inception-style [-1, 1] scaling (SSF, GPS, the HF in21k checkpoints).
    "0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
RESIZE_METHODS = ("bilinear", "bicubic")


def check_choice(field: str, value, allowed: Sequence) -> None:
    """Raises an ``InputError`` naming ``field`` and the allowed values if ``value`` is not one."""
    if value not in allowed:
        raise InputError(
            f"{field}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}"
        )


def normalization_stats(normalization: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` float32 arrays of shape (3,) for "imagenet" or "0.5"."""
    check_choice("normalization", normalization, tuple(NORMALIZATIONS))
    mean, std = NORMALIZATIONS[normalization]
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def normalize(images: np.ndarray, normalization: str) -> np.ndarray:
    """Maps pixel values in [0, 255] to ``(x / 255 - mean) / std`` (float32, channels last).

    >>> normalize(np.full((1, 1, 1, 3), 255, np.uint8), "0.5")[0, 0, 0].tolist()
    [1.0, 1.0, 1.0]
    """
    mean, std = normalization_stats(normalization)
    x = np.asarray(images, np.float32) / np.float32(255.0)
    return (x - mean) / std


@lru_cache(maxsize=64)
def _resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    if method == "bicubic":
        from guft_jax.vit import bicubic_matrix  # torch-style bicubic, a = -0.75

        return bicubic_matrix(in_size, out_size).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        lo = math.floor(src)
        frac = src - lo
        m[o, min(lo, in_size - 1)] += 1.0 - frac
        m[o, min(lo + 1, in_size - 1)] += frac
    return m.astype(np.float32)


def resize_matrix(in_size: int, out_size: int, method: str = "bilinear") -> np.ndarray:
    """The ``(out_size, in_size)`` float32 matrix of 1-D resampling (half-pixel centres).

    Args:
      in_size: input length.
      out_size: output length.
      method: "bilinear" (as ``tf.image.resize``, no antialiasing) or "bicubic" (as torch).

    Returns:
      A matrix ``R`` with ``resized = R @ signal``; rows sum to one.

    Raises:
      ValueError: for an unknown ``method`` or a non-positive size.
    """
    check_choice("resize_method", method, RESIZE_METHODS)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    return _resize_matrix(int(in_size), int(out_size), method)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """Channels-last images ``(..., H, W, C)`` with C in {1, 3, 4} -> ``(..., H, W, 3)``.

    Grey (C = 1) is repeated, RGBA drops alpha, RGB passes through unchanged.
    """
    images = np.asarray(images)
    c = images.shape[-1] if images.ndim >= 3 else None
    if c == 3:
        return images
    if c == 1:
        return np.repeat(images, 3, axis=-1)
    if c == 4:
        return images[..., :3]
    raise ValueError(
        f"images must be channels-last with 1, 3 or 4 channels, got shape {images.shape}"
    )


def resize_images(images: np.ndarray, image_size: int, method: str = "bilinear") -> np.ndarray:
    """Resizes a ``(B, H, W, C)`` batch straight to ``(B, image_size, image_size, C)`` float32.

    Values stay in the input range (no normalisation). Same size in and out is exact.
    """
    x = np.asarray(images, np.float32)
    b, h, w, c = x.shape
    if (h, w) == (image_size, image_size):
        return x
    rh = resize_matrix(h, image_size, method)
    rw = resize_matrix(w, image_size, method)
    x = np.moveaxis(x, -1, 1)  # (B, C, H, W)
    x = rh @ x @ rw.T  # (B, C, S, S)
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def preprocess(
    images: np.ndarray | Sequence[np.ndarray],
    *,
    image_size: int,
    normalization: str = "imagenet",
    resize_method: str = "bilinear",
) -> np.ndarray:
    """uint8 images (a batch array or a list of differently sized images) -> model input.

    Grey images become 3 channels, each image is resized straight to ``image_size`` and the
    result is normalised. Returns float32 ``(B, image_size, image_size, 3)``.
    """
    normalization_stats(normalization)  # validate before doing any work
    if isinstance(images, np.ndarray):
        out = resize_images(to_rgb(images), image_size, resize_method)
    else:
        out = (
            np.concatenate(
                [resize_images(to_rgb(im)[None], image_size, resize_method) for im in images]
            )
            if len(images)
            else np.zeros((0, image_size, image_size, 3), np.float32)
        )
    return normalize(out, normalization)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: identity, or a permutation fixed by ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    """How many batches an epoch of ``n`` examples gives."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def check_batch_args(
    split: str, batch_size: int, image_size: int, start_step: int, n: int, drop_remainder: bool
) -> int:
    """Validates the common ``batches`` arguments; returns the number of batches per epoch."""
    check_choice("split", split, SPLITS)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    nb = num_batches(n, batch_size, drop_remainder)
    if not 0 <= int(start_step) <= nb:
        raise ValueError(f"start_step must be in [0, {nb}] for split {split!r}, got {start_step}")
    return nb


def describe_source(source) -> dict:
    """Name, classes, split sizes, split rule and notes of any data source, for run reports.

    The split sizes are keyed by the source's own names for its three splits: VTAB-1K's
    (``train800``, ``val200``, ``test``) where the source has them, else ``train``, ``val``,
    ``test``.

    >>> describe_source(ArraySource("toy", 2, {s: (np.zeros((1, 2, 2, 1), np.uint8), [0])
    ...     for s in ("train", "val", "test")}))["split_sizes"]
    {'train800': 1, 'val200': 1, 'test': 1}
    """
    info = dict(getattr(source, "info", {}) or {})
    names = report_names(getattr(source, "vtab_names", True))
    out = {
        "dataset": source.name,
        "num_classes": int(source.num_classes),
        "class_names": list(getattr(source, "class_names", ()) or ()),
        "split_sizes": {s: int(source.size(s)) for s in names},
        "notes": list(getattr(source, "notes", ()) or ()),
    }
    out.update({k: v for k, v in info.items() if k != "split_sizes"})
    return out


def summary_line(source) -> str:
    """One line for a run log: dataset, classes, split sizes and the rule that gave them."""
    d = describe_source(source)
    names = d["class_names"]
    shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
    train, val, test = d["split_sizes"].values()
    line = (
        f"data {d['dataset']}: {d['num_classes']} classes"
        + (f" ({shown})" if names else "")
        + f"; train {train} / val {val} / test {test}"
    )
    if d.get("split_rule"):
        line += f" [{d['split_rule']}]"
    return line


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A :class:`~guft_jax.data.DataSource` over in-memory uint8 images (native size).

    Attributes:
      name: dataset name (for logs and results).
      num_classes: number of classes; labels are in ``[0, num_classes)``.
      splits: ``{"train"|"val"|"test": (images, labels)}``; images are a ``(N, H, W[, C])``
        uint8 array or a list of ``(H, W[, C])`` arrays of varying size. ``"trainval"`` is the
        concatenation of the first two. Given with the VTAB-1K names (``train800``, ``val200``)
        the keys are stored as ``train``, ``val`` (:func:`guft_jax.data.splits.stored_splits`).
      resize_method: "bilinear" or "bicubic".
      class_names: one name per class (folder names, the npz's names, or the labels as text);
        empty when unknown.
      notes: what was converted or ignored while reading, one sentence each (for the report).
      info: how the data was split and read (``split_rule``, ``num_images``, ``label_map``,
        ``skipped_files``, ``ignored_files``), JSON-serialisable.
      vtab_names: whether the VTAB-1K names ``train800``, ``val200``, ``train800val200`` are
        accepted (aliases of ``train``, ``val``, ``trainval``) and used in records; users' data,
        whose sizes are not VTAB-1K's, sets ``False``.
    """

    name: str
    num_classes: int
    splits: dict
    resize_method: str = "bilinear"
    class_names: tuple = ()
    notes: tuple = ()
    info: dict = dataclasses.field(default_factory=dict)
    vtab_names: bool = True

    def __post_init__(self):
        object.__setattr__(self, "splits", stored_splits(self.splits, vtab_names=self.vtab_names))

    @property
    def split_sizes(self) -> dict[str, int]:
        """Images per stored split, keyed as in records (``train800`` / ``train``, ...)."""
        names = report_names(self.vtab_names)
        stored = ("train", "val", "test")
        return {s: len(self.splits[p][1]) for s, p in zip(names, stored, strict=True)}

    def describe(self) -> dict:
        """What a run report states about the data (JSON-serialisable)."""
        return describe_source(self)

    def _split(self, split: str):
        parts = split_parts(split, vtab_names=self.vtab_names)
        if len(parts) == 2:
            (xa, ya), (xb, yb) = (self.splits[p] for p in parts)
            if (
                isinstance(xa, np.ndarray)
                and isinstance(xb, np.ndarray)
                and (xa.shape[1:] == xb.shape[1:])
            ):
                return np.concatenate([xa, xb]), np.concatenate([ya, yb])
            return list(xa) + list(xb), np.concatenate([ya, yb])
        return self.splits[parts[0]]

    def size(self, split: str) -> int:
        """Number of examples in ``split``."""
        return len(self._split(split)[1])

    def raw(self, split: str):
        """The native uint8 images and int labels of ``split`` (no preprocessing)."""
        return self._split(split)

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
        """Yields ``(images float32 (B, S, S, 3), labels int32 (B,))``; see ``DataSource``."""
        images, labels = self._split(split)
        n = len(labels)
        nb = check_batch_args(split, batch_size, image_size, start_step, n, drop_remainder)
        normalization_stats(normalization)
        order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
        return self._iterate(
            images, labels, order, nb, batch_size, image_size, normalization, start_step
        )

    def _iterate(self, images, labels, order, nb, batch_size, image_size, normalization, start):
        for step in range(start, nb):
            idx = order[step * batch_size : (step + 1) * batch_size]
            if isinstance(images, np.ndarray):
                batch = images[idx]
            else:
                batch = [images[i] for i in idx]
            x = preprocess(
                batch,
                image_size=image_size,
                normalization=normalization,
                resize_method=self.resize_method,
            )
            yield x, np.asarray(labels[idx], np.int32)
