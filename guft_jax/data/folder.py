"""Reader of ``folder:`` datasets: ``PATH/<class>/<image>`` or ``PATH/{train,test}/<class>/...``.

Classes are the sorted sub-folder names (hidden ones ignored). A folder whose sub-folders are
``train`` (and ``test``) is read as the split layout, never as classes named so (noted). Images
of mixed sizes and of mixed grey / RGB / RGBA / palette / 16-bit modes are read as uint8 grey or
RGB (alpha dropped; 16-bit scaled by 255/65535, noted) and resized per batch; files that are not
images (by extension) and loose files are ignored and counted. An unreadable image is an error
naming it, unless ``skip_bad=True``: then it is skipped and counted. An empty class folder is an
error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from guft_jax.data.pool import SIXTEEN_BIT_NOTE, Pool
from guft_jax.errors import InputError, MissingInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")  # fmt: skip
SPLIT_FOLDERS = ("train", "test")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def read_image(path: str, scaled: list | None = None) -> np.ndarray:
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


def folder_layout(root: str) -> tuple[str, str | None]:
    """``(train_root, test_root or None)`` of an image folder (flat or train/test layout).

    Raises:
      InputError: a missing folder, a file, or a validation sub-folder in the split layout.
    """
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
                "its images into train/ (val is drawn from train/)"
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
        if os.path.isdir(os.path.join(root, c)):
            found = _read_class(root, c, skip_bad, ignored, skipped, scaled)
            images += found
            labels += [k] * len(found)
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


def _read_class(root: str, c: str, skip_bad: bool, ignored: list, skipped: list, scaled: list):
    """The images of class folder ``root/c``; ignored, skipped and 16-bit files are appended to
    the lists passed in (relative paths)."""
    d = os.path.join(root, c)
    sub, files = _list_dirs(d)
    ignored += [os.path.join(c, s) + "/" for s in sub]
    images, bad = [], 0
    for fn in files:
        p = os.path.join(d, fn)
        if not fn.lower().endswith(IMAGE_EXTENSIONS):
            ignored.append(os.path.join(c, fn))
            continue
        try:
            images.append(read_image(p, scaled))
        except Exception as e:  # PIL raises many types for a bad file; all mean "unreadable"
            reason = f"{type(e).__name__}: {e}"
            if not skip_bad:
                raise InputError(
                    f"{p}: unreadable image ({reason}); fix or remove it, or set "
                    "skip_bad=True to skip unreadable images"
                ) from e
            skipped.append(f"{os.path.join(c, fn)} ({reason})")
            bad += 1
    if not images:
        why = f" ({bad} unreadable, skipped)" if bad else ""
        raise InputError(
            f"{d}: class folder holds no images{why}; allowed extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}; remove the folder or add images"
        )
    return images


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
    train_root, test_root = folder_layout(path)
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
