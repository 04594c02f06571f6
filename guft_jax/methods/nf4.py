"""4-bit NormalFloat (NF4) block-wise quantisation with double quantisation (QLoRA).

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314, §3.

NF4 code values (the paper's asymmetric quantile construction, as bitsandbytes builds it): with
``Φ⁻¹`` the standard normal quantile function and the outermost probability

    δ = ½·((1 − 1/(2·15)) + (1 − 1/(2·16))) = 0.96770833…

(the mean of the outermost midpoint-rule quantile levels for 15 and 16 points, which keeps Φ⁻¹
finite), the positive half takes ``2^(k-1) + 1 = 9`` levels and the negative half ``2^(k-1) = 8``
levels, each evenly spaced from δ down to ½ and each including the zero at ½; one of the two zeros
is dropped:

    q⁺_j = Φ⁻¹(δ − j·(δ − ½)/8),  j = 0..7        (8 positive values)
    q⁻_j = −Φ⁻¹(δ − j·(δ − ½)/7), j = 0..6        (7 negative values)
    NF4 = sort({q⁻} ∪ {0} ∪ {q⁺}) / max(q⁺)       (16 values in [−1, 1], exact 0, exact ±1)

A tensor is quantised in blocks of ``block_size`` (64) consecutive entries of its row-major
flattening: each block is divided by its absmax and every entry becomes the index (0..15) of the
nearest NF4 value; two indices are packed per ``uint8`` (the first in the high nibble). Double
quantisation: the fp32 absmax constants ``c`` (one per block) are centred by their mean ``μ`` and
quantised again in blocks of ``absmax_block_size`` (256) with bitsandbytes' signed 8-bit dynamic
(tree) map (``dynamic_map``): ``c ≈ μ + s_b·D[code]`` with one fp32 ``s_b`` per 256 constants.

Storage per tensor of ``n`` entries: ``n/2`` bytes of codes, ``⌈n/64⌉`` bytes of absmax codes,
``4·⌈n/(64·256)⌉`` bytes of second-level scales and 4 bytes of ``μ``: ~4.127 bits per entry,
0.129× of fp32.

The packed codes keep the tensor's shape except the last axis, which is halved (it must be even),
so a quantised tensor is self-describing: no static metadata travels beside the arrays.

>>> w = jax.random.normal(jax.random.key(0), (64, 32))
>>> q = quantize(w)
>>> q["codes"].shape, q["codes"].dtype
((64, 16), dtype('uint8'))
>>> float(jnp.abs(dequantize(q) - w).max()) < 0.5
True
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256
NF4_OFFSET = 0.5 * ((1.0 - 1.0 / (2 * 15)) + (1.0 - 1.0 / (2 * 16)))
FIELDS = ("codes", "absmax", "absmax_scale", "absmax_mean")


@functools.cache
def nf4_values() -> np.ndarray:
    """The 16 NF4 code values (float32, ascending), by the construction in the module docstring."""
    pos = ndtri(np.linspace(NF4_OFFSET, 0.5, 9)[:-1])
    neg = -ndtri(np.linspace(NF4_OFFSET, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([neg, [0.0], pos]))
    return (v / v.max()).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic (tree) quantisation map, 256 ascending float32 values.

    Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", arXiv:1511.04561: for
    exponents ``e = 0..6`` the values ``±10^(e−6)·m`` with ``m`` the ``2^e`` midpoints of
    ``linspace(0.1, 1, 2^e + 1)``, plus 0 and 1 (127 positive, 127 negative, 0, 1).
    """
    vals = [0.0, 1.0]
    for e in range(7):
        b = np.linspace(0.1, 1.0, 2**e + 1)
        means = (b[:-1] + b[1:]) / 2.0
        vals += list(10.0 ** (e - 6) * means) + list(-(10.0 ** (e - 6)) * means)
    assert len(vals) == 256
    return np.sort(np.asarray(vals, np.float32))


def _nearest(table: np.ndarray, x: jax.Array) -> jax.Array:
    """Index of the nearest ``table`` value (ascending table) for every entry of ``x``."""
    t = table.astype(np.float64)
    mid = jnp.asarray(((t[1:] + t[:-1]) / 2).astype(np.float32))
    return jnp.searchsorted(mid, x, side="left").astype(jnp.uint8)


