"""Input that stays on the accelerator: a whole small split as uint8, resized inside jit.

A VTAB-1K training split is 1,000 images (1,000 × 224² × 3 uint8 ≈ 150 MB), so it fits on any
accelerator. :func:`put_split` copies it there once (one ``jax.device_put``);
:func:`device_batches` then yields device-resident batches by gathering the epoch's permutation
and resizing and normalising inside one jitted function (:func:`preprocess_on_device`: the host
pipeline's separable resize matrices as two matmuls, then ``(x / 255 - mean) / std``). Nothing
crosses the host boundary per step except a scalar, so the input never starves the device.

The batches equal :meth:`guft_jax.data.ArraySource.batches`' for the same arguments (same
permutation for ``(seed, epoch)``, same resampling, values within float rounding).
``TfdsSource`` shuffles with tf.data's buffer, whose order is not reproduced here: for it the
preprocessing is the same but the order is ArraySource's.

>>> import numpy as np
>>> data = put_split(np.zeros((5, 8, 8, 3), np.uint8), np.arange(5))
>>> x, y = next(device_batches(data, batch_size=2, image_size=4, normalization="0.5"))
>>> x.shape, y.tolist()
((2, 4, 4, 3), [0, 1])
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from guft_jax.data import pipeline

Array = jax.Array


@struct.dataclass
class DeviceSplit:
    """One split held on the device.

    Attributes:
      images: ``(N, H, W, C)`` uint8, C in {1, 3, 4}. When the native sizes differ the images
        are RGB, zero-padded at the bottom/right to the largest ``(H, W)``.
      labels: ``(N,)`` int32.
      sizes: ``(N, 2)`` int32 native ``(h, w)`` when sizes differ, else ``None``.
      resize_method: "bilinear" or "bicubic" (static).
    """

    images: Array
    labels: Array
    sizes: Array | None = None
    resize_method: str = struct.field(pytree_node=False, default="bilinear")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        """Device bytes held (images, labels, sizes)."""
        leaves = (self.images, self.labels, self.sizes)
        return int(sum(a.size * a.dtype.itemsize for a in leaves if a is not None))


def put_split(
    images: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[int],
    *,
    resize_method: str = "bilinear",
    device: jax.Device | jax.sharding.Sharding | None = None,
    max_bytes: int = 4 << 30,
) -> DeviceSplit:
    """Copies a split's native uint8 images and labels to the device in one ``device_put``.

    Args:
      images: a ``(N, H, W[, C])`` uint8 array, or a list of ``(H, W[, C])`` uint8 arrays of
        varying size (these are made RGB and zero-padded to the largest size, their sizes kept).
      labels: ``(N,)`` integer labels.
      resize_method: "bilinear" or "bicubic", as the source's.
      device: a device or sharding for ``jax.device_put`` (default: the default device).
      max_bytes: refuse splits larger than this on the device (padding included).

    Returns:
      A :class:`DeviceSplit`.

    Raises:
      ValueError: wrong dtype/shape, mismatched lengths, an unknown ``resize_method``, or more
        than ``max_bytes``.
    """
    pipeline.check_choice("resize_method", resize_method, pipeline.RESIZE_METHODS)
    labels = np.asarray(labels, np.int32)
    sizes = None
    if isinstance(images, np.ndarray):
        arr = images[..., None] if images.ndim == 3 else images
        _check_uint8(arr)
    else:
        ims = [np.asarray(im) for im in images]
        for im in ims:
            _check_uint8(im[None] if im.ndim == 3 else im[None, ..., None])
        ims = [pipeline.to_rgb(im[..., None] if im.ndim == 2 else im) for im in ims]
        hw = np.asarray([im.shape[:2] for im in ims], np.int32).reshape(-1, 2)
        if len(ims) and (hw == hw[0]).all():
            arr = np.stack(ims)
        else:
            h, w = hw.max(0) if len(ims) else (1, 1)
            arr = np.zeros((len(ims), h, w, 3), np.uint8)
            for i, im in enumerate(ims):
                arr[i, : im.shape[0], : im.shape[1]] = im
            sizes = hw
    if arr.shape[0] != labels.shape[0]:
        raise ValueError(f"{arr.shape[0]} images but {labels.shape[0]} labels")
    nbytes = arr.nbytes + labels.nbytes + (0 if sizes is None else sizes.nbytes)
    if nbytes > max_bytes:
        raise ValueError(
            f"split of {arr.shape} uint8 is {nbytes / 2**20:.0f} MiB on the device, more than "
            f"max_bytes={max_bytes / 2**20:.0f} MiB; use the host pipeline (source.batches)"
        )
    arrays = jax.device_put((arr, labels, sizes), device)
    return DeviceSplit(*arrays, resize_method=resize_method)


def from_source(source, split: str, **kw) -> DeviceSplit:
    """:func:`put_split` of ``source.raw(split)`` (an ArraySource, or a TfdsSource's dataset).

    Args:
      source: a data source with ``raw(split)`` and ``resize_method``.
      split: one of :data:`guft_jax.data.SPLITS`.
      **kw: ``device``, ``max_bytes`` of :func:`put_split`.

    Returns:
      A :class:`DeviceSplit`.
    """
    raw = source.raw(split)
    if hasattr(raw, "as_numpy_iterator"):  # tf.data: materialise the (small) split
        pairs = list(raw.as_numpy_iterator())
        images, labels = [p[0] for p in pairs], np.asarray([p[1] for p in pairs], np.int32)
    else:
        images, labels = raw
    return put_split(images, labels, resize_method=source.resize_method, **kw)


def _check_uint8(arr: np.ndarray) -> None:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images must be uint8 (N, H, W[, C]) with C in 1, 3, 4; got {arr.dtype} {arr.shape}"
        )


def _rgb(x: Array) -> Array:
    c = x.shape[-1]
    if c == 1:
        return jnp.broadcast_to(x, x.shape[:-1] + (3,))
    if c == 4:
        return x[..., :3]
    return x


_HI = jax.lax.Precision.HIGHEST  # the host resizes in float32; no TF32/bf16 passes on GPU


def _cubic(t: Array, a: float = -0.75) -> Array:
    """Keys' cubic convolution kernel at distance ``t`` (PyTorch's a = -0.75)."""
    t = jnp.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return jnp.where(t <= 1, near, jnp.where(t < 2, far, 0.0))


def _dynamic_resize_matrices(n_in: Array, out_size: int, pad_size: int, method: str) -> Array:
    """``(B, out_size, pad_size)`` resize matrices for per-example input lengths ``n_in``.

    The same matrices as :func:`guft_jax.data.resize_matrix` (columns beyond ``n_in`` zero). The
    half-pixel source coordinate ``((2o + 1) n_in - out) / (2 out)`` is split into its integer
    floor and fraction in integer arithmetic, so the weights match the host's float64 ones to
    float32 rounding.
    """
    n = n_in.astype(jnp.int32)[:, None]  # (B, 1)
    o = jnp.arange(out_size, dtype=jnp.int32)[None, :]  # (1, S)
    num, den = (2 * o + 1) * n - out_size, 2 * out_size
    cols = jnp.arange(pad_size, dtype=jnp.int32)
    if method == "bilinear":
        num = jnp.maximum(num, 0)  # src clamped at 0
        lo = num // den
        frac = (num - lo * den).astype(jnp.float32) / den
        taps = [(jnp.minimum(lo, n - 1), 1.0 - frac), (jnp.minimum(lo + 1, n - 1), frac)]
    else:  # bicubic: 4 taps at floor - 1 .. floor + 2, clamped to the border
        lo = num // den  # floor division also for negative sources
        frac = (num - lo * den).astype(jnp.float32) / den
        taps = [
            (jnp.clip(lo - 1 + k, 0, n - 1), _cubic(frac - (k - 1)).astype(jnp.float32))
            for k in range(4)
        ]
    m = jnp.zeros(n_in.shape + (out_size, pad_size), jnp.float32)
    for idx, wt in taps:
        m = m + jnp.where(idx[..., None] == cols, wt[..., None], 0.0)
    return m


def preprocess_on_device(
    images_u8: Array,
    *,
    image_size: int,
    normalization: str = "imagenet",
    resize_method: str = "bilinear",
    sizes: Array | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Array:
    """uint8 images -> model input inside jit: grey/RGBA -> RGB, resize, normalise.

    The device twin of :func:`guft_jax.data.preprocess` (the VTAB-1K protocol: resize straight to
    ``image_size``, no crop or augmentation; "imagenet" or "0.5" normalisation): the separable
    resize matrices of :func:`guft_jax.data.resize_matrix` applied as two float32 matmuls (rows
    first, as the host does), then ``(x / 255 - mean) / std``.

    Args:
      images_u8: ``(B, H, W, C)`` uint8, C in {1, 3, 4}.
      image_size: output side ``S`` (static).
      normalization: "imagenet" or "0.5" (static).
      resize_method: "bilinear" or "bicubic" (static).
      sizes: optional ``(B, 2)`` int32 native ``(h, w)`` of zero-padded images (mixed sizes);
        the resize matrices are then built per example inside jit.
      dtype: output dtype (the normalisation is computed in float32).

    Returns:
      ``(B, S, S, 3)`` in ``dtype``.

    Raises:
      ValueError: an unknown ``normalization`` or ``resize_method``.

    >>> img = jnp.full((1, 2, 2, 1), 255, jnp.uint8)
    >>> x = preprocess_on_device(img, image_size=2, normalization="0.5")
    >>> x.shape, float(x.min())
    ((1, 2, 2, 3), 1.0)
    """
    mean, std = pipeline.normalization_stats(normalization)
    pipeline.check_choice("resize_method", resize_method, pipeline.RESIZE_METHODS)
    x = _rgb(images_u8).astype(jnp.float32)
    _, h, w, _ = x.shape
    s = int(image_size)
    if sizes is not None:
        rh = _dynamic_resize_matrices(sizes[:, 0], s, h, resize_method)
        rw = _dynamic_resize_matrices(sizes[:, 1], s, w, resize_method)
        x = jnp.einsum("bsh,bhwc->bswc", rh, x, precision=_HI)
        x = jnp.einsum("bswc,btw->bstc", x, rw, precision=_HI)
    elif (h, w) != (s, s):
        rh = jnp.asarray(pipeline.resize_matrix(h, s, resize_method))
        rw = jnp.asarray(pipeline.resize_matrix(w, s, resize_method))
        x = jnp.einsum("sh,bhwc->bswc", rh, x, precision=_HI)
        x = jnp.einsum("bswc,tw->bstc", x, rw, precision=_HI)
    x = x / jnp.float32(255.0)
    return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


@functools.partial(
    jax.jit,
    static_argnames=("batch_size", "image_size", "normalization", "dtype"),
)
def _gather_batch(data, order, start, *, batch_size, image_size, normalization, dtype):
    idx = jax.lax.dynamic_slice_in_dim(order, start, batch_size)
    sizes = None if data.sizes is None else jnp.take(data.sizes, idx, axis=0)
    x = preprocess_on_device(
        jnp.take(data.images, idx, axis=0),
        image_size=image_size,
        normalization=normalization,
        resize_method=data.resize_method,
        sizes=sizes,
        dtype=dtype,
    )
    return x, jnp.take(data.labels, idx, axis=0)


def device_batches(
    data: DeviceSplit,
    *,
    batch_size: int,
    image_size: int,
    normalization: str = "imagenet",
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
    start_step: int = 0,
    dtype: jnp.dtype = jnp.float32,
) -> Iterator[tuple[Array, Array]]:
    """One epoch of device-resident ``(images (B, S, S, 3), labels int32 (B,))`` batches.

    Same arguments and the same batches as ``ArraySource.batches`` (its permutation for
    ``(seed, epoch)``, :func:`guft_jax.data.pipeline.epoch_order`). The permutation goes to the
    device once per epoch; each step is one jitted gather + preprocess, dispatched
    asynchronously (at most two compilations: full batches and the last partial one).

    Args:
      data: a :class:`DeviceSplit`.
      batch_size: examples per batch.
      image_size: output side.
      normalization: "imagenet" or "0.5".
      shuffle: permute the examples by ``(seed, epoch)``.
      seed: shuffle seed.
      epoch: epoch index of the permutation.
      drop_remainder: drop a last, smaller batch.
      start_step: skip that many batches (mid-epoch resume).
      dtype: image dtype.

    Yields:
      ``(images, labels)`` device arrays.

    Raises:
      ValueError: bad sizes, ``start_step`` out of range, unknown ``normalization``.
    """
    n = len(data)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    nb = pipeline.num_batches(n, int(batch_size), drop_remainder)
    if not 0 <= int(start_step) <= nb:
        raise ValueError(f"start_step must be in [0, {nb}], got {start_step}")
    pipeline.normalization_stats(normalization)
    order = pipeline.epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch).astype(np.int32)
    return _iterate(data, jnp.asarray(order), nb, int(batch_size), int(image_size), normalization,
                    int(start_step), dtype)  # fmt: skip


def _iterate(data, order, nb, batch_size, image_size, normalization, start_step, dtype):
    n = len(data)
    for step in range(start_step, nb):
        start = step * batch_size
        yield _gather_batch(
            data,
            order,
            np.int32(start),  # a numpy scalar rides jit's C++ dispatch; jnp.int32 is an eager op
            batch_size=min(batch_size, n - start),
            image_size=image_size,
            normalization=normalization,
            dtype=dtype,
        )


__all__ = ["DeviceSplit", "device_batches", "from_source", "preprocess_on_device", "put_split"]
