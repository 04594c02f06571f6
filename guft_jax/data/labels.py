"""Labels of users' data: checked, then encoded as ``0..K-1`` with class names.

Integer labels that are exactly ``0..K-1`` are used as they are; otherwise (e.g. ``{3, 7, 9}`` or
``{0, 2**40}``: by rank, no table as large as a label) they are remapped to ``0..K-1`` in sorted
order and the mapping is recorded (``label_map``; ``class_names`` are the original labels unless
the file names them). String labels are the class names, in sorted order. With ``num_classes``
given nothing is remapped and every label must be in ``[0, num_classes)``. Negative labels and
test labels that never occur in training are errors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from guft_jax.data.pool import Pool
from guft_jax.errors import InputError

# Float labels above this are not exact integers in float64.
MAX_FLOAT_LABEL = 2**53


def check_label_array(y: np.ndarray, n: int, path: str, notes: list, key: str) -> np.ndarray:
    """A label array as read -> strings (class names) or int64 labels >= 0.

    Args:
      y: the array (``(N,)``, or ``(N, 1)``).
      n: the number of images it labels.
      path: the file, named in errors.
      notes: receives a sentence for each conversion.
      key: the array's name in the file.

    Raises:
      InputError: wrong shape or length, empty strings, non-integral or negative numbers.
    """
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


class Encoded(NamedTuple):
    """Labels of a pool (and its test pool) encoded as ``0..K-1``.

    Attributes:
      labels: int64 labels of the pool.
      test_labels: int64 labels of the explicit test pool, or ``None``.
      class_names: one name per class.
      label_map: ``{original label: new label}`` when labels were remapped, else ``None``.
      notes: what was converted, one sentence each.
    """

    labels: np.ndarray
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]
    label_map: dict | None
    notes: list


def encode_labels(pool: Pool, test: Pool | None, num_classes: int | None, where: str) -> Encoded:
    """Integer labels in ``[0, K)`` (rules in the module docstring).

    Args:
      pool: the training pool as read.
      test: an explicit test pool, or ``None``.
      num_classes: fixes K (labels then used as they are), or ``None``.
      where: the dataset, named in errors.

    Returns:
      An :class:`Encoded`.

    Raises:
      InputError: labels out of range, text and number labels mixed, unknown test labels.
    """
    y = pool.labels
    if np.issubdtype(y.dtype, np.str_):
        return _encode_strings(y, None if test is None else test.labels, where)
    ty = None if test is None else test.labels
    if ty is not None and np.issubdtype(ty.dtype, np.str_):
        raise InputError(f"{where}: test labels are text but the training labels numbers")
    if num_classes is not None:
        hi = int(max(y.max(), -1 if ty is None or not len(ty) else ty.max()))
        if hi >= num_classes:
            raise InputError(
                f"{where}: label {hi} is out of range for num_classes={num_classes} "
                f"(allowed: 0..{num_classes - 1})"
            )
        return Encoded(y, ty, _names_for(pool.class_names, num_classes, where), None, [])
    present = np.unique(y)
    if ty is not None:
        _check_known(np.unique(ty).tolist(), present.tolist(), where)
    k = len(present)
    if pool.class_names is not None and int(present[-1]) >= len(pool.class_names):
        raise InputError(
            f"{where}: label {int(present[-1])} is out of range for the "
            f"{len(pool.class_names)} class_names"
        )
    if np.array_equal(present, np.arange(k)):
        return Encoded(y, ty, _names_for(pool.class_names, k, where), None, [])
    lut = {int(v): i for i, v in enumerate(present)}

    def remap(labels):  # the rank among the present labels: no table as large as a label
        return np.searchsorted(present, labels).astype(np.int64)

    old = pool.class_names
    names = tuple(old[int(v)] if old is not None else str(int(v)) for v in present)
    shown = ", ".join(str(int(v)) for v in present[:8]) + (", …" if k > 8 else "")
    notes = [f"labels {{{shown}}} remapped to 0..{k - 1} in sorted order"]
    return Encoded(remap(y), None if ty is None else remap(ty), names, lut, notes)


def _check_known(test_labels: list, train_labels: list, where: str) -> None:
    unknown = sorted(set(test_labels) - set(train_labels))
    if unknown:
        raise InputError(f"{where}: test labels {unknown[:5]} do not occur in the training data")


def _encode_strings(y: np.ndarray, ty: np.ndarray | None, where: str) -> Encoded:
    """String labels: the sorted set of names is the class list."""
    names = sorted(set(y.tolist()))
    index = {s: i for i, s in enumerate(names)}
    enc = np.asarray([index[s] for s in y.tolist()], np.int64)
    tenc = None
    if ty is not None:
        if not np.issubdtype(ty.dtype, np.str_):
            raise InputError(f"{where}: test labels are numbers but the training labels text")
        _check_known(ty.tolist(), names, where)
        tenc = np.asarray([index[s] for s in ty.tolist()], np.int64)
    notes = [f"labels are strings: {len(names)} classes in sorted order"]
    return Encoded(enc, tenc, tuple(names), None, notes)


def _names_for(names: tuple | None, k: int, where: str) -> tuple[str, ...]:
    if names is None:
        return tuple(str(i) for i in range(k))
    if len(names) < k:
        raise InputError(f"{where}: {len(names)} class_names for {k} classes")
    return tuple(names[:k])