def _blocks(flat: jax.Array, block: int) -> jax.Array:
    nb = -(-flat.shape[0] // block)
    return jnp.pad(flat, (0, nb * block - flat.shape[0])).reshape(nb, block)


def _safe(scale: jax.Array) -> jax.Array:
    return jnp.where(scale == 0, jnp.ones_like(scale), scale)


@functools.partial(jax.jit, static_argnames=("block_size", "absmax_block_size"))
def quantize(
    w: jax.Array, *, block_size: int = BLOCK_SIZE, absmax_block_size: int = ABSMAX_BLOCK_SIZE
) -> dict[str, jax.Array]:
    """NF4 codes of ``w`` with double-quantised absmax constants (module docstring).

    Args:
      w: a float array whose last axis has even length.
      block_size: entries per absmax block (64 in QLoRA).
      absmax_block_size: absmax constants per second-level block (256 in QLoRA).

    Returns:
      A dict: ``codes`` (uint8, ``w.shape[:-1] + (w.shape[-1] // 2,)``), ``absmax`` (uint8, one
      per block), ``absmax_scale`` (float32, one per second-level block) and ``absmax_mean``
      (float32 scalar).

    Raises:
      ValueError: the last axis has odd length (two codes are packed per byte along it).
    """
    if w.ndim == 0 or w.shape[-1] % 2:
        raise ValueError(f"nf4: the last axis must have even length, got shape {w.shape}")
    flat = w.reshape(-1).astype(jnp.float32)
    blocks = _blocks(flat, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    codes = _nearest(nf4_values(), blocks / _safe(absmax)[:, None]).reshape(-1)[: flat.shape[0]]
    pairs = codes.reshape(-1, 2)
    packed = ((pairs[:, 0] << 4) | pairs[:, 1]).astype(jnp.uint8)
    mean = jnp.mean(absmax)
    centred = _blocks(absmax - mean, absmax_block_size)
    scale = jnp.max(jnp.abs(centred), axis=1)
    acodes = _nearest(dynamic_map(), centred / _safe(scale)[:, None]).reshape(-1)
    return {
        "codes": packed.reshape(w.shape[:-1] + (w.shape[-1] // 2,)),
        "absmax": acodes[: absmax.shape[0]],
        "absmax_scale": scale,
        "absmax_mean": mean,
    }


def dequantize(
    q: dict[str, jax.Array],
    *,
    block_size: int = BLOCK_SIZE,
    absmax_block_size: int = ABSMAX_BLOCK_SIZE,
    dtype=jnp.float32,
) -> jax.Array:
    """The float tensor that :func:`quantize`'s output stands for (traceable; fuses under jit).

    Raises:
      ValueError: the arrays' shapes do not fit together for these block sizes.
    """
    packed = q["codes"]
    shape = packed.shape[:-1] + (2 * packed.shape[-1],)
    n = math.prod(shape)
    nb = -(-n // block_size)
    ns = -(-nb // absmax_block_size)
    if q["absmax"].shape != (nb,) or q["absmax_scale"].shape != (ns,):
        raise ValueError(
            f"nf4: codes {packed.shape} need absmax ({nb},) and absmax_scale ({ns},) for block "
            f"sizes {block_size}/{absmax_block_size}, got {q['absmax'].shape} and "
            f"{q['absmax_scale'].shape}"
        )
    dmap = jnp.asarray(dynamic_map())
    scale = jnp.repeat(q["absmax_scale"], absmax_block_size)[:nb]
    absmax = dmap[q["absmax"]] * scale + q["absmax_mean"]
    flat = packed.reshape(-1)
    codes = jnp.stack([flat >> 4, flat & 15], axis=-1).reshape(-1)
    vals = jnp.asarray(nf4_values())[codes]
    vals = _blocks(vals, block_size) * absmax[:, None]
    return vals.reshape(-1)[:n].reshape(shape).astype(dtype)


def nbytes(q: dict) -> int:
    """Bytes held by a quantised tensor (works on arrays and ``jax.ShapeDtypeStruct``)."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in q.values()))
