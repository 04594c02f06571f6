"""Real image datasets that ship inside registry packages, and users' own data, VTAB-1K style.

Every dataset here is split the VTAB-1K way (SPEC.md §6): ``train800`` + ``val200`` (1,000 images
drawn from the training pool with ``seed``) and a held-out ``test`` set of a stated size that does
not depend on ``seed``, so that every run of a sweep is scored on the same images.

==============  ========================================  ======  ==============  ===========
name            package (install command)                 pool    test (default)  classes
==============  ========================================  ======  ==============  ===========
fashion_mnist   ``apt-get install dataset-fashion-mnist``  60,000  official 10,000  10
animal_mnist    ``pip install --no-deps animal-mnist==0.4`` 9,716*  2,000 held out   10
digits          scikit-learn (``load_digits``, 8x8)       1,797   797 held out     10
==============  ========================================  ======  ==============  ===========

\\* Animal-MNIST has 10,000 images of which 284 are exact copies of an earlier one (no duplicate
group carries two labels); they are removed, keeping the first occurrence, *before* splitting so
that no test image is also a training image.

``npz:/path/file.npz`` (arrays ``images`` (N, H, W[, C]) uint8 and ``labels`` (N,) int) and
``folder:/path/dir`` (``dir/<class>/<image>``, or ``dir/{train,test}/<class>/<image>`` as in
``tfds.folder_dataset.ImageFolder``; classes are the sorted sub-folder names) take the same split
options.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct

import numpy as np

from guft_jax.data.pipeline import RESIZE_METHODS, ArraySource, check_choice

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# The test subsample and the held-out test draw use this fixed seed, never the run's seed.
TEST_SEED = 20240611
OFFLINE = ("fashion_mnist", "animal_mnist", "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- splitting


def dedupe(images: np.ndarray, labels: np.ndarray):
    """Removes exact duplicate images, keeping the first occurrence of each.

    Args:
      images: ``(N, ...)`` array.
      labels: ``(N,)`` labels.

    Returns:
      ``(images, labels, keep, conflicts)``: the unique images and their labels in original order,
      the kept indices, and the number of duplicate groups whose copies carry different labels.
    """
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    keep = np.sort(first)
    label_of_group = np.asarray(labels)[first]
    conflicts = np.unique(inverse[np.asarray(labels) != label_of_group[inverse]]).size
    return images[keep], np.asarray(labels)[keep], keep, int(conflicts)


def split_indices(
    n: int,
    *,
    train_size: int = 800,
    val_size: int = 200,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """VTAB-1K-style index split of one pool of ``n`` examples.

    The test set is drawn first with the fixed :data:`TEST_SEED` (so it is the same for every
    ``seed``); ``train800``/``val200`` are then drawn from the rest with ``seed``. With
    ``test_size=None`` the test set is everything outside a fixed pool of
    ``train_size + val_size`` examples.

    Returns:
      ``{"train800", "val200", "test"}`` -> sorted-for-test / drawn-order-for-train index arrays.

    Raises:
      ValueError: if the sizes are negative or do not fit in ``n``.
    """
    if test_size is None:
        test_size = n - train_size - val_size
    for field, v in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if v < 0 or (field != "val_size" and v == 0):
            raise ValueError(f"{field} must be positive, got {v}")
    if train_size + val_size + test_size > n:
        raise ValueError(
            f"train_size + val_size + test_size = {train_size + val_size + test_size} exceeds the "
            f"{n} examples available"
        )
    fixed = np.random.default_rng(TEST_SEED).permutation(n)
    test, rest = np.sort(fixed[:test_size]), fixed[test_size:]
    rest = np.random.default_rng(seed).permutation(rest)
    return {
        "train800": rest[:train_size],
        "val200": rest[train_size : train_size + val_size],
        "test": test,
    }


def split_pools(
    train_pool: tuple[np.ndarray, np.ndarray],
    test_pool: tuple[np.ndarray, np.ndarray] | None,
    *,
    train_size: int = 800,
    val_size: int = 200,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Splits data VTAB-1K style; with a separate ``test_pool`` (an official test split) the
    train/val draw comes from ``train_pool`` and the test set is the test pool, subsampled to
    ``test_size`` with the fixed :data:`TEST_SEED` when given."""
    x, y = train_pool
    if test_pool is None:
        idx = split_indices(
            len(y), train_size=train_size, val_size=val_size, test_size=test_size, seed=seed
        )
        return {k: (_take(x, v), np.asarray(y)[v]) for k, v in idx.items()}
    if train_size + val_size > len(y):
        raise ValueError(
            f"train_size + val_size = {train_size + val_size} exceeds the {len(y)} training "
            "examples available"
        )
    if train_size < 1 or val_size < 0:
        raise ValueError(
            f"train_size must be positive and val_size >= 0, got {train_size}, {val_size}"
        )
    order = np.random.default_rng(seed).permutation(len(y))
    tx, ty = test_pool
    if test_size is not None:
        if not 0 < test_size <= len(ty):
            raise ValueError(f"test_size must be in [1, {len(ty)}], got {test_size}")
        t = np.sort(np.random.default_rng(TEST_SEED).permutation(len(ty))[:test_size])
        tx, ty = _take(tx, t), np.asarray(ty)[t]
    return {
        "train800": (_take(x, order[:train_size]), np.asarray(y)[order[:train_size]]),
        "val200": (
            _take(x, order[train_size : train_size + val_size]),
            np.asarray(y)[order[train_size : train_size + val_size]],
        ),
        "test": (tx, np.asarray(ty)),
    }


