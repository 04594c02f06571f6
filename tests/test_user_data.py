"""Users' own data: any size split by the documented rule, and one-line errors for bad inputs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
from fault_rows import record
from PIL import Image

from guft_jax.data import SPLIT_NAMES, folder, get_source, split_sizes
from guft_jax.errors import InputError

SPLIT3 = ("train", "val", "test")


def _images(n, rng, size=(4, 4), channels=3):
    return rng.integers(0, 256, (n, *size, channels)).astype(np.uint8)


def _labels(n, k):
    """Imbalanced sorted labels: class c holds about (c + 1) shares of the n images."""
    w = np.arange(1, k + 1, dtype=np.float64)
    return np.searchsorted(np.cumsum(w) / w.sum() * n, np.arange(n), side="right").astype(np.int64)


def _write_npz(path, n, k, rng, **extra):
    x, y = _images(n, rng), _labels(n, k)
    np.savez(path, images=x, labels=y, **extra)
    return {im.tobytes(): int(lab) for im, lab in zip(x, y, strict=True)}


def _write_folder(root, n, k, rng, names=None, size=(4, 4)):
    names = names or [f"class_{c}" for c in range(k)]
    lookup = {}
    for i, (im, lab) in enumerate(zip(_images(n, rng, size), _labels(n, k), strict=True)):
        d = root / names[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:04d}.png")
        lookup[im.tobytes()] = names[lab]
    return lookup, names


def _check_split(src, lookup, names, n, k):
    expected, _ = split_sizes(n)
    assert src.split_sizes == expected
    assert src.num_classes == k and len(src.class_names) == k
    seen = []
    for s in SPLIT3:
        x, y = src.raw(s)
        for im, lab in zip(x, y, strict=True):
            want = lookup[np.asarray(im).tobytes()]
            assert want == (names[lab] if names else lab)  # each image keeps its own label
            seen.append(np.asarray(im).tobytes())
    assert len(seen) == len(set(seen)) == sum(expected.values())  # disjoint splits
    counts = np.bincount(_labels(n, k), minlength=k)
    for s in SPLIT3:
        present = set(np.unique(src.raw(s)[1]).tolist())
        need = {c for c in range(k) if s == "train" or counts[c] >= 3}
        assert need <= present, (s, need - present)


@pytest.mark.parametrize("n,rule", [(30, (21, 3, 6)), (120, (84, 12, 24)), (300, (210, 30, 60)),
                                    (999, (699, 100, 200))])  # fmt: skip
def test_any_size_npz_and_folder_follow_the_rule(tmp_path, n, rule):
    assert tuple(split_sizes(n)[0].values()) == rule
    k = 5 if n >= 100 else 3
    rng = np.random.default_rng(n)
    npz = tmp_path / "d.npz"
    lookup = _write_npz(npz, n, k, rng)
    src = get_source(f"npz:{npz}", seed=1)
    _check_split(src, lookup, None, n, k)
    assert "70/10/20" in src.info["split_rule"] and src.class_names == tuple(map(str, range(k)))
    other = get_source(f"npz:{npz}", seed=2)
    assert np.array_equal(other.raw("test")[0], src.raw("test")[0])  # test fixed across seeds
    assert not np.array_equal(other.raw("train")[0], src.raw("train")[0])
    if n in (30, 300):  # the folder form of the same rule (PNG writing is the slow part)
        lookup, names = _write_folder(tmp_path / "f", n, k, rng)
        fsrc = get_source(f"folder:{tmp_path / 'f'}", seed=0)
        _check_split(fsrc, lookup, names, n, k)
        assert fsrc.class_names == tuple(names)
        assert fsrc.describe()["split_sizes"] == dict(zip(SPLIT3, rule, strict=True))


def test_vtab_rule_from_1250_images_and_explicit_sizes(tmp_path):
    assert split_sizes(1250)[0] == {"train": 800, "val": 200, "test": 250}
    assert split_sizes(1249)[0] == {"train": 874, "val": 125, "test": 250}
    assert split_sizes(300, train_size=0.5, val_size=0, test_size=100)[0] == {
        "train": 150, "val": 0, "test": 100}  # fmt: skip
    assert split_sizes(300, train_size=40.0)[0]["train"] == 40  # a float count from a config
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    _write_npz(npz, 200, 4, rng)
    src = get_source(f"npz:{npz}", train_size=0.25, val_size=10, test_size=0.5)
    assert src.split_sizes == {"train": 50, "val": 10, "test": 100}
    assert [src.size(s) for s in SPLIT_NAMES] == [50, 10, 60, 100]
    bad_sizes = [({"train_size": 1.5}, "train_size"), ({"val_size": -2}, "val_size"),
                 ({"test_size": "10"}, "test_size"), ({"train_size": 190}, "fit")]  # fmt: skip
    for bad, field in bad_sizes:
        with pytest.raises(InputError, match=field):
            get_source(f"npz:{npz}", **bad)
    with pytest.raises(InputError, match="would get 3 images for 4 classes"):
        get_source(f"npz:{npz}", train_size=3)


def test_vtab_split_names_are_refused_for_user_data(tmp_path):
    # A 30-image npz splits 21 / 3 / 6: a "train800" would name 21 images, so it is an error.
    npz = tmp_path / "d.npz"
    _write_npz(npz, 30, 3, np.random.default_rng(0))
    src = get_source(f"npz:{npz}")
    x, y = src.raw("trainval")
    assert np.array_equal(y, np.concatenate([src.raw("train")[1], src.raw("val")[1]]))
    assert len(x) == src.size("trainval") == 24
    for name in ("train800", "val200", "train800val200"):
        with pytest.raises(
            InputError, match=f"split='{name}'.*allowed: train, val, trainval, test"
        ):
            src.size(name)
        with pytest.raises(InputError, match="VTAB-1K name"):
            next(src.batches(name, batch_size=4, image_size=4))
    with pytest.raises(InputError, match="allowed: train, val, trainval, test$"):
        src.raw("training")


def test_explicit_test_sets(tmp_path):
    rng = np.random.default_rng(3)
    # folder/train + folder/test
    _write_folder(tmp_path / "s" / "train", 40, 2, rng, names=["ant", "bee"])
    te, _ = _write_folder(tmp_path / "s" / "test", 10, 2, rng, names=["ant", "bee"])
    src = get_source(f"folder:{tmp_path / 's'}")
    assert src.split_sizes == {"train": 35, "val": 5, "test": 10}
    assert all(np.asarray(im).tobytes() in te for im in src.raw("test")[0])
    assert "test set" in src.info["split_rule"] and src.class_names == ("ant", "bee")
    # folder:A,test:B
    src = get_source(f"folder:{tmp_path / 's' / 'train'},test:{tmp_path / 's' / 'test'}",
                     test_size=4)  # fmt: skip
    assert src.split_sizes["test"] == 4 and set(src.raw("test")[1].tolist()) == {0, 1}
    # npz with test_images / test_labels, and npz:A,test:B
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, images=_images(30, rng), labels=np.arange(30) % 3,
             test_images=_images(9, rng), test_labels=np.arange(9) % 3)  # fmt: skip
    assert get_source(f"npz:{a}").split_sizes == {"train": 26, "val": 4, "test": 9}
    np.savez(b, images=_images(12, rng), labels=np.arange(12) % 3)
    src = get_source(f"npz:{b},test:{a}")
    assert src.split_sizes == {"train": 10, "val": 2, "test": 30}
    np.savez(a, images=_images(6, rng), labels=np.arange(6) % 3 + 5)  # labels unseen in b
    with pytest.raises(InputError, match=r"b.npz: test labels \[5, 6, 7\] do not occur"):
        get_source(f"npz:{b},test:{a}")


def test_tiny_classes_one_class_and_label_rules(tmp_path):
    rng = np.random.default_rng(4)
    p = tmp_path / "d.npz"
    # class 0: 1 image, class 1: 2 images, class 2: 27 images
    np.savez(p, images=_images(30, rng), labels=np.array([0] + [1] * 2 + [2] * 27))
    src = get_source(f"npz:{p}")
    assert set(src.raw("train")[1].tolist()) == {0, 1, 2}
    assert 1 in src.raw("test")[1] and 0 not in src.raw("test")[1]
    assert 0 not in src.raw("val")[1] and 1 not in src.raw("val")[1]
    assert any("class 0 has 1 image(s): not in test, val" in s for s in src.notes)
    # non-contiguous labels are remapped, the mapping recorded
    np.savez(p, images=_images(30, rng), labels=np.array([3, 7, 9] * 10))
    src = get_source(f"npz:{p}")
    assert src.num_classes == 3 and src.class_names == ("3", "7", "9")
    assert src.info["label_map"] == {"3": 0, "7": 1, "9": 2}
    assert set(src.raw("train")[1].tolist()) == {0, 1, 2}
    np.savez(p, images=_images(30, rng), labels=np.array([3, 7, 9] * 10),
             class_names=np.array([f"n{i}" for i in range(10)]))  # fmt: skip
    assert get_source(f"npz:{p}").class_names == ("n3", "n7", "n9")
    src = get_source(f"npz:{p}", num_classes=10)  # with num_classes: used as they are
    assert src.num_classes == 10 and set(src.raw("train")[1].tolist()) == {3, 7, 9}
    with pytest.raises(InputError, match=r"label 9 is out of range for num_classes=5"):
        get_source(f"npz:{p}", num_classes=5)
    # string labels are class names
    np.savez(p, images=_images(30, rng), labels=np.array(["dog", "cat", "emu"] * 10))
    src = get_source(f"npz:{p}")
    assert src.class_names == ("cat", "dog", "emu")
    assert src.raw("train")[1].max() == 2
    # one class: a clear error
    np.savez(p, images=_images(10, rng), labels=np.full(10, 4))
    with pytest.raises(InputError, match=r"d.npz: only one class \(4\)"):
        get_source(f"npz:{p}")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.fromarray(_images(1, rng)[0]).save(tmp_path / "one" / "cat" / "a.png")
    with pytest.raises(InputError, match=r"only one class \(cat\)"):
        get_source(f"folder:{tmp_path / 'one'}")


def test_folder_conversions_are_noted(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "mixed"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            mode = ("L", "RGB", "RGBA")[i % 3]
            shape = (3 + i, 4) if mode == "L" else (3 + i, 4, len(mode))
            Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(
                root / c / f"{i}.png")  # fmt: skip
        (root / c / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("loose file")
    Image.fromarray(np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).save(root / "a" / "16.png")
    src = get_source(f"folder:{root}")
    assert src.info["ignored_files"] == 3 and src.split_sizes == {"train": 8, "val": 1,
                                                                   "test": 2}  # fmt: skip
    text = " ".join(src.notes)
    assert "alpha channels dropped" in text and "grey ones repeated to RGB" in text
    assert "sizes" in text and "ignored 3 non-image entries" in text
    x, _ = next(src.batches("trainval", batch_size=8, image_size=6))
    assert x.shape == (8, 6, 6, 3) and np.isfinite(x).all()
    im16 = folder.read_image(str(root / "a" / "16.png"))
    assert im16.dtype == np.uint8 and im16.max() == round(55000 * 255 / 65535)


def _bad_npz(tmp_path, rng):
    good = tmp_path / "good.npz"
    np.savez(good, images=_images(20, rng), labels=np.arange(20) % 2)
    raw = good.read_bytes()
    cases = {}

    def case(name, content=None, **arrays):
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        elif arrays:
            np.savez(p, **arrays)
        cases[name] = p

    case("half.npz", raw[: len(raw) // 2])
    damaged = bytearray(raw)
    damaged[len(raw) // 3 : len(raw) // 3 + 40] = b"\0" * 40
    case("crc.npz", bytes(damaged))
    np.save(tmp_path / "arr.npy", _images(3, rng))
    cases["arr.npy"] = tmp_path / "arr.npy"
    case("notes.npz", b"images,labels\n1,2\n")
    case("empty.npz", b"")
    cases["missing.npz"] = tmp_path / "missing.npz"
    case("keys.npz", x=_images(4, rng), y=np.arange(4))
    case("nan.npz", images=np.full((4, 2, 2, 3), np.nan, np.float32), labels=np.arange(4) % 2)
    case("floatlab.npz", images=_images(4, rng), labels=np.array([0, 1.5, 1, 0]))
    case("neglab.npz", images=_images(4, rng), labels=np.array([0, -1, 1, 0]))
    case("onehot.npz", images=_images(4, rng), labels=np.eye(4))
    case("count.npz", images=_images(4, rng), labels=np.arange(3))
    case("chw.npz", images=np.zeros((4, 3, 8, 8), np.uint8), labels=np.arange(4) % 2)
    case("int16.npz", images=np.full((4, 2, 2), 300, np.int16), labels=np.arange(4) % 2)
    case("objects.npz", images=np.array([np.zeros(2), np.zeros(3)], dtype=object),
         labels=np.arange(2))  # fmt: skip
    return cases


NPZ_PROBLEMS = {
    "half.npz": "truncated or corrupt",
    "crc.npz": "corrupt",
    "arr.npy": "is a .npy file",
    "notes.npz": "not an .npz archive (a text file)",
    "empty.npz": "is empty",
    "missing.npz": "not found",
    "keys.npz": "no array 'images'",
    "nan.npz": "NaN/Inf",
    "floatlab.npz": "must be integers",
    "neglab.npz": "must be >= 0",
    "onehot.npz": "one-hot",
    "count.npz": "3 entries but there are 4 images",
    "chw.npz": "channels first",
    "int16.npz": "allowed: 0..255",
    "objects.npz": "Python objects",
}


def test_bad_npz_inputs_give_one_line_naming_the_file(tmp_path):
    cases = _bad_npz(tmp_path, np.random.default_rng(6))
    assert set(cases) == set(NPZ_PROBLEMS)
    for name, path in cases.items():
        with pytest.raises(InputError) as e:
            get_source(f"npz:{path}")
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg, msg
        assert NPZ_PROBLEMS[name] in msg, (name, msg)
        record("data files", f"npz: {name}", f"error: {msg}")
    assert isinstance(e.value, ValueError)
    with pytest.raises(FileNotFoundError):  # a missing file is also a FileNotFoundError
        get_source(f"npz:{cases['missing.npz']}")


def _png(path, rng, size=(4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_images(1, rng, size)[0]).save(path)


def test_bad_folders_give_one_line_naming_the_path(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "pets"
    for c in ("cat", "dog"):
        for i in range(6):
            _png(root / c / f"{i}.png", rng)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    full = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError) as e:
        get_source(f"folder:{root}")
    assert "cut.png: unreadable image" in str(e.value) and str(root) in str(e.value)
    assert "skip_bad=True" in str(e.value) and "\n" not in str(e.value)
    src = get_source(f"folder:{root}", skip_bad=True)
    assert src.info["skipped_files"] == 2 and sum(src.split_sizes.values()) == 12
    assert any("skipped 2 unreadable images" in s for s in src.notes)
    (root / "emu").mkdir()
    (root / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match=r"pets/emu: class folder holds no images"):
        get_source(f"folder:{root}", skip_bad=True)
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png", rng)
    cases = {
        tmp_path / "nope": "image folder not found",
        tmp_path / "flat": "1 images but no class sub-folders",
        root / "cat" / "0.png": "is a file, not a folder",
    }
    (tmp_path / "empty").mkdir()
    cases[tmp_path / "empty"] = "no class sub-folders"
    for path, problem in cases.items():
        with pytest.raises(InputError) as e:
            get_source(f"folder:{path}")
        assert str(path) in str(e.value) and problem in str(e.value), str(e.value)
        record("data files", f"folder: {problem}", f"error: {e.value}")
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    (tmp_path / "split" / "val").mkdir()
    with pytest.raises(InputError, match="split/val: a validation folder is not supported"):
        get_source(f"folder:{tmp_path / 'split'}")


# ----------------------------------------------------------------------------- issue 25


def _npz(tmp_path, name, images, labels):
    path = tmp_path / name
    np.savez(path, images=images, labels=np.asarray(labels))
    return f"npz:{path}"


def test_huge_label_values_are_remapped_by_rank_and_1e20_is_refused(tmp_path):
    rng = np.random.default_rng(8)
    big = [0, 2**40, 5] * 4
    src = get_source(_npz(tmp_path, "big.npz", _images(12, rng), big))  # no 8 TiB table
    assert src.num_classes == 3 and src.info["label_map"] == {"0": 0, "5": 1, str(2**40): 2}
    assert src.class_names == ("0", "5", str(2**40))
    y = np.concatenate([src.raw(s)[1] for s in ("train", "val", "test")])
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(InputError) as e:
        get_source(_npz(tmp_path, "huge.npz", _images(4, rng), [0, 1e20, 1, 0]))
    assert str(e.value).endswith("labels must be integers up to 2**53; entry 1 is 1e+20 "
                                 "(dtype float64)")  # fmt: skip
    record("labels and splits", "label 1e20", f"error: {e.value}")


def test_small_datasets_follow_the_documented_rule_and_name_no_unset_field(tmp_path):
    rng = np.random.default_rng(9)
    with pytest.raises(InputError) as e:  # one image in each of 60 classes
        get_source(_npz(tmp_path, "one.npz", _images(60, rng), np.arange(60)))
    msg = str(e.value)
    assert "60 images in 60 classes, one per class" in msg and "train_size" not in msg
    record("labels and splits", "one image per class (60 classes)", f"error: {msg}")
    src = get_source(_npz(tmp_path, "two.npz", _images(8, rng), np.arange(8) % 4))
    assert src.split_sizes == {"train": 4, "val": 0, "test": 4}  # 2 per class: train+test
    for split in ("train", "test"):
        assert sorted(src.raw(split)[1].tolist()) == [0, 1, 2, 3]
    assert "moved" in src.info["split_rule"]
    with pytest.raises(InputError) as e:  # sizes the user gave: those fields are named
        get_source(_npz(tmp_path, "two.npz", _images(8, rng), np.arange(8) % 4), test_size=5)
    assert "would get 2 images for 4 classes" in str(e.value) and "test_size" in str(e.value)


def test_16_bit_pixels_are_scaled_and_noted_alike_in_npz_and_folders(tmp_path):
    x16 = (np.arange(4 * 2 * 2, dtype=np.uint16).reshape(4, 2, 2) * 4000).astype(np.uint16)
    src = get_source(_npz(tmp_path, "u16.npz", x16, [0, 1, 0, 1]))
    note = "16-bit pixels scaled to 8 bits (x 255/65535)"
    assert any(note in n for n in src.notes)
    got = np.sort(np.concatenate([src.raw(s)[0].ravel() for s in ("train", "val", "test")]))
    np.testing.assert_array_equal(
        got, np.sort(np.round(x16.ravel().astype(np.float64) * 255 / 65535))
    )
    root = tmp_path / "f16"
    for i in range(4):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x16[i]).save(root / f"c{i % 2}" / f"{i}.png")
    fsrc = get_source(f"folder:{root}")
    assert any(note in n for n in fsrc.notes)
    got = np.sort(np.concatenate([fsrc.raw(s)[0].ravel() for s in ("train", "val", "test")]))
    np.testing.assert_array_equal(
        got, np.sort(np.round(x16.ravel().astype(np.float64) * 255 / 65535))
    )


def test_train_and_test_folders_are_read_as_the_split_layout_and_said_so(tmp_path):
    rng = np.random.default_rng(10)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / "d" / split / c / f"{i}.png", rng)
    src = get_source(f"folder:{tmp_path / 'd'}")
    assert src.class_names == ("a", "b") and src.split_sizes["test"] == 4
    assert any("read as the train/test split layout" in n for n in src.notes)
