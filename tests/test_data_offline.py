"""Offline real datasets (Fashion-MNIST, Animal-MNIST, digits), npz/folder data, preprocessing."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from guft_jax.data import (
    SPLIT_NAMES,
    SPLITS,
    VTAB_ALIASES,
    ArraySource,
    DataSource,
    data_identity,
    dedupe,
    get_source,
    load_offline,
    offline,
    resize_matrix,
    split_indices,
)

HAVE_FASHION = os.path.exists(os.path.join(offline.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
HAVE_ANIMAL = importlib.util.find_spec("animal_mnist") is not None
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="apt-get install dataset-fashion-mnist")
needs_animal = pytest.mark.skipif(not HAVE_ANIMAL, reason="pip install --no-deps animal-mnist==0.4")

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _rows(images):
    return {bytes(im.tobytes()) for im in images}


def _sizes(splits):
    return {k: len(v[1]) for k, v in splits.items()}


# ----------------------------------------------------------------------------- real datasets


@needs_fashion
def test_fashion_mnist_splits():
    a = load_offline("fashion_mnist", seed=0)
    assert _sizes(a) == {"train": 800, "val": 200, "test": 10000}
    x, y = a["test"]
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10  # the official balanced test split
    for _, lab in a.values():
        assert lab.min() >= 0 and lab.max() <= 9
    b = load_offline("fashion_mnist", seed=0)
    c = load_offline("fashion_mnist", seed=1)
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)  # deterministic per seed
    assert not np.array_equal(a["train"][0], c["train"][0])
    # test_size subsamples the official test split, the same images for every seed.
    s0 = load_offline("fashion_mnist", seed=0, test_size=500)["test"]
    s1 = load_offline("fashion_mnist", seed=5, test_size=500)["test"]
    assert len(s0[1]) == 500 and np.array_equal(s0[0], s1[0]) and np.array_equal(s0[1], s1[1])
    assert _rows(s0[0]) <= _rows(x)


@needs_animal
def test_animal_mnist_dedup_and_disjoint_bytewise():
    x, y, info = offline.animal_mnist_deduped()
    assert info == {"num_raw": 10000, "num_duplicates": 284, "label_conflicts": 0}
    assert len(_rows(x)) == len(x) == 9716
    splits = load_offline("animal_mnist", seed=0)
    assert _sizes(splits) == {"train": 800, "val": 200, "test": 2000}
    train = _rows(splits["train"][0]) | _rows(splits["val"][0])
    test = _rows(splits["test"][0])
    assert len(train) == 1000 and len(test) == 2000
    assert not train & test  # no test image is (byte-wise) a training image
    other = load_offline("animal_mnist", seed=7)
    assert np.array_equal(other["test"][0], splits["test"][0])  # test fixed across seeds
    assert _rows(other["train"][0]) != _rows(splits["train"][0])
    assert all(v[1].min() >= 0 and v[1].max() <= 9 for v in splits.values())


def test_digits_partition_all_images():
    splits = load_offline("digits", seed=0)
    assert _sizes(splits) == {"train": 800, "val": 200, "test": 797}
    x = np.concatenate([v[0] for v in splits.values()])
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.uint8 and x.max() == 255
    from sklearn.datasets import load_digits

    d = load_digits()
    ref = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    # Same multiset of (image, label) pairs as the scikit-learn copy.
    ours = sorted(
        im.tobytes() + bytes([int(lab)]) for k in splits for im, lab in zip(*splits[k], strict=True)
    )
    theirs = sorted(im.tobytes() + bytes([int(lab)]) for im, lab in zip(ref, d.target, strict=True))
    assert ours == theirs


def test_dedupe_keeps_first_and_reports_conflicts():
    x = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]], np.uint8)
    y = np.array([0, 1, 0, 2, 9])
    ux, uy, keep, conflicts = dedupe(x, y)
    assert keep.tolist() == [0, 1, 3] and uy.tolist() == [0, 1, 2] and conflicts == 1
    assert np.array_equal(ux, x[[0, 1, 3]])


def test_vtab_names_alias_the_split_names_of_packaged_data():
    src = get_source("digits", seed=4)
    for alias, name in VTAB_ALIASES.items():
        (xa, ya), (xb, yb) = src.raw(alias), src.raw(name)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert src.size(alias) == src.size(name)
        assert data_identity(src, [name]) == data_identity(src, [alias])  # keyed by the alias
    x, y = src.raw("trainval")
    assert np.array_equal(y, np.concatenate([src.raw("train")[1], src.raw("val")[1]]))
    a = list(src.batches("trainval", batch_size=300, image_size=4, shuffle=True, seed=1))
    b = list(src.batches("train800val200", batch_size=300, image_size=4, shuffle=True, seed=1))
    assert all(
        np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
    )
    assert src.describe()["split_sizes"] == {"train800": 800, "val200": 200, "test": 797}
    assert set(SPLITS) == {*SPLIT_NAMES, *VTAB_ALIASES}


def test_split_indices_disjoint_fixed_test_and_errors():
    a = split_indices(100, train_size=30, val_size=10, test_size=25, seed=0)
    b = split_indices(100, train_size=30, val_size=10, test_size=25, seed=1)
    assert [len(a[k]) for k in ("train", "val", "test")] == [30, 10, 25]
    assert len(set(np.concatenate(list(a.values())).tolist())) == 65
    assert np.array_equal(a["test"], b["test"]) and not np.array_equal(a["train"], b["train"])
    assert not set(b["test"]) & (set(b["train"]) | set(b["val"]))
    rest = split_indices(100, train_size=30, val_size=10, seed=3)
    assert len(rest["test"]) == 60
    with pytest.raises(ValueError, match="exceeds the 100"):
        split_indices(100, train_size=80, val_size=20, test_size=1)
    with pytest.raises(ValueError, match="train_size"):
        split_indices(100, train_size=0, val_size=20, test_size=1)


# ----------------------------------------------------------------------------- users' data


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 6, 5, 3)).astype(np.uint8)
    labels = np.arange(60) % 4
    path = tmp_path / "mine.npz"
    np.savez(path, images=images, labels=labels)
    src = get_source(f"npz:{path}", train_size=20, val_size=10, test_size=15, seed=2)
    assert isinstance(src, DataSource) and src.num_classes == 4
    assert [src.size(s) for s in SPLIT_NAMES] == [20, 10, 30, 15]
    lookup = {im.tobytes(): int(lab) for im, lab in zip(images, labels, strict=True)}
    seen = []
    for split in ("train", "val", "test"):
        x, y = src.raw(split)
        for im, lab in zip(x, y, strict=True):
            assert lookup[im.tobytes()] == lab  # every image comes back with its own label
            seen.append(im.tobytes())
    assert len(set(seen)) == 45
    grey = tmp_path / "grey.npz"
    np.savez(grey, images=images[..., 0], labels=labels)
    x, _ = next(get_source(f"npz:{grey}", train_size=20, val_size=10).batches(
        "train", batch_size=4, image_size=5, normalization="0.5"))  # fmt: skip
    assert x.shape == (4, 5, 5, 3) and np.array_equal(x[..., 0], x[..., 2])
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=images.astype(np.float32) * 2, labels=labels)  # floats beyond 255
    with pytest.raises(ValueError, match=r"\[0, 1\] or \[0, 255\]"):
        get_source(f"npz:{bad}")
    np.savez(bad, pixels=images, labels=labels)
    with pytest.raises(ValueError, match="images"):
        get_source(f"npz:{bad}")


def _write_folder(root, classes, per_class, rng, size=(5, 4)):
    from PIL import Image

    written = {}
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            mode = "L" if (i % 3 == 0 and c != classes[0]) else "RGB"
            shape = size if mode == "L" else (*size, 3)
            a = rng.integers(0, 256, shape).astype(np.uint8)
            Image.fromarray(a, mode).save(root / c / f"{i:03d}.png")
            rgb = np.repeat(a[..., None], 3, -1) if mode == "L" else a
            written[rgb.tobytes()] = c
    return written


def test_folder_round_trip_both_layouts(tmp_path):
    rng = np.random.default_rng(1)
    classes = ["cat", "dog", "emu"]
    written = _write_folder(tmp_path / "flat", classes, 10, rng)
    src = get_source(f"folder:{tmp_path / 'flat'}", train_size=12, val_size=6, test_size=12)
    assert src.num_classes == 3 and [src.size(s) for s in SPLIT_NAMES] == [12, 6, 18, 12]
    for split in ("train", "val", "test"):
        x, y = src.raw(split)
        for im, lab in zip(x, y, strict=True):
            assert written[np.asarray(im).tobytes()] == classes[lab]  # PNG is lossless
    # tfds ImageFolder layout: root/{train,test}/<class>/<image>
    tr = _write_folder(tmp_path / "split" / "train", classes, 8, rng)
    te = _write_folder(tmp_path / "split" / "test", classes, 4, rng)
    splits = load_offline(f"folder:{tmp_path / 'split'}", train_size=16, val_size=8)
    assert _sizes(splits) == {"train": 16, "val": 8, "test": 12}
    assert all(np.asarray(im).tobytes() in te for im in splits["test"][0])
    assert all(np.asarray(im).tobytes() in tr for im in splits["train"][0])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_offline(f"folder:{tmp_path / 'nope'}")


# ----------------------------------------------------------------------------- preprocessing


def _constant_source(value=200):
    x = np.full((10, 3, 4, 1), value, np.uint8)
    splits = {"train800": (x[:6], np.arange(6)), "val200": (x[6:8], np.arange(2)),
              "test": (x[8:], np.arange(2))}  # fmt: skip
    return ArraySource(name="const", num_classes=6, splits=splits)


@pytest.mark.parametrize(
    "flag,mean,std", [("imagenet", MEAN, STD), ("0.5", np.full(3, 0.5), np.full(3, 0.5))]
)
def test_normalisation_values(flag, mean, std):
    x, y = next(_constant_source(200).batches("train800", batch_size=6, image_size=7,
                                              normalization=flag))  # fmt: skip
    assert x.shape == (6, 7, 7, 3) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, np.broadcast_to((200 / 255 - mean) / std, x.shape), atol=1e-6)


def test_resize_matrix_closed_forms():
    np.testing.assert_allclose(resize_matrix(2, 4) @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])
    np.testing.assert_array_equal(resize_matrix(5, 5), np.eye(5, dtype=np.float32))
    np.testing.assert_allclose(resize_matrix(4, 2) @ np.arange(4.0), [0.5, 2.5])
    for a, b in ((3, 11), (28, 224), (224, 28), (7, 3)):
        for m in ("bilinear", "bicubic"):
            np.testing.assert_allclose(resize_matrix(a, b, m).sum(1), 1.0, atol=1e-5)
    import jax

    im = np.random.default_rng(0).random((1, 6, 5, 3)).astype(np.float32)
    ours = resize_matrix(6, 16) @ np.moveaxis(im[0], -1, 0) @ resize_matrix(5, 16).T
    ref = jax.image.resize(im, (1, 16, 16, 3), "bilinear")  # upsampling: plain triangle kernel
    np.testing.assert_allclose(np.moveaxis(ours, 0, -1), np.asarray(ref[0]), atol=1e-5)


def test_batches_deterministic_and_start_step_resume():
    src = get_source("digits", seed=0)
    kw = dict(batch_size=96, image_size=10, shuffle=True, seed=4, epoch=2)
    a = list(src.batches("train800val200", **kw))
    b = list(src.batches("train800val200", **kw))
    assert len(a) == 11 and all(
        np.array_equal(u[0], v[0]) and np.array_equal(u[1], v[1]) for u, v in zip(a, b, strict=True)
    )
    tail = list(src.batches("train800val200", start_step=7, **kw))
    assert len(tail) == 4
    for u, v in zip(a[7:], tail, strict=True):
        assert np.array_equal(u[0], v[0]) and np.array_equal(u[1], v[1])
    other = list(src.batches("train800val200", **{**kw, "epoch": 3}))
    assert not np.array_equal(a[0][1], other[0][1])
    labels = np.concatenate([y for _, y in a])
    ref = np.concatenate([y for _, y in src.batches("train800val200", batch_size=1000,
                                                    image_size=10)])  # fmt: skip
    assert sorted(labels.tolist()) == sorted(ref.tolist())  # a permutation of the split
    dropped = list(src.batches("train800", batch_size=96, image_size=4, drop_remainder=True))
    assert len(dropped) == 8 and all(len(y) == 96 for _, y in dropped)
    assert list(src.batches("val200", batch_size=64, image_size=4, start_step=4)) == []


def test_errors_name_field_and_install_command(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dataset='mnist'.*fashion_mnist"):
        get_source("mnist")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_offline("fashion_mnist", data_dir=str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "animal_mnist" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps animal-mnist==0.4"):
        load_offline("animal_mnist")
    monkeypatch.undo()
    src = get_source("digits")
    with pytest.raises(ValueError, match="split='training'.*train800"):
        next(src.batches("training", batch_size=4, image_size=4))
    with pytest.raises(ValueError, match="normalization='imagenet21k'.*imagenet"):
        next(src.batches("test", batch_size=4, image_size=4, normalization="imagenet21k"))
    with pytest.raises(ValueError, match="start_step"):
        next(src.batches("val200", batch_size=64, image_size=4, start_step=5))
    with pytest.raises(ValueError, match="resize_method"):
        get_source("digits", resize_method="nearest")
