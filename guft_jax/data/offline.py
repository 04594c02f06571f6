"""Real image datasets that ship inside registry packages, and users' own data, one entry point.

The packaged datasets are split by the VTAB-1K rule of :mod:`guft_jax.data.splits`: ``train``
(800) + ``val`` (200), 1,000 images drawn from the training pool with ``seed``, and a held-out
``test`` set of a stated size that does not depend on ``seed``, so that every run of a sweep is
scored on the same images. They also take the VTAB-1K names ``train800``, ``val200`` and
``train800val200``.

==============  ============================================  ======  ================  =======
name            package (install command)                     pool    test (default)    classes
==============  ============================================  ======  ================  =======
fashion_mnist   ``apt-get install dataset-fashion-mnist``     60,000  official 10,000   10
animal_mnist    ``pip install --no-deps animal-mnist==0.4``   9,716*  2,000 held out    10
digits          scikit-learn (``load_digits``, 8x8)           1,797   797 held out      10
==============  ============================================  ======  ================  =======

\\* Animal-MNIST has 10,000 images of which 284 are exact copies of an earlier one (no duplicate
group carries two labels); they are removed, keeping the first occurrence, *before* splitting so
that no test image is also a training image.

``npz:PATH`` and ``folder:PATH`` (users' own data, any size) are read and checked by
:mod:`guft_jax.data.user` and split by the stratified rule of :mod:`guft_jax.data.splits`: the
VTAB-1K 800/200/rest sizes from 1,250 images up, 70/10/20 below, ``train_size`` / ``val_size`` /
``test_size`` as counts or fractions, an explicit test set, and one-line
:class:`~guft_jax.errors.InputError` messages for bad files.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct

import numpy as np

from guft_jax.data import user
from guft_jax.data.pipeline import RESIZE_METHODS, ArraySource, check_choice
from guft_jax.data.splits import resolve_size, split_pools
from guft_jax.errors import InputError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
OFFLINE = ("fashion_mnist", "animal_mnist", "digits")


# ----------------------------------------------------------------------------- readers


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


def read_fashion_mnist(data_dir: str | None = None):
    """Fashion-MNIST's official splits: ``((train images, labels), (test images, labels))``.

    Args:
      data_dir: a folder with the four IDX files (default: where the apt package puts them).

    Raises:
      FileNotFoundError: a file is missing; the message says how to install the data.
    """
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


# ----------------------------------------------------------------------------- public API

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")  # fmt: skip


def _packaged(name: str, *, seed, test_size, train_size, val_size, data_dir):
    """Splits, split rule and class names of a packaged dataset."""
    if name == "fashion_mnist":
        train, test = read_fashion_mnist(data_dir)
        pool_n, names, default_test = len(train[1]), FASHION_MNIST_CLASSES, None
    elif name == "animal_mnist":
        x, y, _ = animal_mnist_deduped()
        train, test = (x, y), None
        pool_n, names, default_test = len(y), tuple(str(i) for i in range(10)), 2000
    else:
        train, test = _digits(), None
        pool_n, names, default_test = len(train[1]), tuple(str(i) for i in range(10)), None
    tr = resolve_size("train_size", train_size, pool_n)
    va = resolve_size("val_size", val_size, pool_n, allow_zero=True)
    te = resolve_size("test_size", test_size, pool_n if test is None else len(test[1]))
    splits = split_pools(
        train,
        test,
        train_size=800 if tr is None else tr,
        val_size=200 if va is None else va,
        test_size=default_test if te is None else te,
        seed=seed,
    )
    return splits, "VTAB-1K: 800 train, 200 val, held-out test", names


def load_offline(
    name: str,
    *,
    seed: int = 0,
    test_size: int | float | None = None,
    train_size: int | float | None = None,
    val_size: int | float | None = None,
    data_dir: str | None = None,
    skip_bad: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads a real offline dataset, split by the rules of :mod:`guft_jax.data.splits`.

    Args:
      name: "fashion_mnist", "animal_mnist", "digits", "npz:/path/file.npz" or
        "folder:/path/dir" (optionally followed by ",test:PATH", see :mod:`guft_jax.data.user`).
      seed: draws train/val from the training pool.
      test_size: size of the held-out test set, a count or a fraction (defaults: Fashion-MNIST
        its official 10,000, Animal-MNIST 2,000, digits 797, user data by the rule of
        :mod:`guft_jax.data.splits`).
      train_size: images in ``train`` (default 800, or the user-data rule), count or fraction.
      val_size: images in ``val`` (default 200, or the user-data rule), count or fraction.
      data_dir: Fashion-MNIST only: a folder with the four IDX files.
      skip_bad: user folders only: skip unreadable images instead of raising.

    Returns:
      ``{"train", "val", "test"} -> (uint8 images (N, H, W, C), int64 labels (N,))``
      (a folder of differently sized images gives a list of images instead of an array).

    Raises:
      InputError: unknown name, sizes that do not fit, or a bad user file (one line naming it).
      FileNotFoundError / ModuleNotFoundError: the data is missing; the message says which
        command installs it.

    >>> splits = load_offline("digits", seed=0)  # doctest: +SKIP
    >>> {k: len(v[1]) for k, v in splits.items()}  # doctest: +SKIP
    {'train': 800, 'val': 200, 'test': 797}
    """
    kw = dict(seed=seed, test_size=test_size, train_size=train_size, val_size=val_size)
    if name in OFFLINE:
        return _packaged(name, data_dir=data_dir, **kw)[0]
    if name.startswith(("npz:", "folder:")):
        return user.load_user_data(name, skip_bad=skip_bad, **kw).splits
    check_choice("dataset", name, (*OFFLINE, "npz:<path>", "folder:<path>"))
    raise AssertionError("unreachable")


