"""Users' own labelled images: ``npz:`` archives and ``folder:`` trees, of any size, checked.

Reading. Every problem with a file raises :class:`~guft_jax.errors.InputError` with one line that
names the file and what is wrong (truncated archive, a ``.npy`` or text file given as ``.npz``,
unreadable image, NaN in float pixels, labels that are not integers, ...). What is converted
rather than refused is listed in the source's ``notes``:

- ``npz:PATH``: arrays ``images`` (N, H, W) or (N, H, W, C) with C in {1, 3, 4} and ``labels``
  (N,). Pixels may be uint8, uint16 (16-bit: scaled by 255/65535, as 16-bit images in
  folders, and noted), integers in [0, 255], or finite floats in [0, 1] (scaled by 255) or
  [0, 255] (rounded). Labels may be integers (or integral floats), or strings (the class names,
  sorted). Optional arrays: ``class_names`` (names indexed by integer label) and
  ``test_images`` / ``test_labels`` (an explicit test set).
- ``folder:PATH``: ``PATH/<class>/<image>`` or ``PATH/{train,test}/<class>/<image>``; classes
  are the sorted sub-folder names (hidden ones ignored). A folder whose sub-folders are
  ``train`` (and ``test``) is read as the split layout, never as classes named so (noted).
  Images of mixed sizes and of mixed grey / RGB / RGBA / palette / 16-bit modes are read as
  uint8 grey or RGB (alpha dropped; 16-bit scaled by 255/65535, noted) and resized per batch;
  files that are not images (by extension) and loose files are ignored and
  counted. An unreadable image is an error naming it, unless ``skip_bad=True``: then it is
  skipped and counted. An empty class folder is an error.
- An explicit test set can also be a second file or folder: ``npz:A.npz,test:B.npz`` or
  ``folder:DIR,test:TESTDIR`` (the text after the last ``,test:``).

Labels. Integer labels that are exactly ``0..K-1`` are used as they are; otherwise (e.g.
``{3, 7, 9}`` or ``{0, 2**40}``: by rank, no table as large as a label) they are remapped to
``0..K-1`` in sorted order and the mapping is recorded
(``info["label_map"]``, and ``class_names`` are the original labels unless the file names
them). With ``num_classes`` given nothing is remapped and every label must be in
``[0, num_classes)``. Negative labels, one class only, and test labels that never occur in
training are errors.

Splitting (:func:`split_sizes`, :func:`stratified_split`). The VTAB-1K protocol's
``train800`` / ``val200`` / ``test`` split names are kept whatever the sizes:

- a pool of at least :data:`VTAB_MIN_POOL` (1,250) images and no explicit test set: 800 train,
  200 val, the rest test (as VTAB-1K);
- a smaller pool: 70 / 10 / 20 % (``val = round(0.1 n)``, ``test = round(0.2 n)``, train the
  rest), e.g. 30 -> 21/3/6, 120 -> 84/12/24, 300 -> 210/30/60, 999 -> 699/100/200;
- with an explicit test set, train/val come from the pool (800/200 from >= 1,000 images,
  otherwise 7:1, i.e. ``val = round(n / 8)``) and test is the whole test set;
- ``train_size`` / ``val_size`` / ``test_size`` override these: a count (a whole number >= 1;
  ``val_size`` may be 0) or a fraction in (0, 1) of the pool (``test_size``: of the explicit
  test set when there is one). Sizes that do not fit are an error giving the pool size.

Every split is stratified: each class gives one image to train first, then one to test, then
one to val, and the rest of each split is filled in proportion to what each class has left
(largest remainders, ties to the lower label). So every class is in train; a class with >= 3
images is also in val and test; a class with 2 images is in train and test only and one with 1
image in train only (both said in ``notes``). For that, with the default sizes the pool's
test split is raised to the number of classes with >= 2 images and val/test give images back
so that train holds one image per class (the rule then says "moved"); one image in every
class and no explicit test set is an error (nothing is left to test on). If a split is smaller
than the number of classes the largest classes get its places (noted); a train split below the
number of classes is an error. The test images are drawn with the fixed :data:`TEST_SEED`
(the same for every run seed for the same sizes); train and val with the run's ``seed``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from guft_jax.errors import InputError, MissingInputError

# The test draw uses this fixed seed, never the run's seed (same value as offline.TEST_SEED).
TEST_SEED = 20240611
VTAB_MIN_POOL = 1250  # >= 800 + 200 + a 20 % test set: the VTAB-1K 800/200/rest split applies
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")  # fmt: skip
TEST_MARKER = ",test:"
# npz and folders say the same when they scale 16-bit pixels (uint16 arrays, 16-bit PNG/TIFF).
SIXTEEN_BIT_NOTE = "16-bit pixels scaled to 8 bits (x 255/65535)"
# Float labels above this are not exact integers in float64.
MAX_FLOAT_LABEL = 2**53
SPLIT_FOLDERS = ("train", "test")


class Pool(NamedTuple):
    """Images and labels read from one file or folder, before splitting.

    Attributes:
      images: uint8 ``(N, H, W, C)`` (C in {1, 3, 4}) or a list of ``(H, W, C)`` of varying size.
      labels: the labels as read (ints or strings, not yet remapped).
      class_names: names per integer label when the data names them (folder names, an npz
        ``class_names`` array), else ``None``.
      notes: what was converted or ignored, one sentence each.
      info: counts for the run report (``skipped_files``, ``ignored_files``, ...).
    """

    images: Any
    labels: np.ndarray
    class_names: tuple[str, ...] | None
    notes: tuple[str, ...]
    info: dict


class UserData(NamedTuple):
    """A user dataset split VTAB-1K style (see the module docstring for the rules).

    Attributes:
      splits: ``{"train800" | "val200" | "test": (images, int64 labels in [0, K))}``.
      num_classes: K (or the ``num_classes`` asked for).
      class_names: one name per class.
      notes: conversions, ignored files, classes missing from a split.
      info: ``split_rule``, ``split_sizes``, ``num_images``, ``label_map``, file counts.
    """

    splits: dict
    num_classes: int
    class_names: tuple[str, ...]
    notes: tuple[str, ...]
    info: dict


# ----------------------------------------------------------------------------- names


def parse_name(name: str) -> tuple[str, str, str | None]:
    """``"npz:A,test:B"`` -> ``("npz", "A", "B")``; ``"folder:D"`` -> ``("folder", "D", None)``.

    Raises:
      InputError: not an ``npz:`` / ``folder:`` name, or an empty path.
    """
    for kind in ("npz", "folder"):
        if name.startswith(kind + ":"):
            rest = name[len(kind) + 1 :]
            test = None
            if TEST_MARKER in rest:
                rest, test = rest.rsplit(TEST_MARKER, 1)
                if not test:
                    raise InputError(f"dataset {name!r}: empty path after ',test:'")
            if not rest:
                raise InputError(f"dataset {name!r}: empty path after '{kind}:'")
            return kind, os.path.expanduser(rest), test and os.path.expanduser(test)
    raise InputError(f"dataset {name!r}: user data must be 'npz:PATH' or 'folder:PATH'")


# ----------------------------------------------------------------------------- npz


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
    labels = _check_label_array(y, len(images), path, notes, key=want[1])
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


def _check_label_array(y: np.ndarray, n: int, path: str, notes: list, key: str) -> np.ndarray:
    where = f"{path}: {key}"
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot? use labels.argmax(1))" if y.ndim == 2 else ""
        raise InputError(f"{where} has shape {y.shape}; expected one label per image (N,){hint}")
    if len(y) != n:
        raise InputError(f"{where} has {len(y)} entries but there are {n} images")
    if np.issubdtype(y.dtype, np.str_):
        if any(not s.strip() for s in y.tolist()):
            raise InputError(f"{where} holds empty strings")
        return y
    if np.issubdtype(y.dtype, np.bool_) or not np.issubdtype(y.dtype, np.number):
        raise InputError(f"{where} have dtype {y.dtype}; allowed: integers or strings")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(
                f"{where} must be integers; entry {i} is {y[i].item()!r} (dtype {y.dtype})"
            )
        if np.abs(y).max() > MAX_FLOAT_LABEL:
            i = int(np.argmax(np.abs(y) > MAX_FLOAT_LABEL))
            raise InputError(
                f"{where} must be integers up to 2**53; entry {i} is {y[i].item()!r} "
                f"(dtype {y.dtype})"
            )
        notes.append(f"{key}: integral float labels converted to integers")
    elif y.dtype == np.uint64 and int(y.max()) > np.iinfo(np.int64).max:
        i = int(np.argmax(y > np.iinfo(np.int64).max))
        raise InputError(f"{where} must be integers up to 2**63 - 1; entry {i} is {int(y[i])}")
    y = y.astype(np.int64)
    if y.min() < 0:
        i = int(np.argmax(y < 0))
        raise InputError(f"{where} must be >= 0; entry {i} is {int(y[i])}")
    return y


# ----------------------------------------------------------------------------- folders


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _read_image(path: str, scaled: list | None = None) -> np.ndarray:
    """One image file -> uint8 ``(H, W, 1)`` or ``(H, W, 3|4)``; raises on unreadable files.

    ``scaled`` receives ``path`` when 16-bit pixels were scaled to 8 bits.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode.startswith("I"):  # 16/32-bit integer pixels: scale 16-bit data to 8 bits
            a = np.asarray(im, np.float64)
            if mode != "I" or a.max() > 255:
                a = a * (255.0 / 65535.0)
                if scaled is not None:
                    scaled.append(path)
            a = np.round(a).clip(0, 255).astype(np.uint8)
        elif mode == "F":
            a = np.asarray(im, np.float64)
            if not np.isfinite(a).all():
                raise ValueError("float image holds NaN/Inf values")
            a = np.round(a * (255.0 if a.max() <= 1.0 else 1.0)).clip(0, 255).astype(np.uint8)
        elif mode in ("1", "L", "LA") or (mode in ("P", "PA") and _is_grey(im)):
            a = np.asarray(im.convert("L"), np.uint8)
        elif mode in ("RGBA", "RGBa", "PA") or "transparency" in im.info:
            a = np.asarray(im.convert("RGBA"), np.uint8)
        else:
            a = np.asarray(im.convert("RGB"), np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image {a.shape}")
    return a


def _is_grey(im) -> bool:
    pal = im.getpalette()
    if pal is None:
        return True
    rgb = np.asarray(pal, np.int64).reshape(-1, 3)
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def _list_dirs(root: str) -> tuple[list[str], list[str]]:
    """Sorted visible sub-folders and visible files of ``root``."""
    try:
        entries = sorted(os.listdir(root))
    except PermissionError as e:
        raise InputError(f"{root}: cannot be listed (permission denied)") from e
    dirs = [e for e in entries if not _is_hidden(e) and os.path.isdir(os.path.join(root, e))]
    files = [e for e in entries if not _is_hidden(e) and not os.path.isdir(os.path.join(root, e))]
    return dirs, files


def _folder_layout(root: str) -> tuple[str, str | None]:
    """``(train_root, test_root or None)`` of an image folder (flat or train/test layout)."""
    if not os.path.exists(root):
        raise MissingInputError(f"{root}: image folder not found")
    if not os.path.isdir(root):
        raise InputError(f"{root}: is a file, not a folder (use npz:{root} for .npz archives)")
    dirs, _ = _list_dirs(root)
    if "train" in dirs and set(dirs) <= {"train", "test", "val", "valid", "validation"}:
        extra = sorted(set(dirs) - set(SPLIT_FOLDERS))
        if extra:
            raise InputError(
                f"{os.path.join(root, extra[0])}: a validation folder is not supported; move "
                "its images into train/ (val200 is drawn from train/)"
            )
        test = os.path.join(root, "test") if "test" in dirs else None
        return os.path.join(root, "train"), test
    return root, None


def read_folder(root: str, *, classes: Sequence[str] | None = None, skip_bad: bool = False) -> Pool:
    """Reads ``root/<class>/<image>`` (one layout level; see :func:`read_image_folder`).

    Args:
      root: the folder holding one sub-folder per class.
      classes: the class list to label with (a test folder uses the training folder's); its
        sub-folders must be among them.
      skip_bad: skip unreadable images (counted) instead of raising.

    Returns:
      A :class:`Pool` whose integer labels index ``class_names``.

    Raises:
      InputError: no class folders, an empty class folder, an unreadable image (unless
        ``skip_bad``), class folders unknown to ``classes``.
    """
    dirs, loose = _list_dirs(root)
    if not dirs:
        imgs = [f for f in loose if f.lower().endswith(IMAGE_EXTENSIONS)]
        what = f"{len(imgs)} images but no class sub-folders" if imgs else "no class sub-folders"
        raise InputError(f"{root}: {what}; expected {root}/<class>/<image>")
    names = list(classes) if classes is not None else dirs
    unknown = sorted(set(dirs) - set(names))
    if unknown:
        raise InputError(
            f"{os.path.join(root, unknown[0])}: class {unknown[0]!r} is not among the training "
            f"classes {names}"
        )
    images, labels, ignored, skipped, scaled = [], [], [], [], []
    for k, c in enumerate(names):
        d = os.path.join(root, c)
        if not os.path.isdir(d):
            continue
        sub, files = _list_dirs(d)
        ignored += [os.path.join(c, s) + "/" for s in sub]
        found = bad = 0
        for fn in files:
            p = os.path.join(d, fn)
            if not fn.lower().endswith(IMAGE_EXTENSIONS):
                ignored.append(os.path.join(c, fn))
                continue
            try:
                im = _read_image(p, scaled)
            except Exception as e:  # PIL raises many types for a bad file; all mean "unreadable"
                reason = f"{type(e).__name__}: {e}"
                if not skip_bad:
                    raise InputError(
                        f"{p}: unreadable image ({reason}); fix or remove it, or set "
                        "skip_bad=True to skip unreadable images"
                    ) from e
                skipped.append(f"{os.path.join(c, fn)} ({reason})")
                bad += 1
                continue
            images.append(im)
            labels.append(k)
            found += 1
        if not found:
            why = f" ({bad} unreadable, skipped)" if bad else ""
            raise InputError(
                f"{d}: class folder holds no images{why}; allowed extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}; remove the folder or add images"
            )
    notes = []
    ignored += [f for f in loose]
    if ignored:
        notes.append(
            f"{root}: ignored {len(ignored)} non-image entries (e.g. {', '.join(ignored[:3])})"
        )
    if skipped:
        notes.append(
            f"{root}: skipped {len(skipped)} unreadable images (e.g. {'; '.join(skipped[:2])})"
        )
    if scaled:
        notes.append(f"{root}: {len(scaled)} images: {SIXTEEN_BIT_NOTE}")
    images = _unify_images(images, root, notes)
    info = {"ignored_files": len(ignored), "skipped_files": len(skipped)}
    return Pool(images, np.asarray(labels, np.int64), tuple(names), tuple(notes), info)


def _unify_images(images: list, root: str, notes: list):
    channels = sorted({im.shape[-1] for im in images})
    if 4 in channels:
        images = [im[..., :3] if im.shape[-1] == 4 else im for im in images]
        notes.append(f"{root}: alpha channels dropped")
    channels = sorted({im.shape[-1] for im in images})
    if channels == [1, 3]:
        images = [np.repeat(im, 3, -1) if im.shape[-1] == 1 else im for im in images]
        notes.append(f"{root}: mixed grey and colour images; grey ones repeated to RGB")
    shapes = sorted({im.shape[:2] for im in images})
    if len(shapes) == 1:
        return np.stack(images)
    eg = ", ".join(f"{h}x{w}" for h, w in shapes[:3])
    notes.append(
        f"{root}: images come in {len(shapes)} sizes (e.g. {eg}); each is resized to image_size"
    )
    return images


def read_image_folder(path: str, *, skip_bad: bool = False) -> tuple[Pool, Pool | None]:
    """Reads a ``folder:`` dataset in either layout; returns ``(pool, test_pool or None)``."""
    train_root, test_root = _folder_layout(path)
    pool = read_folder(train_root, skip_bad=skip_bad)
    if test_root is not None or train_root != path:
        pool = pool._replace(
            notes=(
                f"{path}: sub-folders {', '.join(_list_dirs(path)[0])} read as the train/test "
                "split layout (train/<class>/<image>), not as classes",
                *pool.notes,
            )
        )
    test = None
    if test_root is not None:
        test = read_folder(test_root, classes=pool.class_names, skip_bad=skip_bad)
    return pool, test


# ----------------------------------------------------------------------------- labels


def _encode_labels(pool: Pool, test: Pool | None, num_classes: int | None, where: str):
    """Integer labels in ``[0, K)``, class names, notes and the label map (or None)."""
    notes = []
    y = pool.labels
    if np.issubdtype(y.dtype, np.str_):
        names = sorted(set(y.tolist()))
        index = {s: i for i, s in enumerate(names)}
        enc = np.asarray([index[s] for s in y.tolist()], np.int64)
        tenc = None
        if test is not None:
            if not np.issubdtype(test.labels.dtype, np.str_):
                raise InputError(f"{where}: test labels are numbers but the training labels text")
            unknown = sorted(set(test.labels.tolist()) - set(names))
            if unknown:
                raise InputError(
                    f"{where}: test labels {unknown[:5]} do not occur in the training data"
                )
            tenc = np.asarray([index[s] for s in test.labels.tolist()], np.int64)
        notes.append(f"labels are strings: {len(names)} classes in sorted order")
        return enc, tenc, tuple(names), None, notes
    ty = None if test is None else test.labels
    if ty is not None and np.issubdtype(ty.dtype, np.str_):
        raise InputError(f"{where}: test labels are text but the training labels numbers")
    present = np.unique(y)
    if num_classes is not None:
        hi = int(max(y.max(), -1 if ty is None or not len(ty) else ty.max()))
        if hi >= num_classes:
            raise InputError(
                f"{where}: label {hi} is out of range for num_classes={num_classes} "
                f"(allowed: 0..{num_classes - 1})"
            )
        names = _names_for(pool.class_names, num_classes, where)
        return y, ty, names, None, notes
    if ty is not None:
        unknown = sorted(set(np.unique(ty).tolist()) - set(present.tolist()))
        if unknown:
            raise InputError(
                f"{where}: test labels {unknown[:5]} do not occur in the training data"
            )
    k = len(present)
    if pool.class_names is not None and int(present[-1]) >= len(pool.class_names):
        raise InputError(
            f"{where}: label {int(present[-1])} is out of range for the "
            f"{len(pool.class_names)} class_names"
        )
    if np.array_equal(present, np.arange(k)):
        return y, ty, _names_for(pool.class_names, k, where), None, notes
    lut = {int(v): i for i, v in enumerate(present)}

    def remap(labels):  # the rank among the present labels: no table as large as a label
        return np.searchsorted(present, labels).astype(np.int64)

    old = pool.class_names
    names = tuple(old[int(v)] if old is not None else str(int(v)) for v in present)
    shown = ", ".join(str(int(v)) for v in present[:8]) + (", …" if k > 8 else "")
    notes.append(f"labels {{{shown}}} remapped to 0..{k - 1} in sorted order")
    return remap(y), None if ty is None else remap(ty), names, lut, notes


def _names_for(names: tuple | None, k: int, where: str) -> tuple[str, ...]:
    if names is None:
        return tuple(str(i) for i in range(k))
    if len(names) < k:
        raise InputError(f"{where}: {len(names)} class_names for {k} classes")
    return tuple(names[:k])


# ----------------------------------------------------------------------------- sizes


def resolve_size(field: str, value, n: int, *, allow_zero: bool = False) -> int | None:
    """A size given as a count or a fraction of ``n`` -> a count (``None`` stays ``None``).

    >>> resolve_size("train_size", 0.7, 300), resolve_size("val_size", 30.0, 300)
    (210, 30)

    Raises:
      InputError: naming ``field`` and the allowed values.
    """
    if value is None:
        return None
    allowed = "a count (a whole number >= 1) or a fraction in (0, 1)"
    if allow_zero:
        allowed = "0, " + allowed
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InputError(f"{field}={value!r} is not allowed; allowed: {allowed}")
    v = float(value)
    if v == 0 and allow_zero:
        return 0
    if 0 < v < 1:
        count = int(round(v * n))
        if count < 1:
            raise InputError(f"{field}={value} of {n} images is 0 images; give a larger fraction")
        return count
    if v >= 1 and v == int(v):
        return int(v)
    raise InputError(f"{field}={value!r} is not allowed; allowed: {allowed}")


def split_sizes(
    n: int,
    *,
    train_size=None,
    val_size=None,
    test_size=None,
    n_test_pool: int | None = None,
) -> tuple[dict[str, int], str]:
    """The split sizes for a pool of ``n`` images (rules in the module docstring).

    Args:
      n: images in the pool that train/val (and test, without a test pool) are drawn from.
      train_size, val_size, test_size: counts, fractions or ``None`` (the rule's default).
      n_test_pool: size of an explicit test set, if there is one.

    Returns:
      ``({"train800": ..., "val200": ..., "test": ...}, rule)`` where ``rule`` says in words
      which rule gave the sizes.

    Raises:
      InputError: sizes that are not allowed or do not fit, naming them and ``n``.

    >>> split_sizes(300)
    ({'train800': 210, 'val200': 30, 'test': 60}, 'stratified 70/10/20 (300 images < 1250)')
    """
    given = {k: v is not None for k, v in (("train", train_size), ("val", val_size),
                                            ("test", test_size))}  # fmt: skip
    tr = resolve_size("train_size", train_size, n)
    va = resolve_size("val_size", val_size, n, allow_zero=True)
    if n_test_pool is not None:
        te = resolve_size("test_size", test_size, n_test_pool)
        big = n >= 1000
        va = va if va is not None else (200 if big else int(round(n / 8)))
        tr = tr if tr is not None else (800 if big else n - va)
        te = n_test_pool if te is None else te
        if te > n_test_pool:
            raise InputError(f"test_size={te} exceeds the {n_test_pool} images of the test set")
        rule = (
            "VTAB-1K 800/200 + the test set" if big else "stratified 7:1 train/val + the test set"
        )
        if tr + va > n:
            raise InputError(
                f"train_size + val_size = {tr} + {va} = {tr + va} exceeds the {n} training images"
            )
    else:
        te = resolve_size("test_size", test_size, n)
        big = n >= VTAB_MIN_POOL
        if big:
            va = 200 if va is None else va
            tr = 800 if tr is None else tr
            te = n - tr - va if te is None else te
            rule = "VTAB-1K: 800 train, 200 val, the rest test"
        else:
            va = int(round(0.1 * n)) if va is None else va
            te = int(round(0.2 * n)) if te is None else te
            tr = n - va - te if tr is None else tr
            rule = f"stratified 70/10/20 ({n} images < {VTAB_MIN_POOL})"
        if tr + va + te > n or te < 1 or tr < 1:
            raise InputError(
                f"train_size + val_size + test_size = {tr} + {va} + {te} = {tr + va + te} "
                f"does not fit the {n} images (each of train and test needs >= 1)"
            )
    if any(given.values()):
        rule += " with " + ", ".join(f"{k}_size given" for k, g in given.items() if g)
    if tr < 1:
        raise InputError(f"train_size={tr}: the training split needs >= 1 image")
    return {"train800": tr, "val200": va, "test": te}, rule


# ----------------------------------------------------------------------------- splitting


def _largest_remainder(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Integers summing to ``total``, proportional to ``weights``, each <= ``caps``."""
    out = np.zeros(len(weights), np.int64)
    if total <= 0 or weights.sum() <= 0:
        return out
    ideal = total * weights / weights.sum()
    out = np.minimum(np.floor(ideal).astype(np.int64), caps)
    frac = ideal - np.floor(ideal)
    for i in np.lexsort((np.arange(len(weights)), -frac)):  # largest remainder, lower label
        if out.sum() >= total:
            break
        if out[i] < caps[i]:
            out[i] += 1
    while out.sum() < total:  # only if the caps bound some class: fill where room is left
        room = np.flatnonzero(out < caps)
        out[room[np.argmax(caps[room] - out[room])]] += 1
    return out


def allocate(counts: Sequence[int], sizes: dict[str, int], splits: Sequence[str]):
    """Per-class counts for each split (the stratification rule of the module docstring).

    Args:
      counts: images per class.
      sizes: total per split.
      splits: the splits drawn from this pool, in the order that gets a class's first images
        (train, then test, then val).

    Returns:
      ``(alloc, notes)``: ``{split: int array (num_classes,)}`` and sentences about classes
      left out of a split.

    Raises:
      InputError: if ``train800`` is smaller than the number of classes.
    """
    counts = np.asarray(counts, np.int64)
    k = len(counts)
    if sizes["train800"] < k:
        raise InputError(
            f"the training split would get {sizes['train800']} images for {k} classes and every "
            "class needs one: raise train_size or lower val_size / test_size"
        )
    alloc = {s: np.zeros(k, np.int64) for s in splits}
    notes = []
    left = counts.copy()
    for rank, s in enumerate(splits):
        eligible = np.flatnonzero(left >= 1) if rank == 0 else np.flatnonzero(counts >= rank + 1)
        if not sizes[s]:
            continue
        if len(eligible) > sizes[s]:
            order = eligible[np.lexsort((eligible, -counts[eligible]))]
            notes.append(
                f"{s} has {sizes[s]} images for {len(eligible)} classes that qualify: the "
                f"{len(eligible) - sizes[s]} smallest classes are not in it"
            )
            eligible = np.sort(order[: sizes[s]])
        alloc[s][eligible] += 1
        left[eligible] -= 1
    for s in ("test", "val200", "train800"):  # the rest, in proportion to what is left
        if s not in alloc:
            continue
        extra = _largest_remainder(int(sizes[s] - alloc[s].sum()), left.astype(np.float64), left)
        alloc[s] += extra
        left -= extra
    return alloc, notes


def stratified_split(
    labels: np.ndarray, sizes: dict[str, int], *, seed: int, splits=("train800", "test", "val200")
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Stratified index split of one pool (rules in the module docstring).

    Args:
      labels: int labels in ``[0, K)`` of the pool.
      sizes: images per split (``train800``, ``val200`` and, when drawn here, ``test``).
      seed: draws train/val; test uses :data:`TEST_SEED`.
      splits: the splits drawn from this pool, in the order that gets a class's first images.

    Returns:
      ``({split: indices}, notes)``; test indices are sorted, train/val shuffled by ``seed``.
    """
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=k)
    alloc, notes = allocate(counts, sizes, splits)
    fixed = np.random.default_rng(TEST_SEED)
    rng = np.random.default_rng(seed)
    out = {s: [] for s in splits}
    for c in range(k):
        members = np.flatnonzero(labels == c)
        members = members[fixed.permutation(len(members))]
        pos = 0
        if "test" in alloc:
            out["test"].append(members[: alloc["test"][c]])
            pos = alloc["test"][c]
        rest = members[pos:]
        rest = rest[rng.permutation(len(rest))]
        out["val200"].append(rest[: alloc["val200"][c]])
        out["train800"].append(rest[alloc["val200"][c] : alloc["val200"][c] + alloc["train800"][c]])
    idx = {s: np.concatenate(v).astype(np.int64) for s, v in out.items()}
    idx["train800"] = idx["train800"][rng.permutation(len(idx["train800"]))]
    idx["val200"] = idx["val200"][rng.permutation(len(idx["val200"]))]
    if "test" in idx:
        idx["test"] = np.sort(idx["test"])
    for c in range(k):
        if counts[c] < 3:
            gone = [s for s in splits if not np.any(labels[idx[s]] == c)]
            if gone:
                notes.append(f"class {c} has {counts[c]} image(s): not in {', '.join(gone)}")
    return idx, notes


def _take(x, idx):
    if isinstance(x, np.ndarray):
        return x[idx]
    return [x[i] for i in idx]


# ----------------------------------------------------------------------------- public


def load_user_data(
    name: str,
    *,
    seed: int = 0,
    train_size=None,
    val_size=None,
    test_size=None,
    num_classes: int | None = None,
    skip_bad: bool = False,
) -> UserData:
    """Reads and splits an ``npz:`` or ``folder:`` dataset (rules in the module docstring).

    Args:
      name: ``"npz:PATH"`` or ``"folder:PATH"``, optionally followed by ``",test:PATH"``.
      seed: draws train/val (the test set does not depend on it).
      train_size: count or fraction; ``None`` = the rule's default.
      val_size: count (0 allowed) or fraction; ``None`` = the rule's default.
      test_size: count or fraction (of the test set when there is one); ``None`` = default.
      num_classes: fixes the number of classes (labels then used as they are, never remapped).
      skip_bad: skip unreadable images in folders (counted in ``info``) instead of raising.

    Returns:
      A :class:`UserData`.

    Raises:
      InputError: one line naming the file or field and the problem.

    >>> d = load_user_data("folder:/data/pets")  # doctest: +SKIP
    >>> d.info["split_sizes"], d.class_names  # doctest: +SKIP
    ({'train800': 84, 'val200': 12, 'test': 24}, ('cat', 'dog', 'emu'))
    """
    kind, path, test_path = parse_name(name)
    if kind == "npz":
        pool, test = read_npz(path)
        if test_path is not None:
            if test is not None:
                raise InputError(f"{path}: has test_images and a ',test:' file was given too")
            test = read_npz(test_path)[0]
    else:
        pool, test = read_image_folder(path, skip_bad=skip_bad)
        if test_path is not None:
            if test is not None:
                raise InputError(f"{path}: has a test/ folder and a ',test:' folder was given too")
            troot, _ = _folder_layout(test_path)
            test = read_folder(troot, classes=pool.class_names, skip_bad=skip_bad)
    y, ty, names, label_map, notes = _encode_labels(pool, test, num_classes, path)
    k = len(names) if num_classes is None else int(num_classes)
    present = np.unique(y)
    if len(present) < 2:
        what = names[int(present[0])] if len(present) else "none"
        raise InputError(
            f"{path}: only one class ({what}) in the training data; classification needs >= 2"
        )
    sizes, rule = split_sizes(
        len(y),
        train_size=train_size,
        val_size=val_size,
        test_size=test_size,
        n_test_pool=None if test is None else len(ty),
    )
    if train_size is None and val_size is None and test_size is None:
        sizes, rule = _fit_small_classes(
            sizes, rule, np.bincount(y), path, has_test=test is not None
        )
    if test is None:
        idx, split_notes = stratified_split(y, sizes, seed=seed)
        splits = {s: (_take(pool.images, i), y[i]) for s, i in idx.items()}
    else:
        idx, split_notes = stratified_split(y, sizes, seed=seed, splits=("train800", "val200"))
        splits = {s: (_take(pool.images, i), y[i]) for s, i in idx.items()}
        if sizes["test"] < len(ty):
            tidx = _test_subsample(ty, sizes["test"])
            splits["test"] = (_take(test.images, tidx), ty[tidx])
        else:
            splits["test"] = (test.images, ty)
    sizes = {s: len(v[1]) for s, v in splits.items()}
    named = [names[c] for c in range(len(names))]
    missing = [named[c] for c in range(len(names)) if c < k and not np.any(y == c)]
    all_notes = list(pool.notes) + ([] if test is None else list(test.notes)) + notes + split_notes
    if missing and num_classes is not None:
        all_notes.append(f"classes without images: {', '.join(missing[:5])}")
    info = {
        "split_rule": rule,
        "split_sizes": sizes,
        "num_images": int(len(y) + (0 if test is None else len(ty))),
        "label_map": None if label_map is None else {str(a): b for a, b in label_map.items()},
        "skipped_files": pool.info.get("skipped_files", 0)
        + (0 if test is None else test.info.get("skipped_files", 0)),
        "ignored_files": pool.info.get("ignored_files", 0)
        + (0 if test is None else test.info.get("ignored_files", 0)),
    }
    return UserData(splits, k, tuple(names), tuple(all_notes), info)


def _fit_small_classes(sizes: dict, rule: str, counts: np.ndarray, path: str, *, has_test: bool):
    """The default sizes moved so that the stratification rule holds for small classes.

    Every class keeps a training image, and with the pool's own test split the test split has
    room for one image of each class with >= 2 images (so a 2-image class is in train and
    test, as the module docstring says). Images move between the default sizes only; given
    sizes are never changed.

    Raises:
      InputError: every class has a single image and there is no explicit test set (no image
        is left to test on).
    """
    counts = counts[counts > 0]
    k, n = len(counts), int(counts.sum())
    k2, k3 = int((counts >= 2).sum()), int((counts >= 3).sum())  # classes that reach test, val
    tr, va, te = sizes["train800"], sizes["val200"], sizes["test"]
    if not has_test:
        if k2 == 0:
            raise InputError(
                f"{path}: {n} images in {k} classes, one per class: each class's image goes to "
                "train and none is left to test on; add images (>= 2 in some classes) or give "
                "an explicit test set"
            )
        te = max(te, k2)
    if has_test:  # the test split is the explicit test set: train and val share the pool
        va = max(0, min(va, n - k))
        tr = max(min(tr, n - va), k)
    else:
        while n - te - va < k and va > k3:  # back to one training image per class
            va -= 1
        while n - te - va < k and te > k2:
            te -= 1
        tr = n - va - te
    new = {"train800": tr, "val200": va, "test": te}
    if new != sizes:
        rule += " (moved: every class in train, and in test from 2 images)"
    return new, rule


def _test_subsample(labels: np.ndarray, size: int) -> np.ndarray:
    """A stratified, seed-independent subsample of an explicit test set (sorted indices)."""
    k = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=k)
    take = _largest_remainder(size, counts.astype(np.float64), counts)
    fixed = np.random.default_rng(TEST_SEED)
    out = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        out.append(members[fixed.permutation(len(members))[: take[c]]])
    return np.sort(np.concatenate(out))
