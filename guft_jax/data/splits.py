"""Split names and split rules: the one split system of every data source.

Names. Every source has ``train``, ``val``, ``trainval`` (train + val) and ``test``
(:data:`SPLIT_NAMES`); VTAB-1K tasks and the packaged datasets (``fashion_mnist``,
``animal_mnist``, ``digits``) also take VTAB-1K's ``train800``, ``val200``, ``train800val200``
(:data:`VTAB_ALIASES`, kept in their records). Users' data (``npz:`` / ``folder:``) refuses them,
naming the allowed ones: a 30-image folder splits 21 / 3 / 6, its ``train800`` would be 21
images. :data:`SPLITS` lists every name some source accepts.

Two rules draw the splits, both deterministic for a ``seed``; test is drawn with the fixed
:data:`TEST_SEED` (the same test images for every run seed). The VTAB-1K rule
(:func:`split_indices`, :func:`split_pools`; arXiv:1910.04867), for the packaged datasets, draws
``train`` / ``val`` uniformly from the training pool, not stratified, so that these datasets keep
the exact images every earlier result used; test is an official test split or a fixed held-out
draw. The stratified rule (:func:`split_sizes`, :func:`stratified_split`) serves users' data of
any size:

- a pool of at least :data:`VTAB_MIN_POOL` (1,250) images and no explicit test set: 800 train,
  200 val, the rest test (as VTAB-1K);
- a smaller pool: 70 / 10 / 20 % (``val = round(0.1 n)``, ``test = round(0.2 n)``, train the
  rest), e.g. 30 -> 21/3/6, 120 -> 84/12/24, 300 -> 210/30/60, 999 -> 699/100/200;
- with an explicit test set, train/val come from the pool (800/200 from >= 1,000 images,
  otherwise 7:1, i.e. ``val = round(n / 8)``) and test is the whole test set;
- ``train_size`` / ``val_size`` / ``test_size`` override these: a count (a whole number >= 1;
  ``val_size`` may be 0) or a fraction in (0, 1) of the pool (``test_size``: of the explicit
  test set when there is one). Sizes that do not fit are an error giving the pool size.

Stratification (small datasets included): each class gives one image to train first, then one to
test, then one to val, and the rest of each split is filled in proportion to what each class has
left (largest remainders, ties to the lower label). So every class is in train; a class with >= 3
images is also in val and test; a class with 2 images is in train and test only and one with 1
image in train only (both said in the notes). For that, with the default sizes the pool's test
split is raised to the number of classes with >= 2 images and val/test give images back so that
train holds one image per class (:func:`fit_small_classes`; the rule then says "moved"); one
image in every class and no explicit test set is an error. If a split is smaller than the number
of classes the largest classes get its places (noted); a train split below the number of classes
is an error.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence

import numpy as np

from guft_jax.errors import InputError

SPLIT_NAMES = ("train", "val", "trainval", "test")
VTAB_ALIASES = types.MappingProxyType(
    {"train800": "train", "val200": "val", "train800val200": "trainval"}
)
SPLITS = SPLIT_NAMES + tuple(VTAB_ALIASES)
_VTAB_NAME = {v: k for k, v in VTAB_ALIASES.items()}
# The held-out test draw uses this fixed seed, never the run's seed.
TEST_SEED = 20240611
VTAB_MIN_POOL = 1250  # >= 800 + 200 + a 20 % test set: the VTAB-1K 800/200/rest split applies


# ----------------------------------------------------------------------------- names


def canonical_split(split: str, *, vtab_names: bool = True) -> str:
    """The canonical name (one of :data:`SPLIT_NAMES`) of a split name.

    ``vtab_names``: whether the source accepts the VTAB-1K names (users' data does not).

    Raises:
      InputError: naming ``split`` and the allowed names.

    >>> canonical_split("train800val200"), canonical_split("val")
    ('trainval', 'val')
    """
    if split in SPLIT_NAMES:
        return split
    if vtab_names and split in VTAB_ALIASES:
        return VTAB_ALIASES[split]
    if split in VTAB_ALIASES:
        raise InputError(
            f"split={split!r} is a VTAB-1K name, for VTAB tasks and the packaged datasets only; "
            "users' data (npz:/folder:) is split by its size (see guft_jax.data.splits); "
            f"allowed: {', '.join(SPLIT_NAMES)}"
        )
    allowed = SPLITS if vtab_names else SPLIT_NAMES
    raise InputError(f"split={split!r} is not supported; allowed: {', '.join(allowed)}")


def split_parts(split: str, *, vtab_names: bool = True) -> tuple[str, ...]:
    """The stored splits (``train``, ``val``, ``test``) a split name reads, in order."""
    name = canonical_split(split, vtab_names=vtab_names)
    return ("train", "val") if name == "trainval" else (name,)


def record_name(split: str, *, vtab_names: bool = True) -> str:
    """The name a source's records give a split: VTAB-1K's where the source has them.

    >>> record_name("trainval"), record_name("trainval", vtab_names=False)
    ('train800val200', 'trainval')
    """
    name = canonical_split(split, vtab_names=vtab_names)
    return _VTAB_NAME.get(name, name) if vtab_names else name


def report_names(vtab_names: bool) -> tuple[str, str, str]:
    """The record names of a source's three stored splits (``train800`` or ``train``, ...)."""
    return tuple(record_name(s, vtab_names=vtab_names) for s in ("train", "val", "test"))


def stored_splits(splits: Mapping, *, vtab_names: bool = True) -> dict:
    """``{name: (images, labels)}`` keyed by ``train`` / ``val`` / ``test`` (aliases renamed).

    Raises:
      InputError: an unknown or combined name, or a split given twice.
    """
    out = {}
    for name, value in splits.items():
        parts = split_parts(name, vtab_names=vtab_names)
        if len(parts) != 1:
            raise InputError(f"splits: {name!r} is the combination of two splits; give each one")
        if parts[0] in out:
            raise InputError(f"splits: {parts[0]!r} is given twice (as {name!r} too)")
        out[parts[0]] = value
    return out


def take(x, idx):
    """``x[idx]`` for an array, ``[x[i] for i in idx]`` for a list of differently sized images."""
    if isinstance(x, np.ndarray):
        return x[idx]
    return [x[i] for i in idx]


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


def _sizes_with_test_set(n, tr, va, test_size, n_test_pool):
    te = resolve_size("test_size", test_size, n_test_pool)
    big = n >= 1000
    va = va if va is not None else (200 if big else int(round(n / 8)))
    tr = tr if tr is not None else (800 if big else n - va)
    te = n_test_pool if te is None else te
    if te > n_test_pool:
        raise InputError(f"test_size={te} exceeds the {n_test_pool} images of the test set")
    if tr + va > n:
        raise InputError(
            f"train_size + val_size = {tr} + {va} = {tr + va} exceeds the {n} training images"
        )
    rule = "VTAB-1K 800/200 + the test set" if big else "stratified 7:1 train/val + the test set"
    return tr, va, te, rule


def _sizes_of_pool(n, tr, va, test_size):
    te = resolve_size("test_size", test_size, n)
    if n >= VTAB_MIN_POOL:
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
    return tr, va, te, rule


def split_sizes(
    n: int,
    *,
    train_size=None,
    val_size=None,
    test_size=None,
    n_test_pool: int | None = None,
) -> tuple[dict[str, int], str]:
    """The split sizes of users' data for a pool of ``n`` images (rules in the module docstring).

    Args:
      n: images in the pool that train/val (and test, without a test pool) are drawn from.
      train_size: count, fraction or ``None`` (the rule's default); so are the next two.
      val_size: count (0 allowed), fraction or ``None``.
      test_size: count, fraction (of the test set when there is one) or ``None``.
      n_test_pool: size of an explicit test set, if there is one.

    Returns:
      ``({"train": ..., "val": ..., "test": ...}, rule)`` where ``rule`` says in words which rule
      gave the sizes.

    Raises:
      InputError: sizes that are not allowed or do not fit, naming them and ``n``.

    >>> split_sizes(300)
    ({'train': 210, 'val': 30, 'test': 60}, 'stratified 70/10/20 (300 images < 1250)')
    """
    given = {"train": train_size, "val": val_size, "test": test_size}
    tr = resolve_size("train_size", train_size, n)
    va = resolve_size("val_size", val_size, n, allow_zero=True)
    if n_test_pool is not None:
        tr, va, te, rule = _sizes_with_test_set(n, tr, va, test_size, n_test_pool)
    else:
        tr, va, te, rule = _sizes_of_pool(n, tr, va, test_size)
    if any(v is not None for v in given.values()):
        rule += " with " + ", ".join(f"{k}_size given" for k, v in given.items() if v is not None)
    if tr < 1:
        raise InputError(f"train_size={tr}: the training split needs >= 1 image")
    return {"train": tr, "val": va, "test": te}, rule


def fit_small_classes(sizes: dict, rule: str, counts: np.ndarray, where: str, *, has_test: bool):
    """``(sizes, rule)``: default sizes moved so that the stratification rule holds.

    Every class keeps a training image, and with the pool's own test split the test split has
    room for one image of each class with >= 2 images (so a 2-image class is in train and
    test). ``sizes`` / ``rule`` come from :func:`split_sizes` with no size given; ``counts`` are
    images per label of the pool; ``has_test``: test is an explicit test set.

    Raises:
      InputError: every class has a single image and there is no explicit test set (no image
        is left to test on).
    """
    counts = counts[counts > 0]
    k, n = len(counts), int(counts.sum())
    k2, k3 = int((counts >= 2).sum()), int((counts >= 3).sum())  # classes that reach test, val
    tr, va, te = sizes["train"], sizes["val"], sizes["test"]
    if has_test:  # the test split is the explicit test set: train and val share the pool
        va = max(0, min(va, n - k))
        tr = max(min(tr, n - va), k)
    else:
        if k2 == 0:
            raise InputError(
                f"{where}: {n} images in {k} classes, one per class: each class's image goes to "
                "train and none is left to test on; add images (>= 2 in some classes) or give "
                "an explicit test set"
            )
        te = max(te, k2)
        while n - te - va < k and va > k3:  # back to one training image per class
            va -= 1
        while n - te - va < k and te > k2:
            te -= 1
        tr = n - va - te
    new = {"train": tr, "val": va, "test": te}
    if new != sizes:
        rule += " (moved: every class in train, and in test from 2 images)"
    return new, rule


# ----------------------------------------------------------------------------- VTAB-1K rule


def split_indices(
    n: int,
    *,
    train_size: int = 800,
    val_size: int = 200,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """VTAB-1K-style uniform index split of one pool of ``n`` examples.

    The test set is drawn first with the fixed :data:`TEST_SEED` (so it is the same for every
    ``seed``); ``train`` / ``val`` are then drawn from the rest with ``seed``. With
    ``test_size=None`` the test set is everything outside a fixed pool of
    ``train_size + val_size`` examples.

    Returns:
      ``{"train", "val", "test"}`` -> index arrays (test sorted, train/val in drawn order).

    Raises:
      InputError: if the sizes are negative or do not fit in ``n``.

    >>> {k: len(v) for k, v in split_indices(10, train_size=5, val_size=2).items()}
    {'train': 5, 'val': 2, 'test': 3}
    """
    if test_size is None:
        test_size = n - train_size - val_size
    for field, v in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if v < 0 or (field != "val_size" and v == 0):
            raise InputError(f"{field} must be positive, got {v}")
    if train_size + val_size + test_size > n:
        raise InputError(
            f"train_size + val_size + test_size = {train_size + val_size + test_size} exceeds the "
            f"{n} examples available"
        )
    fixed = np.random.default_rng(TEST_SEED).permutation(n)
    test, rest = np.sort(fixed[:test_size]), fixed[test_size:]
    rest = np.random.default_rng(seed).permutation(rest)
    train, val = rest[:train_size], rest[train_size : train_size + val_size]
    return {"train": train, "val": val, "test": test}


def split_pools(
    train_pool: tuple[np.ndarray, np.ndarray],
    test_pool: tuple[np.ndarray, np.ndarray] | None,
    *,
    train_size: int = 800,
    val_size: int = 200,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Splits data by the VTAB-1K rule into ``{"train", "val", "test"} -> (images, labels)``.

    Without ``test_pool`` this is :func:`split_indices` over ``train_pool``; with a separate
    ``test_pool`` (an official test split) train/val are drawn from ``train_pool`` with ``seed``
    and test is the test pool, subsampled to ``test_size`` with the fixed :data:`TEST_SEED`.

    Raises:
      InputError: sizes that do not fit the pools.
    """
    x, y = train_pool
    y = np.asarray(y)
    if test_pool is None:
        idx = split_indices(
            len(y), train_size=train_size, val_size=val_size, test_size=test_size, seed=seed
        )
        return {k: (take(x, v), y[v]) for k, v in idx.items()}
    if train_size + val_size > len(y):
        raise InputError(
            f"train_size + val_size = {train_size + val_size} exceeds the {len(y)} training "
            "examples available"
        )
    if train_size < 1 or val_size < 0:
        raise InputError(
            f"train_size must be positive and val_size >= 0, got {train_size}, {val_size}"
        )
    order = np.random.default_rng(seed).permutation(len(y))
    tx, ty = test_pool
    if test_size is not None:
        if not 0 < test_size <= len(ty):
            raise InputError(f"test_size must be in [1, {len(ty)}], got {test_size}")
        t = np.sort(np.random.default_rng(TEST_SEED).permutation(len(ty))[:test_size])
        tx, ty = take(tx, t), np.asarray(ty)[t]
    tr, va = order[:train_size], order[train_size : train_size + val_size]
    test = (tx, np.asarray(ty))
    return {"train": (take(x, tr), y[tr]), "val": (take(x, va), y[va]), "test": test}


# ----------------------------------------------------------------------------- stratified rule


def capped_shares(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
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
      InputError: if ``train`` is smaller than the number of classes.
    """
    counts = np.asarray(counts, np.int64)
    k = len(counts)
    if sizes["train"] < k:
        raise InputError(
            f"the training split would get {sizes['train']} images for {k} classes and every "
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
    for s in ("test", "val", "train"):  # the rest, in proportion to what is left
        if s in alloc:
            extra = capped_shares(int(sizes[s] - alloc[s].sum()), left.astype(np.float64), left)
            alloc[s] += extra
            left -= extra
    return alloc, notes


def stratified_split(
    labels: np.ndarray, sizes: dict[str, int], *, seed: int, splits=("train", "test", "val")
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Stratified index split of one pool (rules in the module docstring).

    Args:
      labels: int labels in ``[0, K)`` of the pool.
      sizes: images per split (``train``, ``val`` and, when drawn here, ``test``).
      seed: draws train/val; test uses :data:`TEST_SEED`.
      splits: the splits drawn from this pool, in the order that gets a class's first images.

    Returns:
      ``({split: indices}, notes)``; test indices are sorted, train/val shuffled by ``seed``.

    >>> idx, _ = stratified_split(np.array([0, 0, 0, 1, 1, 1]), {"train": 2, "val": 2, "test": 2},
    ...                           seed=0)
    >>> sorted(np.array([0, 0, 0, 1, 1, 1])[idx["test"]].tolist())
    [0, 1]
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
        out["val"].append(rest[: alloc["val"][c]])
        out["train"].append(rest[alloc["val"][c] : alloc["val"][c] + alloc["train"][c]])
    idx = {s: np.concatenate(v).astype(np.int64) for s, v in out.items()}
    idx["train"] = idx["train"][rng.permutation(len(idx["train"]))]
    idx["val"] = idx["val"][rng.permutation(len(idx["val"]))]
    if "test" in idx:
        idx["test"] = np.sort(idx["test"])
    for c in range(k):
        if counts[c] < 3:
            gone = [s for s in splits if not np.any(labels[idx[s]] == c)]
            if gone:
                notes.append(f"class {c} has {counts[c]} image(s): not in {', '.join(gone)}")
    return idx, notes


def subsample_test(labels: np.ndarray, size: int) -> np.ndarray:
    """A stratified, seed-independent subsample of an explicit test set (sorted indices)."""
    k = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=k)
    count = capped_shares(size, counts.astype(np.float64), counts)
    fixed = np.random.default_rng(TEST_SEED)
    out = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        out.append(members[fixed.permutation(len(members))[: count[c]]])
    return np.sort(np.concatenate(out))