def offline_source(
    name: str,
    *,
    seed: int = 0,
    test_size: int | float | None = None,
    train_size: int | float | None = None,
    val_size: int | float | None = None,
    data_dir: str | None = None,
    num_classes: int | None = None,
    resize_method: str = "bilinear",
    skip_bad: bool = False,
) -> ArraySource:
    """:func:`load_offline` wrapped as a :class:`~guft_jax.data.DataSource`.

    ``num_classes`` defaults to 10 for the packaged datasets and to the number of classes found
    for user data (see :mod:`guft_jax.data.labels` for how labels are remapped). The packaged
    datasets accept the VTAB-1K split names too, user data only ``train``, ``val``,
    ``trainval`` and ``test``. The source's
    ``class_names``, ``split_sizes``, ``notes`` and ``info`` (``split_rule``, file counts,
    ``label_map``) are for the run report.
    """
    check_choice("resize_method", resize_method, RESIZE_METHODS)
    kw = dict(seed=seed, test_size=test_size, train_size=train_size, val_size=val_size)
    if name in OFFLINE:
        splits, rule, names = _packaged(name, data_dir=data_dir, **kw)
        if num_classes is not None and num_classes < 10:
            raise InputError(f"num_classes={num_classes} but {name} has 10 classes")
        return ArraySource(
            name=name,
            num_classes=int(num_classes or 10),
            splits=splits,
            resize_method=resize_method,
            class_names=names,
            info={"split_rule": rule},
            vtab_names=True,
        )
    if name.startswith(("npz:", "folder:")):
        d = user.load_user_data(name, num_classes=num_classes, skip_bad=skip_bad, **kw)
        return ArraySource(
            name=name,
            num_classes=d.num_classes,
            splits=d.splits,
            resize_method=resize_method,
            class_names=d.class_names,
            notes=d.notes,
            info=d.info,
            vtab_names=False,
        )
    check_choice("dataset", name, (*OFFLINE, "npz:<path>", "folder:<path>"))
    raise AssertionError("unreachable")
