"""Loading users' own labelled images (``npz:``, ``folder:``) of any size: read, labelled, split.

One call, :func:`load_user_data`, goes through four concerns, each its own module: reading
(:mod:`guft_jax.data.npz`, :mod:`guft_jax.data.folder`), labels (:mod:`guft_jax.data.labels`)
and splitting (:mod:`guft_jax.data.splits`, the rules for any size). Every problem with a file
raises :class:`~guft_jax.errors.InputError` with one line that names the file and what is wrong;
what is converted rather than refused is listed in the data's ``notes``.

An explicit test set can be part of the data (``test_images`` / ``test_labels`` in the npz, a
``test/`` folder beside ``train/``) or a second file or folder: ``npz:A.npz,test:B.npz`` or
``folder:DIR,test:TESTDIR`` (the text after the last ``,test:``). One class only is an error.

The splits are ``train``, ``val`` and ``test`` (``trainval`` = train + val); VTAB-1K's names
(``train800`` ...) are refused for users' data, whose sizes follow its own rule.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from guft_jax.data import splits as splits_lib
from guft_jax.data.folder import folder_layout, read_folder, read_image_folder
from guft_jax.data.labels import Encoded, encode_labels
from guft_jax.data.npz import read_npz
from guft_jax.data.pool import Pool
from guft_jax.errors import InputError

TEST_MARKER = ",test:"


class UserData(NamedTuple):
    """A user dataset split by the rules of :mod:`guft_jax.data.splits`.

    Attributes:
      splits: ``{"train" | "val" | "test": (images, int64 labels in [0, K))}``.
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


def parse_name(name: str) -> tuple[str, str, str | None]:
    """``"npz:A,test:B"`` -> ``("npz", "A", "B")``; ``"folder:D"`` -> ``("folder", "D", None)``.

    Raises:
      InputError: not an ``npz:`` / ``folder:`` name, or an empty path.

    >>> parse_name("npz:a.npz,test:b.npz")
    ('npz', 'a.npz', 'b.npz')
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


def read_pools(name: str, *, skip_bad: bool = False) -> tuple[str, Pool, Pool | None]:
    """``(path, pool, explicit test pool or None)`` of an ``npz:`` / ``folder:`` dataset.

    Raises:
      InputError: a bad file or folder, or two test sets (one inside the data, one after
        ``,test:``).
    """
    kind, path, test_path = parse_name(name)
    if kind == "npz":
        pool, test = read_npz(path)
        if test_path is not None:
            if test is not None:
                raise InputError(f"{path}: has test_images and a ',test:' file was given too")
            test = read_npz(test_path)[0]
        return path, pool, test
    pool, test = read_image_folder(path, skip_bad=skip_bad)
    if test_path is not None:
        if test is not None:
            raise InputError(f"{path}: has a test/ folder and a ',test:' folder was given too")
        troot, _ = folder_layout(test_path)
        test = read_folder(troot, classes=pool.class_names, skip_bad=skip_bad)
    return path, pool, test


def draw_splits(
    pool: Pool, test: Pool | None, enc: Encoded, *, seed: int, sizes: dict[str, int]
) -> tuple[dict, list[str]]:
    """``({"train", "val", "test"} -> (images, labels), notes)``: the stratified draw.

    Train and val (and test, without an explicit test set) come from the pool; an explicit test
    set is used whole or subsampled, stratified, to ``sizes["test"]``.
    """
    y, ty = enc.labels, enc.test_labels
    if test is None:
        idx, notes = splits_lib.stratified_split(y, sizes, seed=seed)
        return {s: (splits_lib.take(pool.images, i), y[i]) for s, i in idx.items()}, notes
    idx, notes = splits_lib.stratified_split(y, sizes, seed=seed, splits=("train", "val"))
    out = {s: (splits_lib.take(pool.images, i), y[i]) for s, i in idx.items()}
    if sizes["test"] < len(ty):
        tidx = splits_lib.subsample_test(ty, sizes["test"])
        out["test"] = (splits_lib.take(test.images, tidx), ty[tidx])
    else:
        out["test"] = (test.images, ty)
    return out, notes


def _info(pool: Pool, test: Pool | None, enc: Encoded, rule: str, splits: dict) -> dict:
    """What the run report states about how the data was read and split."""
    pools = [pool] if test is None else [pool, test]
    label_map = enc.label_map
    return {
        "split_rule": rule,
        "split_sizes": {s: len(v[1]) for s, v in splits.items()},
        "num_images": int(sum(len(p.labels) for p in pools)),
        "label_map": None if label_map is None else {str(a): b for a, b in label_map.items()},
        "skipped_files": sum(p.info.get("skipped_files", 0) for p in pools),
        "ignored_files": sum(p.info.get("ignored_files", 0) for p in pools),
    }


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
    """Reads and splits an ``npz:`` or ``folder:`` dataset (rules in :mod:`guft_jax.data.splits`).

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
    ({'train': 84, 'val': 12, 'test': 24}, ('cat', 'dog', 'emu'))
    """
    path, pool, test = read_pools(name, skip_bad=skip_bad)
    enc = encode_labels(pool, test, num_classes, path)
    y, names = enc.labels, enc.class_names
    k = len(names) if num_classes is None else int(num_classes)
    present = np.unique(y)
    if len(present) < 2:
        what = names[int(present[0])] if len(present) else "none"
        raise InputError(
            f"{path}: only one class ({what}) in the training data; classification needs >= 2"
        )
    n_test = None if test is None else len(enc.test_labels)
    given = dict(train_size=train_size, val_size=val_size, test_size=test_size)
    sizes, rule = splits_lib.split_sizes(len(y), n_test_pool=n_test, **given)
    if all(v is None for v in given.values()):
        sizes, rule = splits_lib.fit_small_classes(
            sizes, rule, np.bincount(y), path, has_test=test is not None
        )
    splits, split_notes = draw_splits(pool, test, enc, seed=seed, sizes=sizes)
    notes = [*pool.notes, *(() if test is None else test.notes), *enc.notes, *split_notes]
    missing = [names[c] for c in range(len(names)) if c < k and not np.any(y == c)]
    if missing and num_classes is not None:
        notes.append(f"classes without images: {', '.join(missing[:5])}")
    return UserData(splits, k, tuple(names), tuple(notes), _info(pool, test, enc, rule, splits))
