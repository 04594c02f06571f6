"""Reader of ``npz:`` datasets: an ``.npz`` archive of ``images`` and ``labels``, checked.

Arrays ``images`` (N, H, W) or (N, H, W, C) with C in {1, 3, 4} and ``labels`` (N,). Pixels may be
uint8, uint16 (16-bit: scaled by 255/65535, as 16-bit images in folders, and noted), integers in
[0, 255], or finite floats in [0, 1] (scaled by 255) or [0, 255] (rounded). Labels may be
integers (or integral floats), or strings (the class names, sorted). Optional arrays:
``class_names`` (names indexed by integer label) and ``test_images`` / ``test_labels`` (an
explicit test set). Every problem raises :class:`~guft_jax.errors.InputError` with one line
naming the file and what is wrong (truncated archive, a ``.npy`` or text file given as ``.npz``,
NaN in float pixels, labels that are not integers, ...).
"""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

from guft_jax.data.labels import check_label_array
from guft_jax.data.pool import SIXTEEN_BIT_NOTE, Pool
from guft_jax.errors import InputError, MissingInputError


def _check_npz_file(path: str) -> None:
    if not os.path.exists(path):
        raise MissingInputError(f"{path}: npz file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not an .npz file (use folder:{path} for images)")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot be read (permission denied)")
    size = os.path.getsize(path)
    if size == 0:
        raise InputError(f"{path}: is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        raise InputError(
            f"{path}: is a .npy file (one array), not an .npz archive; save both arrays with "
            "np.savez(path, images=images, labels=labels)"
        )
    if not head.startswith(b"PK"):
        kind = "a text file" if _looks_like_text(path) else "not a zip archive"
        raise InputError(
            f"{path}: not an .npz archive ({kind}); expected np.savez(path, images=..., labels=...)"
        )


def _looks_like_text(path: str) -> bool:
    with open(path, "rb") as f:
        chunk = f.read(512)
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in chunk


_NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


def _npz_array(f, key: str, path: str) -> np.ndarray:
    try:
        return np.asarray(f[key])
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise InputError(
                f"{path}: array {key!r} holds Python objects (pickled); save numeric or string "
                "arrays (e.g. np.stack the images into one uint8 array)"
            ) from e
        raise InputError(f"{path}: array {key!r} cannot be read, the file is corrupt ({e})") from e
    except _NPZ_READ_ERRORS as e:
        raise InputError(
            f"{path}: array {key!r} cannot be read, the archive is truncated or corrupt "
            f"({type(e).__name__}: {e})"
        ) from e


def read_npz(path: str, *, prefix: str = "") -> tuple[Pool, Pool | None]:
    """Reads an ``.npz`` of ``images`` and ``labels`` (plus optional ``test_*`` arrays).

    Args:
      path: the archive.
      prefix: array-name prefix (internal: ``"test_"`` for an explicit test set).

    Returns:
      ``(pool, test_pool or None)``; the test pool comes from ``test_images`` / ``test_labels``.

    Raises:
      InputError: one line naming ``path`` and the problem (missing, not an npz, truncated,
        missing or malformed arrays, NaN/Inf pixels, bad labels).
    """
    _check_npz_file(path)
    try:
        f = np.load(path, allow_pickle=False)
    except _NPZ_READ_ERRORS as e:
        raise InputError(
            f"{path}: truncated or corrupt .npz archive ({type(e).__name__}: {e})"
        ) from e
    with f:
        files = list(f.files)
        want = [prefix + "images", prefix + "labels"]
        missing = [k for k in want if k not in files]
        if missing:
            raise InputError(
                f"{path}: no array {missing[0]!r} (found {sorted(files)}); save with "
                "np.savez(path, images=images, labels=labels)"
            )
        x = _npz_array(f, want[0], path)
        y = _npz_array(f, want[1], path)
        names = _npz_array(f, "class_names", path) if "class_names" in files else None
        has_test = not prefix and "test_images" in files
        if not prefix and ("test_images" in files) != ("test_labels" in files):
            raise InputError(f"{path}: has one of test_images / test_labels but not the other")
    notes = []
    images = _check_images(x, path, notes, key=want[0])
    labels = check_label_array(y, len(images), path, notes, key=want[1])
    class_names = None
    if names is not None:
        if names.ndim != 1 or not np.issubdtype(names.dtype, np.str_):
            raise InputError(
                f"{path}: class_names must be a 1-D array of strings, got {names.dtype}"
            )
        class_names = tuple(str(s) for s in names)
    pool = Pool(images, labels, class_names, tuple(notes), {"source_file": path})
    test = read_npz(path, prefix="test_")[0]._replace(class_names=class_names) if has_test else None
    return pool, test


def _check_images(x: np.ndarray, path: str, notes: list, key: str = "images") -> np.ndarray:
    where = f"{path}: {key}"
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise InputError(f"{where} has shape {x.shape}; expected (N, H, W) or (N, H, W, C)")
    if len(x) == 0:
        raise InputError(f"{where} holds no images (shape {x.shape})")
    if x.shape[-1] not in (1, 3, 4):
        if x.shape[1] in (1, 3, 4):
            raise InputError(
                f"{where} has shape {x.shape}, channels first; expected channels last "
                f"(N, H, W, C): use images.transpose(0, 2, 3, 1)"
            )
        raise InputError(f"{where} has {x.shape[-1]} channels (shape {x.shape}); allowed: 1, 3, 4")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise InputError(f"{where} has empty images (shape {x.shape})")
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            first = int(np.argmax(bad.reshape(len(x), -1).any(1)))
            raise InputError(
                f"{where} holds {int(bad.sum())} NaN/Inf pixel values (first in image {first})"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0 and hi <= 1:
            x = np.round(x.astype(np.float64) * 255.0).astype(np.uint8)
            notes.append(f"{key}: float pixels in [0, 1] scaled by 255 to uint8")
        elif lo >= 0 and hi <= 255:
            x = np.round(x).astype(np.uint8)
            notes.append(f"{key}: float pixels in [0, 255] rounded to uint8")
        else:
            raise InputError(
                f"{where} are floats in [{lo:g}, {hi:g}]; allowed: [0, 1] or [0, 255] (uint8 best)"
            )
    elif x.dtype == np.uint16:  # 16-bit pixels, as a 16-bit PNG in a folder
        x = np.round(x.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
        notes.append(f"{key}: {SIXTEEN_BIT_NOTE}")
    elif np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise InputError(
                f"{where} are {x.dtype} in [{lo}, {hi}]; allowed: 0..255 (8-bit pixels)"
            )
        notes.append(f"{key}: {x.dtype.name} pixels in [0, 255] converted to uint8")
        x = x.astype(np.uint8)
    else:
        raise InputError(f"{where} have dtype {x.dtype}; allowed: uint8, integers, floats")
    if x.shape[-1] == 4:
        notes.append(f"{key}: RGBA, alpha channel dropped")
    return x
