"""VTAB-1K registry and tf.data pipeline, on mocked tensorflow-datasets (no data, no network).

The mock (``tfds.testing.mock_data`` with our ``as_dataset_fn``) resolves each requested split
string with tfds' own ``ReadInstruction`` against the real split sizes and yields examples with
the builder's real feature structure; every RGB image is constant per channel and encodes
``(tfds split, index)`` so the test can tell which examples a VTAB split read.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from guft_jax.data import (  # noqa: E402
    SPLIT_NAMES,
    VTAB_ALIASES,
    DataSource,
    get_source,
    resize_matrix,
    vtab,  # noqa: E402
)

# VTAB-1K test-set sizes as published (Zhai et al. 2019; the NOAH/VPT data lists).
VTAB_TEST_SIZES = {
    "cifar100": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149,
    "oxford_iiit_pet": 3669, "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768,
    "eurosat": 5400, "resisc45": 6300, "diabetic_retinopathy": 42670, "clevr_count": 15000,
    "clevr_dist": 15000, "dmlab": 22735, "kitti": 711, "dsprites_loc": 73728,
    "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}  # fmt: skip
# Number of classes of the 19 tasks (VTAB paper, Table 5; NOAH configs).
VTAB_CLASSES = {
    "cifar100": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102,
    "oxford_iiit_pet": 37, "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10,
    "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6,
    "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
VERSION = {"oxford_iiit_pet": "4.*.*"}  # tfds 4.9 only builds Pet 4.0.0 from code
GREY = {"dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"}


def _counts_for(builder_name):
    for t in vtab.TASKS.values():
        if t.builder.split(":")[0].split("/")[0] == builder_name:
            return t.num_examples
    raise KeyError(builder_name)


def _num_objects(name, idx):
    if name == "clevr":
        return 3 + idx % 8
    if name == "kitti":
        return idx % 4
    return 1 + idx % 3


def _fake(feature, idx, code, name, k=None):
    """An example of ``feature``'s decoded structure, a deterministic function of ``idx``."""
    F = tfds.features
    lead = [] if k is None else [k]
    j = tf.range(k if k is not None else 1, dtype=tf.int64)
    j = j if k is not None else j[0]
    if isinstance(feature, F.FeaturesDict):
        return {key: _fake(feature[key], idx, code, name, k) for key in feature.keys()}
    if isinstance(feature, F.Sequence):
        n = tf.cast(_num_objects(name, idx), tf.int32)
        return _fake(feature.feature, idx, code, name, n)
    if isinstance(feature, F.Image):
        h, w, c = (s if s is not None else d for s, d in zip(feature.shape, (6, 5, 3), strict=True))
        if c == 3:
            px = tf.stack([code % 256, (code // 256) % 256, code // 65536])
        elif name == "dsprites":
            px = tf.reshape(idx % 2, [1])
        else:
            px = tf.reshape(code % 256, [1])
        return tf.broadcast_to(tf.cast(px, tf.uint8), lead + [h, w, c])
    if isinstance(feature, F.ClassLabel):
        return (idx + 3 * j) % feature.num_classes
    if isinstance(feature, F.Text):
        return tf.broadcast_to(tf.strings.as_string(idx), lead)
    info = feature.get_tensor_info()
    shape = [s for s in info.shape]
    if np.issubdtype(info.np_dtype, np.floating):
        # KITTI depths 0.25 .. 29.25 m, Clevr depths 7.6 .. 10.5: every distance bin occurs.
        step, offset = (1.0, 0.25) if name == "kitti" else (0.1, 7.6)
        base = tf.cast((idx * 7 + j * 11) % 30, tf.float32) * step + offset
        if k is not None:
            base = tf.reshape(base, [k] + [1] * len(shape))
        return tf.cast(tf.broadcast_to(base, lead + shape), info.tf_dtype)
    return tf.cast(tf.broadcast_to(idx % 5, lead + shape), info.tf_dtype)


def fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del decoders, read_config, shuffle_files
    name = self.name
    counts = _counts_for(name)
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(vtab.split_infos(counts))
    features = self.info.features
    parts = []
    for ins in instructions:
        sid = SPLIT_IDS[ins.splitname]

        def make(idx, sid=sid):
            code = sid * (1 << 20) + idx
            return _fake(features, idx, code, name)

        lo = ins.from_ or 0
        hi = counts[ins.splitname] if ins.to is None else ins.to
        parts.append(tf.data.Dataset.range(lo, hi).map(make))
    ds = parts[0]
    for p in parts[1:]:
        ds = ds.concatenate(p)
    return ds


@pytest.fixture
def mocked():
    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=fake_as_dataset
    ):
        yield


def _source(task):
    return get_source(f"vtab/{task}", version=VERSION.get(task))


def _decode(x):
    """Inverse of "0.5" normalisation of a constant-per-channel image -> (split id, index)."""
    px = np.rint((x[:, 0, 0, :] * 0.5 + 0.5) * 255).astype(np.int64)
    code = px[:, 0] + 256 * px[:, 1] + 65536 * px[:, 2]
    return code >> 20, code & ((1 << 20) - 1)


def test_registry_is_the_19_tasks():
    assert set(vtab.TASKS) == set(VTAB_CLASSES)
    assert {k: t.num_classes for k, t in vtab.TASKS.items()} == VTAB_CLASSES
    assert sum(len(v) for v in vtab.GROUPS.values()) == 19
    assert [len(vtab.GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    for name, task in vtab.TASKS.items():
        assert vtab.resolve_split(task, "test")[1] == VTAB_TEST_SIZES[name]
        sizes = [vtab.resolve_split(task, s)[1] for s in ("train800", "val200", "train800val200")]
        assert sizes == [800, 200, 1000]
        for alias, name in VTAB_ALIASES.items():
            assert vtab.resolve_split(task, alias) == vtab.resolve_split(task, name)


@pytest.mark.parametrize(
    "task,val200,test",
    [
        ("cifar100", "train[45000:45200]", "test"),
        ("caltech101", "train[2754:2954]", "test"),
        ("oxford_iiit_pet", "train[2944:3144]", "test"),
        ("svhn", "train[65931:66131]", "test"),
        ("eurosat", "train[16200:16400]", "train[21600:]"),
        ("resisc45", "train[18900:19100]", "train[25200:]"),
        ("clevr_count", "train[63000:63200]", "validation"),
        ("dsprites_loc", "train[589824:590024]", "train[663552:]"),
        ("smallnorb_ele", "test[:200]", "test[12150:]"),
        ("kitti", "validation[:200]", "test"),
    ],
)
def test_split_strings_match_tfds_percent_slicing(task, val200, test):
    t = vtab.TASKS[task]
    assert vtab.resolve_split(t, "val200")[0] == val200
    assert vtab.resolve_split(t, "test")[0] == test
    # task_adaptation's p * n // 100 equals tfds' own rounding of "p%" for these sizes.
    pct = {
        "eurosat": ("train[60%:]", "train[80%:]"),
        "resisc45": ("train[60%:]", "train[80%:]"),
        "dsprites_loc": ("train[80%:]", "train[90%:]"),
        "smallnorb_ele": ("test[:200]", "test[50%:]"),
    }
    if task in pct:
        infos = vtab.split_infos(t.num_examples)
        for ours, theirs in zip((val200, test), pct[task], strict=True):
            a = tfds.core.ReadInstruction.from_spec(ours).to_absolute(infos)[0]
            b = tfds.core.ReadInstruction.from_spec(theirs).to_absolute(infos)[0]
            assert a.from_ == b.from_


@pytest.mark.parametrize("task", sorted(VTAB_CLASSES))
def test_every_task_splits_shapes_labels(mocked, task):
    src = _source(task)
    assert isinstance(src, DataSource)
    assert src.num_classes == VTAB_CLASSES[task]
    t = vtab.TASKS[task]
    if isinstance(t.label, str):  # the feature's own class count is the task's
        assert src.builder.info.features[t.label].num_classes == t.num_classes
    # The whole 1,000-image training split: its size, dtype, shape and label range.
    n, labels, ids = 0, [], []
    for x, y in src.batches("train800val200", batch_size=500, image_size=8, normalization="0.5"):
        assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 3)
        assert y.dtype == np.int32
        n += len(y)
        labels.append(y)
        ids.append(_decode(x))
    labels = np.concatenate(labels)
    assert n == 1000 == src.size("train800val200")
    assert labels.min() >= 0 and labels.max() < src.num_classes
    assert len(np.unique(labels)) > 1
    assert [src.size(s) for s in SPLIT_NAMES] == [800, 200, 1000, VTAB_TEST_SIZES[task]]
    assert [src.size(s) for s in VTAB_ALIASES] == [800, 200, 1000]
    # Which examples were read: train[:800] then the val200 slice (RGB tasks encode it).
    if task not in GREY:
        sid = np.concatenate([i[0] for i in ids])
        idx = np.concatenate([i[1] for i in ids])
        val_slice = tfds.core.ReadInstruction.from_spec(src.split_string("val200")).to_absolute(
            vtab.split_infos(t.num_examples)
        )[0]
        assert (sid[:800] == 0).all() and (idx[:800] == np.arange(800)).all()
        assert (sid[800:] == SPLIT_IDS[val_slice.splitname]).all()
        assert (idx[800:] == np.arange(val_slice.from_ or 0, val_slice.to)).all()
    # The first test batch, through the test split string.
    x, y = next(src.batches("test", batch_size=4, image_size=8, normalization="0.5"))
    assert x.shape == (4, 8, 8, 3) and y.max() < src.num_classes
    if task not in GREY:
        test_slice = tfds.core.ReadInstruction.from_spec(src.split_string("test")).to_absolute(
            vtab.split_infos(t.num_examples)
        )[0]
        sid, idx = _decode(x)
        assert (sid == SPLIT_IDS[test_slice.splitname]).all()
        assert (idx == np.arange(test_slice.from_ or 0, (test_slice.from_ or 0) + 4)).all()


def _np_bin(value, thresholds):
    return int(np.searchsorted(np.asarray(thresholds), value, side="left")) - 1


def test_recipes_on_mocked_examples_match_numpy(mocked):
    """The labels of the mocked KITTI / Clevr / dSprites / smallNORB examples, recomputed in
    numpy from the same examples' fields."""
    for task in ("kitti", "clevr_dist", "clevr_count", "dsprites_ori", "smallnorb_azi"):
        src = _source(task)
        raw = src.builder.as_dataset(split=src.split_string("train800"))
        pairs = src.raw("train800")
        for ex, (_, label) in zip(raw.take(40).as_numpy_iterator(), pairs.take(40), strict=True):
            label = int(label)
            if task == "kitti":
                obj = ex["objects"]
                z = obj["location"][obj["type"] < 3, 2]
                want = _np_bin(min([*z.tolist(), 1000.0]), vtab.KITTI_DISTANCE_BINS)
            elif task == "clevr_dist":
                d = ex["objects"]["pixel_coords"][:, 2].min()
                want = _np_bin(d, vtab.CLEVR_DISTANCE_BINS)
            elif task == "clevr_count":
                want = len(ex["objects"]["size"]) - 3
            elif task == "dsprites_ori":
                want = int(np.floor(ex["label_orientation"] / 2.5))
            else:
                want = int(ex["label_azimuth"])
            assert label == want, (task, ex)


def _kitti(types, z):
    return {
        "objects": {
            "type": tf.constant(types, tf.int64),
            "location": tf.constant([[0.0, 1.0, v] for v in z], tf.float32)
            if z
            else tf.zeros((0, 3), tf.float32),
        }
    }


@pytest.mark.parametrize(
    "types,z,label",
    [
        ([0, 3, 2], [25.0, 3.0, 15.0], 1),  # pedestrian at 3 m ignored; truck at 15 m -> (8, 20]
        ([1], [8.0], 0),  # exactly 8 m is still the first bin (strict threshold)
        ([0, 0], [30.0, 20.5], 2),
        ([3, 5, 7], [2.0, 4.0, 6.0], 3),  # no Car/Van/Truck -> "no vehicle"
        ([], [], 3),
    ],
)
def test_kitti_recipe_hand_made(types, z, label):
    assert int(vtab.kitti_closest_vehicle_distance(_kitti(types, z))) == label


@pytest.mark.parametrize(
    "depths,label",
    [([9.2, 12.0, 8.9], 2), ([7.0, 11.0], 0), ([10.5], 5), ([9.5, 9.6], 3)],  # 9.5 is not > 9.5
)
def test_clevr_recipes_hand_made(depths, label):
    ex = {
        "objects": {
            "pixel_coords": tf.constant([[1.0, 2.0, d] for d in depths], tf.float32),
            "size": tf.zeros(len(depths), tf.int64),
        }
    }
    assert int(vtab.clevr_closest_object_distance(ex)) == label
    assert label == _np_bin(min(depths), vtab.CLEVR_DISTANCE_BINS)
    five = {"objects": {"size": tf.zeros(5, tf.int64)}}
    assert int(vtab.clevr_count_all(five)) == 2


def test_dsprites_bins_cover_16_classes_evenly():
    loc = vtab.binned("label_x_position", 32, 16)
    ori = vtab.binned("label_orientation", 40, 16)
    xs = [int(loc({"label_x_position": tf.constant(v, tf.int64)})) for v in range(32)]
    os_ = [int(ori({"label_orientation": tf.constant(v, tf.int64)})) for v in range(40)]
    assert xs == [v // 2 for v in range(32)]
    assert os_ == [int(np.floor(v / 2.5)) for v in range(40)]
    assert np.bincount(os_).tolist() == [3, 2] * 8


def test_shuffle_is_deterministic_and_start_step_resumes(mocked):
    src = _source("cifar100")
    kw = dict(batch_size=64, image_size=4, normalization="0.5", shuffle=True)
    a = [_decode(x)[1] for x, _ in src.batches("train800", seed=3, epoch=1, **kw)]
    b = [_decode(x)[1] for x, _ in src.batches("train800", seed=3, epoch=1, **kw)]
    c = [_decode(x)[1] for x, _ in src.batches("train800", seed=3, epoch=2, **kw)]
    assert all((u == v).all() for u, v in zip(a, b, strict=True)) and len(a) == len(b) == 13
    assert sorted(np.concatenate(a).tolist()) == list(range(800))
    assert not (np.concatenate(a) == np.concatenate(c)).all()
    tail = [_decode(x)[1] for x, _ in src.batches("train800", seed=3, epoch=1, start_step=5, **kw)]
    assert len(tail) == 8 and all((u == v).all() for u, v in zip(a[5:], tail, strict=True))
    full = list(src.batches("train800", batch_size=64, image_size=4, drop_remainder=True))
    assert len(full) == 12


def test_tf_bilinear_equals_numpy_resize():
    rng = np.random.default_rng(0)
    for h, w, s in ((7, 5, 12), (30, 21, 8), (8, 8, 8)):
        im = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        ref = resize_matrix(h, s) @ im.astype(np.float32).transpose(2, 0, 1) @ resize_matrix(w, s).T
        got = vtab._tf_resize(s, "bilinear")(tf.constant(im)).numpy()
        np.testing.assert_allclose(got, ref.transpose(1, 2, 0), atol=2e-3)


def test_bicubic_path_and_imagenet_normalisation(mocked):
    src = get_source("vtab/svhn", resize_method="bicubic")
    x, _ = next(src.batches("train800", batch_size=2, image_size=9))
    sid, idx = 0, np.arange(2)
    px = np.stack([idx % 256, (idx // 256) % 256, idx // 65536 + sid], -1).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = (px / 255.0 - mean) / std  # a constant image stays constant under either resize
    np.testing.assert_allclose(x[:, 4, 4, :], want, atol=1e-5)


def test_errors_name_the_field_and_never_download(tmp_path):
    with pytest.raises(ValueError, match="task='cifar10'.*cifar100"):
        get_source("vtab/cifar10")
    src = get_source("vtab/dtd", data_dir=str(tmp_path))  # nothing prepared there
    with pytest.raises(FileNotFoundError, match="tfds build dtd"):
        next(src.batches("train800", batch_size=2, image_size=4))
    with pytest.raises(ValueError, match="split='training'.*train800"):
        src.size("training")
    with pytest.raises(ValueError, match="normalization='imagnet'"):
        next(src.batches("val200", batch_size=2, image_size=4, normalization="imagnet"))
    with pytest.raises(ValueError, match="resize_method"):
        get_source("vtab/dtd", data_dir=str(tmp_path), resize_method="area")
    with pytest.raises(ValueError, match="version"):
        get_source("vtab/oxford_iiit_pet", data_dir=str(tmp_path))  # 3.*.* unknown to tfds 4.9
