"""The 19 VTAB-1K tasks (Zhai et al., arXiv:1910.04867) as tensorflow-datasets pipelines.

The registry follows the VTAB-1K protocol (docs: VTAB-1K) and was checked recipe by recipe against
google-research/task_adaptation (``task_adaptation/data/*.py`` and ``scripts/run_all_tasks.sh``):
builder name and version, the split strings of ``train800`` / ``val200`` / ``train800val200`` /
``test``, the label recipes and the number of classes. Where a split is "the first p% of train",
the boundary is ``p * num_examples // 100`` exactly as task_adaptation computes it (``tfds``'s own
``train[p%:]`` rounds, which gives the same numbers for every VTAB dataset, see ``NUM_EXAMPLES``).

Differences from the protocol's usual wording (none changes the protocol):

- KITTI: the bins are usually given as ``[-100, 8, 20, 999]`` "plus no vehicle"; in
  task_adaptation the image with no Car/Van/Truck gets distance 1000 and so falls in the last
  bin, ``> 999``: the thresholds give 4 classes in total, the fourth *is* "no vehicle"
  (0: <= 8 m, 1: (8, 20], 2: (20, 999], 3: none). A vehicle is KITTI type < 3 (Car, Van, Truck).
- Clevr distance uses ``objects/pixel_coords[:, 2]`` (depth in the image), not ``3d_coords``.
- Clevr count is ``len(objects) - 3`` (scenes hold 3..10 objects); task_adaptation counts
  ``objects/size``, which has one entry per object.
- dSprites bins are ``floor(label / (num_original_classes / 16))``: x-position has 32 original
  values (factor 2), orientation 40 (factor 2.5); images are {0, 1} and are scaled by 255.
- smallNORB uses the first camera ``image`` only (``image2`` is the stereo pair) and tiles it to
  RGB; ``label_azimuth`` (18 classes) and ``label_elevation`` (9).
- Oxford-IIIT Pet: ``oxford_iiit_pet:3.*.*`` as in task_adaptation; tensorflow-datasets 4.9 only
  builds 4.0.0 from code, so data prepared with a current tfds needs ``version="4.*.*"`` (same
  images and labels, same train/test split).
- Retinopathy: the btgraham-300 config; task_adaptation's optional heavy train augmentation is
  not part of VTAB-1K and is not implemented.

Nothing here downloads: the builder is only read (``as_dataset``); if the data is absent the error
says how to prepare it (``tfds build <name> --data_dir DIR``, or a manual download for
Retinopathy, Sun397-on-disk etc.).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from guft_jax.data.pipeline import (
    RESIZE_METHODS,
    check_batch_args,
    check_choice,
    normalization_stats,
)
from guft_jax.data.splits import report_names, split_parts


class Pct(NamedTuple):
    """A split boundary ``percent * num_examples // 100 + offset`` (task_adaptation's rounding)."""

    percent: int
    offset: int = 0


class Slice(NamedTuple):
    """``split[start:stop]`` of a tfds split; bounds are ints, :class:`Pct` or None (open)."""

    split: str
    start: int | Pct | None = None
    stop: int | Pct | None = None


class VtabTask(NamedTuple):
    """One VTAB-1K task.

    Attributes:
      name: our task name ("cifar100", "clevr_count", ...).
      group: "natural", "specialized" or "structured".
      builder: tfds builder with config and version, as task_adaptation loads it.
      num_classes: classes after the label recipe.
      num_examples: sizes of the tfds splits used (the tfds catalog values for that version);
        checked against a prepared dataset's ``info.splits``.
      splits: ``train800`` / ``val200`` / ``test`` as tuples of :class:`Slice`;
        ``train800val200`` is ``train800 + val200``.
      label: a function ``example -> int32 label`` (tf), or the name of a ClassLabel feature.
      image_key: the image feature.
      image_scale: multiplier of the stored pixel values (dSprites stores {0, 1}).
    """

    name: str
    group: str
    builder: str
    num_classes: int
    num_examples: dict[str, int]
    splits: dict[str, tuple[Slice, ...]]
    label: str | Callable[[dict], Any] = "label"
    image_key: str = "image"
    image_scale: int = 1