def _take(x, idx):
    if isinstance(x, np.ndarray):
        return x[idx]
    return [x[i] for i in idx]


# ----------------------------------------------------------------------------- readers


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file (the MNIST format) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(data_dir: str | None = None):
    root = data_dir or FASHION_MNIST_DIR
    names = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    out = {}
    for split, (xi, yi) in names.items():
        paths = [os.path.join(root, xi), os.path.join(root, yi)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST not found ({missing[0]}); install it with "
                "`apt-get install dataset-fashion-mnist` or pass data_dir=<folder with the IDX "
                "files>"
            )
        out[split] = (read_idx(paths[0])[..., None], read_idx(paths[1]).astype(np.int64))
    return out["train"], out["test"]


def _animal_mnist_files() -> tuple[str, str]:
    # find_spec locates the wheel without importing it (its __init__ pulls tensorflow.keras).
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "Animal-MNIST is not installed; install it with "
            "`pip install --no-deps animal-mnist==0.4`"
        )
    root = os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")
    files = (
        os.path.join(root, "animal_data_version_3.gz"),
        os.path.join(root, "animal_label_version_3.gz"),
    )
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(
                f"{f} is missing from the animal-mnist package; reinstall it with "
                "`pip install --no-deps --force-reinstall animal-mnist==0.4`"
            )
    return files


def _animal_mnist():
    xf, yf = _animal_mnist_files()
    # The package stores its arrays as gzip pickles; they are data from a registry wheel.
    with gzip.open(xf, "rb") as f:
        x = np.asarray(pickle.load(f), np.uint8)
    with gzip.open(yf, "rb") as f:
        y = np.asarray(pickle.load(f), np.int64)
    if x.shape != (10000, 28, 28) or y.shape != (10000,):
        raise ValueError(f"unexpected Animal-MNIST arrays {x.shape}, {y.shape}")
    return x[..., None], y


def animal_mnist_deduped():
    """Animal-MNIST with exact duplicates removed: ``(images (9716,28,28,1), labels, info)``."""
    x, y = _animal_mnist()
    ux, uy, keep, conflicts = dedupe(x, y)
    info = {"num_raw": len(y), "num_duplicates": len(y) - len(uy), "label_conflicts": conflicts}
    return ux, uy, info


def _digits():
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ModuleNotFoundError(
            "the digits dataset ships with scikit-learn; install it with `pip install scikit-learn`"
        )
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); scale to uint8.
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return x, d.target.astype(np.int64)


def read_npz(path: str):
    """Loads ``images`` (uint8, (N,H,W) or (N,H,W,C)) and ``labels`` (N,) from an ``.npz`` file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("images", "labels") if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; found {sorted(f.files)}")
        x, y = f["images"], f["labels"]
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 in [0, 255], got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or y.shape != (len(x),):
        raise ValueError(f"{path}: images {x.shape} / labels {y.shape} are not (N,H,W[,C]) / (N,)")
    return x, _check_labels(y, path)


def _check_labels(y, where):
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise ValueError(f"{where}: labels must be non-negative integers")
    return y.astype(np.int64)


def _read_image(path):
    from PIL import Image

    with Image.open(path) as im:
        mode = "L" if im.mode in ("1", "L", "I;16", "I", "F") else "RGB"
        a = np.asarray(im.convert(mode), np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _read_class_dirs(root, classes=None):
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = classes if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the classes {classes}")
    images, labels = [], []
    for k, c in enumerate(classes):
        d = os.path.join(root, c)
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                images.append(_read_image(os.path.join(d, f)))
                labels.append(k)
    if not images:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders")
    shapes = {im.shape for im in images}
    if len(shapes) == 1:
        images = np.stack(images)
    elif len({s[-1] for s in shapes}) > 1:  # mixed grey and colour: make all RGB
        images = [np.repeat(im, 3, -1) if im.shape[-1] == 1 else im for im in images]
    return images, np.asarray(labels, np.int64), classes


def read_folder(path: str):
    """Reads an image-folder dataset; returns ``(train_pool, test_pool or None, classes)``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path}")
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if subdirs and set(subdirs) <= {"train", "test"} and "train" in subdirs:
        tx, ty, classes = _read_class_dirs(os.path.join(path, "train"))
        test = None
        if "test" in subdirs:
            ex, ey, _ = _read_class_dirs(os.path.join(path, "test"), classes)
            test = (ex, ey)
        return (tx, ty), test, classes
    x, y, classes = _read_class_dirs(path)
    return (x, y), None, classes


