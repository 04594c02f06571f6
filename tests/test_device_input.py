"""device_input gives the same batches as the host pipeline (ArraySource.batches): same order,
values within 1e-5, for shuffle on/off, drop_remainder on/off, both normalisations, both resize
methods, grey images and mixed native sizes."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import device_input
from guft_jax.data import ArraySource, resize_matrix


def _source(images, labels, resize_method="bilinear"):
    splits = {s: (images, labels) for s in ("train800", "val200", "test")}
    return ArraySource("toy", 10, splits, resize_method=resize_method)


def _assert_same_batches(src, data, **kw):
    host = list(src.batches("train800", **kw))
    dev = list(device_input.device_batches(data, **kw))
    assert len(dev) == len(host)
    for (xh, yh), (xd, yd) in zip(host, dev, strict=True):
        assert isinstance(xd, jax.Array) and xd.dtype == jnp.float32
        assert xd.shape == xh.shape
        np.testing.assert_array_equal(np.asarray(yd), yh)
        np.testing.assert_allclose(np.asarray(xd), xh, rtol=0, atol=1e-5)
    return host


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_remainder", [False, True])
@pytest.mark.parametrize("normalization", ["imagenet", "0.5"])
def test_same_batches_as_host_pipeline(shuffle, drop_remainder, normalization):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 20, 28, 3), dtype=np.uint8)  # non-square, upsized
    labels = rng.integers(0, 10, size=23)
    src = _source(images, labels)
    data = device_input.put_split(images, labels)
    kw = dict(batch_size=5, image_size=24, normalization=normalization, shuffle=shuffle,
              seed=3, epoch=2, drop_remainder=drop_remainder)  # fmt: skip
    host = _assert_same_batches(src, data, **kw)
    assert len(host) == (4 if drop_remainder else 5)


@pytest.mark.parametrize("resize_method", ["bilinear", "bicubic"])
def test_mixed_sizes_grey_and_rgba(resize_method):
    rng = np.random.default_rng(1)
    shapes = [
        (17, 30, 3),
        (9, 9, 1),
        (40, 21, 3),
        (16, 16, 4),
        (33, 12, 1),
        (16, 16, 3),
        (50, 7, 3),
    ]
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in shapes]
    labels = np.arange(len(images))
    src = _source(images, labels, resize_method)
    data = device_input.put_split(images, labels, resize_method=resize_method)
    assert data.sizes is not None and data.images.shape == (7, 50, 30, 3)
    _assert_same_batches(src, data, batch_size=3, image_size=16, shuffle=True, seed=5, epoch=1)


def test_grey_array_same_size_as_output_and_start_step():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(10, 12, 12, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=10)
    src = _source(images, labels)
    data = device_input.from_source(src, "train800")
    assert data.images.dtype == jnp.uint8 and data.images.shape == (10, 12, 12, 1)
    _assert_same_batches(src, data, batch_size=4, image_size=12, shuffle=True, start_step=1)


def test_dynamic_matrices_equal_host_matrices():
    build = jax.jit(device_input._dynamic_resize_matrices, static_argnums=(1, 2, 3))
    for method in ("bilinear", "bicubic"):
        for n_in, out in [(7, 16), (16, 7), (500, 224), (13, 13)]:
            m = build(jnp.asarray([n_in]), out, n_in + 5, method)
            host = resize_matrix(n_in, out, method)
            # bilinear: float32 rounding of the fraction; bicubic: its cubic evaluated in float32
            np.testing.assert_allclose(m[0, :, :n_in], host, rtol=0, atol=1e-6)
            assert np.all(np.asarray(m[0, :, n_in:]) == 0)


def test_preprocess_is_jittable_and_bad_args_raise():
    x = jnp.zeros((2, 8, 8, 3), jnp.uint8)
    f = jax.jit(lambda x: device_input.preprocess_on_device(x, image_size=4, dtype=jnp.bfloat16))
    assert f(x).shape == (2, 4, 4, 3) and f(x).dtype == jnp.bfloat16
    data = device_input.put_split(np.zeros((3, 8, 8, 3), np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match="start_step"):
        next(device_input.device_batches(data, batch_size=2, image_size=4, start_step=3))
    with pytest.raises(ValueError, match="normalization"):
        next(device_input.device_batches(data, batch_size=2, image_size=4, normalization="nope"))
    with pytest.raises(ValueError, match="uint8"):
        device_input.put_split(np.zeros((3, 8, 8, 3), np.float32), [0, 1, 2])
    with pytest.raises(ValueError, match="max_bytes"):
        device_input.put_split(np.zeros((3, 8, 8, 3), np.uint8), [0, 1, 2], max_bytes=10)


def test_fit_with_device_input_trains_like_the_host_pipeline(tiny):
    """fit(input="device") = fit(input="host"): same batches, so the same losses, weights and
    test accuracy up to the resize's float rounding (images 20 px resized to 16 inside jit)."""
    from conftest import make_source

    from guft_jax import train
    from guft_jax.methods import get_method

    model, params = tiny
    src = make_source(size=20)
    logs = []
    runs = {
        kind: train.fit(
            model,
            params,
            get_method("lora", rank=2, alpha=4.0),
            src,
            mc.tiny_config(epochs=2, precision="fp32", input=kind, head_lr=None),
            hooks=logs.append,
        )
        for kind in ("host", "device")
    }
    h, d = runs["host"], runs["device"]
    assert d.results["input"] == "device" and h.results["input"] == "host"
    assert any("held on the device as uint8" in line for line in logs)
    lh = [r["train_loss"] for r in h.results["history"]]
    ld = [r["train_loss"] for r in d.results["history"]]
    np.testing.assert_allclose(ld, lh, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(h.state.trainable), jax.tree.leaves(d.state.trainable),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert d.results["test_examples"] == h.results["test_examples"] == 32
    assert d.results["test_accuracy"] == h.results["test_accuracy"]


def test_input_option_is_checked():
    from conftest import make_source

    from guft_jax import train

    src = make_source()
    assert train.resolve_input("auto", src, backend="gpu") == "device"
    assert train.resolve_input("auto", src, backend="cpu") == "host"
    with pytest.raises(ValueError, match="input: must be one of auto, host, device"):
        train.resolve_input("gpu", src)

    class NoRaw:
        pass

    with pytest.raises(ValueError, match="input: 'device' needs"):
        train.resolve_input("device", NoRaw())