# ----------------------------------------------------------------------------- label recipes


def _bin_index(value, thresholds):
    """Largest i with ``thresholds[i] < value`` (task_adaptation's ``max(where(thr - v < 0))``)."""
    import tensorflow as tf

    thr = tf.constant(thresholds, tf.float32)
    return tf.reduce_sum(tf.cast(thr < tf.cast(value, tf.float32), tf.int32)) - 1


KITTI_DISTANCE_BINS = (-100.0, 8.0, 20.0, 999.0)
CLEVR_DISTANCE_BINS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def kitti_closest_vehicle_distance(example: dict):
    """KITTI: distance bin of the closest Car/Van/Truck (4 classes; 3 = no vehicle)."""
    import tensorflow as tf

    objects = example["objects"]
    is_vehicle = objects["type"] < 3
    z = tf.boolean_mask(tf.cast(objects["location"][:, 2], tf.float32), is_vehicle)
    dist = tf.reduce_min(tf.concat([z, tf.constant([1000.0])], axis=0))
    return _bin_index(dist, KITTI_DISTANCE_BINS)


def clevr_count_all(example: dict):
    """Clevr: number of objects minus 3 (8 classes for 3..10 objects)."""
    import tensorflow as tf

    return tf.size(example["objects"]["size"], out_type=tf.int32) - 3


def clevr_closest_object_distance(example: dict):
    """Clevr: bin of the smallest ``pixel_coords`` depth (6 classes)."""
    import tensorflow as tf

    dist = tf.reduce_min(example["objects"]["pixel_coords"][:, 2])
    return _bin_index(dist, CLEVR_DISTANCE_BINS)


def binned(feature: str, num_original: int, num_classes: int) -> Callable[[dict], Any]:
    """``floor(example[feature] / (num_original / num_classes))`` (dSprites bins)."""
    factor = float(num_original) / num_classes

    def fn(example):
        import tensorflow as tf

        v = tf.cast(example[feature], tf.float32)
        return tf.cast(tf.math.floordiv(v, factor), tf.int32)

    fn.__name__ = f"binned_{feature}"
    return fn


# ----------------------------------------------------------------------------- registry


def _std(train: str = "train", val: str = "validation", test: str = "test"):
    """train[:800], validation[:200], test (the tasks with an official validation split)."""
    return {
        "train800": (Slice(train, None, 800),),
        "val200": (Slice(val, None, 200),),
        "test": (Slice(test),),
    }


def _after(percent: int, test: tuple[Slice, ...] = (Slice("test"),)):
    """train[:800], the 200 after the first ``percent``% of train, and ``test``."""
    return {
        "train800": (Slice("train", None, 800),),
        "val200": (Slice("train", Pct(percent), Pct(percent, 200)),),
        "test": test,
    }