# ----------------------------------------------------------------------------- public API


def load_offline(
    name: str,
    *,
    seed: int = 0,
    test_size: int | None = None,
    train_size: int = 800,
    val_size: int = 200,
    data_dir: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads a real offline dataset split VTAB-1K style.

    Args:
      name: "fashion_mnist", "animal_mnist", "digits", "npz:/path/file.npz" or
        "folder:/path/dir".
      seed: draws train800/val200 from the training pool.
      test_size: size of the held-out test set (defaults: Fashion-MNIST its official 10,000,
        Animal-MNIST 2,000, digits 797, npz/folder everything not in train/val, or the whole
        ``test`` sub-folder).
      train_size: images in ``train800`` (800 in VTAB-1K).
      val_size: images in ``val200`` (200 in VTAB-1K).
      data_dir: Fashion-MNIST only: a folder with the four IDX files.

    Returns:
      ``{"train800", "val200", "test"} -> (uint8 images (N, H, W, C), int64 labels (N,))``
      (a folder of differently sized images gives a list of images instead of an array).

    Raises:
      ValueError: unknown name or sizes that do not fit.
      FileNotFoundError / ModuleNotFoundError: the data is missing; the message says which
        command installs it.

    >>> splits = load_offline("digits", seed=0)  # doctest: +SKIP
    >>> {k: len(v[1]) for k, v in splits.items()}  # doctest: +SKIP
    {'train800': 800, 'val200': 200, 'test': 797}
    """
    kw = dict(train_size=train_size, val_size=val_size, seed=seed)
    if name == "fashion_mnist":
        train, test = _fashion_mnist(data_dir)
        return split_pools(train, test, test_size=test_size, **kw)
    if name == "animal_mnist":
        x, y, _ = animal_mnist_deduped()
        return split_pools((x, y), None, test_size=2000 if test_size is None else test_size, **kw)
    if name == "digits":
        return split_pools(_digits(), None, test_size=test_size, **kw)
    if name.startswith("npz:"):
        return split_pools(read_npz(name[4:]), None, test_size=test_size, **kw)
    if name.startswith("folder:"):
        train, test, _ = read_folder(name[7:])
        return split_pools(train, test, test_size=test_size, **kw)
    check_choice("dataset", name, (*OFFLINE, "npz:<path>", "folder:<path>"))
    raise AssertionError("unreachable")


def offline_source(
    name: str,
    *,
    seed: int = 0,
    test_size: int | None = None,
    train_size: int = 800,
    val_size: int = 200,
    data_dir: str | None = None,
    num_classes: int | None = None,
    resize_method: str = "bilinear",
) -> ArraySource:
    """:func:`load_offline` wrapped as a :class:`~guft_jax.data.DataSource`.

    ``num_classes`` defaults to 10 for the packaged datasets and to ``max(label) + 1`` over all
    splits (or the number of class folders) for user data.
    """
    check_choice("resize_method", resize_method, RESIZE_METHODS)
    splits = load_offline(
        name,
        seed=seed,
        test_size=test_size,
        train_size=train_size,
        val_size=val_size,
        data_dir=data_dir,
    )
    if name in OFFLINE:
        inferred = 10
    elif name.startswith("folder:"):
        inferred = len(read_folder_classes(name[7:]))
    else:
        inferred = int(max(int(np.max(y)) for _, y in splits.values() if len(y))) + 1
    if num_classes is None:
        num_classes = inferred
    elif num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but the labels need at least {inferred}")
    return ArraySource(
        name=name, num_classes=int(num_classes), splits=splits, resize_method=resize_method
    )


def read_folder_classes(path: str) -> list[str]:
    """The sorted class names of an image folder (either layout)."""
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if subdirs and set(subdirs) <= {"train", "test"} and "train" in subdirs:
        root = os.path.join(path, "train")
        return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return subdirs