_TASKS = (
    # natural
    VtabTask("cifar100", "natural", "cifar100:3.*.*", 100,
             {"train": 50000, "test": 10000}, _after(90)),
    VtabTask("caltech101", "natural", "caltech101:3.*.*", 102,
             {"train": 3060, "test": 6084}, _after(90)),
    VtabTask("dtd", "natural", "dtd:3.*.*", 47,
             {"train": 1880, "validation": 1880, "test": 1880}, _std()),
    VtabTask("oxford_flowers102", "natural", "oxford_flowers102:2.*.*", 102,
             {"train": 1020, "validation": 1020, "test": 6149}, _std()),
    VtabTask("oxford_iiit_pet", "natural", "oxford_iiit_pet:3.*.*", 37,
             {"train": 3680, "test": 3669}, _after(80)),
    VtabTask("svhn", "natural", "svhn_cropped:3.*.*", 10,
             {"train": 73257, "test": 26032}, _after(90)),
    VtabTask("sun397", "natural", "sun397/tfds:4.*.*", 397,
             {"train": 76128, "validation": 10875, "test": 21750}, _std()),
    # specialized
    VtabTask("patch_camelyon", "specialized", "patch_camelyon:2.*.*", 2,
             {"train": 262144, "validation": 32768, "test": 32768}, _std()),
    VtabTask("eurosat", "specialized", "eurosat/rgb:2.*.*", 10,
             {"train": 27000}, _after(60, (Slice("train", Pct(80)),))),
    VtabTask("resisc45", "specialized", "resisc45:3.*.*", 45,
             {"train": 31500}, _after(60, (Slice("train", Pct(80)),))),
    VtabTask("diabetic_retinopathy", "specialized",
             "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5,
             {"train": 35126, "validation": 10906, "test": 42670}, _std()),
    # structured
    VtabTask("clevr_count", "structured", "clevr:3.*.*", 8,
             {"train": 70000, "validation": 15000}, _after(90, (Slice("validation"),)),
             label=clevr_count_all),
    VtabTask("clevr_dist", "structured", "clevr:3.*.*", 6,
             {"train": 70000, "validation": 15000}, _after(90, (Slice("validation"),)),
             label=clevr_closest_object_distance),
    VtabTask("dmlab", "structured", "dmlab:2.0.1", 6,
             {"train": 65550, "validation": 22628, "test": 22735}, _std()),
    VtabTask("kitti", "structured", "kitti:3.1.0", 4,
             {"train": 6347, "validation": 423, "test": 711}, _std(),
             label=kitti_closest_vehicle_distance),
    VtabTask("dsprites_loc", "structured", "dsprites:2.*.*", 16,
             {"train": 737280}, _after(80, (Slice("train", Pct(90)),)),
             label=binned("label_x_position", 32, 16), image_scale=255),
    VtabTask("dsprites_ori", "structured", "dsprites:2.*.*", 16,
             {"train": 737280}, _after(80, (Slice("train", Pct(90)),)),
             label=binned("label_orientation", 40, 16), image_scale=255),
    VtabTask("smallnorb_azi", "structured", "smallnorb:2.*.*", 18,
             {"train": 24300, "test": 24300},
             {"train800": (Slice("train", None, 800),), "val200": (Slice("test", None, 200),),
              "test": (Slice("test", Pct(50)),)},
             label="label_azimuth"),
    VtabTask("smallnorb_ele", "structured", "smallnorb:2.*.*", 9,
             {"train": 24300, "test": 24300},
             {"train800": (Slice("train", None, 800),), "val200": (Slice("test", None, 200),),
              "test": (Slice("test", Pct(50)),)},
             label="label_elevation"),
)  # fmt: skip

TASKS: dict[str, VtabTask] = {t.name: t for t in _TASKS}
GROUPS = {g: tuple(t.name for t in _TASKS if t.group == g) for g in
          ("natural", "specialized", "structured")}  # fmt: skip


def get_task(name: str) -> VtabTask:
    """The registry entry of a VTAB-1K task; ``ValueError`` lists the task names otherwise."""
    check_choice("task", name, tuple(TASKS))
    return TASKS[name]


# ----------------------------------------------------------------------------- split strings


def _bound(b, n):
    if b is None or isinstance(b, int):
        return b
    return b.percent * n // 100 + b.offset


# The registry's keys for the stored splits train, val, test (the protocol's names).
_REGISTRY_KEY = dict(zip(("train", "val", "test"), report_names(True), strict=True))


def resolve_split(
    task: VtabTask, split: str, num_examples: dict[str, int] | None = None
) -> tuple[str, int]:
    """The tfds split string and example count of a split name (``train``, ``train800``, ...).

    >>> resolve_split(get_task("caltech101"), "train800val200")
    ('train[:800]+train[2754:2954]', 1000)
    >>> resolve_split(get_task("caltech101"), "trainval")[1]
    1000

    Raises:
      ValueError: an unknown split name (the message lists the allowed ones) or a slice outside
        the tfds split.
    """
    counts = task.num_examples if num_examples is None else num_examples
    parts = sum((task.splits[_REGISTRY_KEY[p]] for p in split_parts(split)), ())
    strings, total = [], 0
    for s in parts:
        n = counts[s.split]
        start, stop = _bound(s.start, n), _bound(s.stop, n)
        lo, hi = start or 0, n if stop is None else stop
        if not 0 <= lo < hi <= n:
            raise ValueError(f"{task.name}: slice {s} is empty or outside {s.split} ({n} examples)")
        total += hi - lo
        if start is None and stop is None:
            strings.append(s.split)
        else:
            strings.append(f"{s.split}[{'' if start is None else start}:"
                           f"{'' if stop is None else stop}]")  # fmt: skip
    return "+".join(strings), total


# ----------------------------------------------------------------------------- pipeline


def _label_fn(task: VtabTask):
    if callable(task.label):
        return task.label
    key = task.label

    def fn(example):
        import tensorflow as tf

        return tf.cast(example[key], tf.int32)

    return fn


def image_and_label(task: VtabTask):
    """The tf function ``example -> (uint8 RGB image (H, W, 3), int32 label)`` of a task."""
    label_fn = _label_fn(task)

    def fn(example):
        import tensorflow as tf

        image = example[task.image_key]
        if task.image_scale != 1:
            image = image * tf.constant(task.image_scale, image.dtype)
        if image.shape[-1] == 1:
            image = tf.tile(image, [1, 1, 3])
        return tf.cast(image, tf.uint8), tf.cast(label_fn(example), tf.int32)

    return fn


def _shuffle_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([int(seed), int(epoch)]).integers(0, 2**31 - 1))


def _prepare_hint(task: VtabTask, data_dir) -> str:
    name = task.builder.split(":")[0]
    where = f" --data_dir {data_dir}" if data_dir else ""
    return (
        f"prepare it first with `tfds build {name}{where}` (manual downloads, e.g. "
        f"diabetic_retinopathy_detection, go to <data_dir>/downloads/manual), then pass "
        f"data_dir=<that folder>"
    )


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A :class:`~guft_jax.data.DataSource` over one prepared VTAB-1K tfds dataset.

    Build it with :func:`vtab_source`. Batches are ``tf.data`` pipelines (decode, label recipe,
    optional seeded shuffle, resize, normalise) converted to numpy.
    """

    name: str
    num_classes: int
    task: VtabTask
    builder: Any
    data_dir: str | None = None
    resize_method: str = "bilinear"
    shuffle_buffer: int = 10_000

    def size(self, split: str) -> int:
        """Number of examples in ``split``."""
        return resolve_split(self.task, split)[1]

    def split_string(self, split: str) -> str:
        """The tfds split string read for ``split``."""
        return resolve_split(self.task, split)[0]

    def raw(self, split: str):
        """``tf.data.Dataset`` of native ``(uint8 image (H, W, 3), int32 label)``, in file order."""
        import tensorflow as tf

        try:
            ds = self.builder.as_dataset(split=self.split_string(split), shuffle_files=False)
        except AssertionError as e:  # tfds' "could not find data" (never downloads here)
            raise FileNotFoundError(
                f"VTAB task {self.task.name!r}: {self.task.builder} is not prepared in "
                f"{self.data_dir or 'the default tfds data_dir'}; "
                f"{_prepare_hint(self.task, self.data_dir)}"
            ) from e
        return ds.map(image_and_label(self.task), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)  # fmt: skip

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
        """Yields ``(images float32 (B, S, S, 3), labels int32 (B,))``; see ``DataSource``.

        Shuffling uses a buffer of ``min(split size, shuffle_buffer)`` (the whole split for the
        1,000-image training splits) seeded by ``(seed, epoch)``.
        """
        import tensorflow as tf

        n = self.size(split)
        check_batch_args(split, batch_size, image_size, start_step, n, drop_remainder)
        mean, std = normalization_stats(normalization)
        ds = self.raw(split)
        if shuffle:
            ds = ds.shuffle(min(n, self.shuffle_buffer), seed=_shuffle_seed(seed, epoch),
                            reshuffle_each_iteration=False)  # fmt: skip
        if start_step:
            ds = ds.skip(int(start_step) * int(batch_size))
        resize = _tf_resize(image_size, self.resize_method)
        mean_t, std_t = tf.constant(mean), tf.constant(std)

        def finish(image, label):
            x = resize(image) / 255.0
            return (x - mean_t) / std_t, label

        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(int(batch_size), drop_remainder=drop_remainder).prefetch(2)
        return ((np.asarray(x, np.float32), np.asarray(y, np.int32))
                for x, y in ds.as_numpy_iterator())  # fmt: skip


def _tf_resize(image_size: int, method: str):
    import tensorflow as tf

    check_choice("resize_method", method, RESIZE_METHODS)
    if method == "bilinear":
        # Same numbers as pipeline.resize_matrix(..., "bilinear") (tested).
        return lambda im: tf.image.resize(
            tf.cast(im, tf.float32), (image_size, image_size), method="bilinear", antialias=False
        )

    # torch-style bicubic (tf's bicubic uses a = -0.5): the static matrices of the numpy path.
    def np_resize(im):
        from guft_jax.data.pipeline import resize_images

        return resize_images(im[None], image_size, "bicubic")[0]

    def fn(im):
        out = tf.numpy_function(np_resize, [im], tf.float32, stateful=False)
        return tf.ensure_shape(out, (image_size, image_size, 3))

    return fn


def vtab_source(
    task: str,
    *,
    data_dir: str | None = None,
    version: str | None = None,
    resize_method: str = "bilinear",
    shuffle_buffer: int = 10_000,
) -> TfdsSource:
    """Opens a prepared VTAB-1K task (never downloads).

    Args:
      task: one of :data:`TASKS` (e.g. "cifar100", "clevr_count", "smallnorb_azi").
      data_dir: the tfds data_dir holding the prepared dataset (default: tfds' own).
      version: overrides the registry's version pattern (e.g. "4.*.*" for Oxford-IIIT Pet
        prepared with tensorflow-datasets >= 4.9).
      resize_method: "bilinear" (tf.image.resize, as task_adaptation) or "bicubic" (torch-style).
      shuffle_buffer: cap on the shuffle buffer (test splits are larger than the training ones).

    Returns:
      A :class:`TfdsSource`.

    Raises:
      ValueError: unknown task / option, a version tfds cannot read, or a prepared dataset whose
        split sizes differ from the VTAB-1K ones.
      FileNotFoundError: when batches are requested from a dataset that is not prepared.
    """
    import tensorflow_datasets as tfds

    spec = get_task(task)
    check_choice("resize_method", resize_method, RESIZE_METHODS)
    if version is not None:
        spec = spec._replace(builder=f"{spec.builder.split(':')[0]}:{version}")
    try:
        builder = tfds.builder(spec.builder, data_dir=data_dir)
    except Exception as e:  # unknown version / config, reported by tfds as several types
        raise ValueError(
            f"VTAB task {task!r}: tensorflow-datasets cannot open {spec.builder!r} ({e}). "
            f"Pass version=<a version it can read> or {_prepare_hint(spec, data_dir)}"
        ) from e
    known = {k: v.num_examples for k, v in builder.info.splits.items()}
    for split, n in spec.num_examples.items():
        if split in known and known[split] != n:
            raise ValueError(
                f"VTAB task {task!r}: {spec.builder} split {split!r} has {known[split]} examples, "
                f"VTAB-1K expects {n}; the splits would not be the protocol's"
            )
    return TfdsSource(
        name=f"vtab/{task}",
        num_classes=spec.num_classes,
        task=spec,
        builder=builder,
        data_dir=data_dir,
        resize_method=resize_method,
        shuffle_buffer=shuffle_buffer,
    )


def split_infos(num_examples: dict[str, int]) -> dict[str, Any]:
    """``{split: object with .num_examples}``, the form tfds' ``ReadInstruction.to_absolute``
    takes (used by tests to resolve split strings independently of this module)."""
    return {k: types.SimpleNamespace(num_examples=v) for k, v in num_examples.items()}
