"""FourierFT: ΔW against numpy's ifft2, shared entries, the band-pass sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import vit
from guft_jax.methods import fourierft as ff
from guft_jax.methods import get_method
from guft_jax.methods import weight_space as ws


@pytest.mark.parametrize("shape", [(16, 16), (12, 20), (24, 8)])
def test_delta_w_equals_numpy_reference(shape):
    n, alpha = 30, 7.5
    entries = ff.spectral_entries(shape, n, seed=3)
    coef = np.random.default_rng(0).normal(size=n).astype(np.float32)
    dense = np.zeros(shape, np.complex128)
    dense[entries[0], entries[1]] = coef
    ref = alpha * np.real(np.fft.ifft2(dense))
    out = ff.delta_w(jnp.asarray(coef), jnp.asarray(entries), shape, alpha)
    assert out.dtype == jnp.float32 and out.shape == shape
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_delta_w_is_float32_whatever_the_coefficient_dtype():
    e = ff.spectral_entries((8, 8), 5, seed=0)
    out = ff.delta_w(jnp.ones(5, jnp.bfloat16), jnp.asarray(e), (8, 8), 2.0)
    assert out.dtype == jnp.float32


def test_entries_shared_by_same_shape_layers_and_reproducible():
    model = vit.build_model("ViT-tiny/4", num_classes=3, mlp_dim=32)
    params = vit.init_params(model, jax.random.key(0), 16)
    m = get_method("fourierft", n=20, targets=(r"(query|value|Dense_0|Dense_1)/kernel$",))
    from guft_jax.artifacts import arrays_of

    tr = m.init(jax.random.key(0), params)
    arrays = arrays_of(m, params, tr)
    shapes = sorted(k for k in arrays if k.startswith("fourierft_entries/"))
    # (32,32) for q/v and Dense_0/Dense_1 are also square 32x32 here: one entry set per shape
    assert shapes == ["fourierft_entries/32x32"]
    a = ff.spectral_entries((32, 32), 20, seed=2024)
    b = ff.spectral_entries((32, 32), 20, seed=2024)
    c = ff.spectral_entries((32, 32), 20, seed=2025)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(x) for x in a.T}) == 20  # without replacement
    # every same-shape layer uses those entries: ΔW of layer l is built from them
    for k, coef in tr["fourierft"].items():
        d_in, d_out = ws.matrix(params, ws.path_of(k)).shape
        ref = ff.delta_w(coef, jnp.asarray(a), (d_out, d_in), m.hparams["alpha"])
        merged = m.merge(params, tr)
        w0 = ws.matrix(params, ws.path_of(k))
        np.testing.assert_allclose(ws.matrix(merged, ws.path_of(k)) - w0, ref.T, atol=1e-5)


def test_frequency_bias_sampler_follows_the_band_pass_formula():
    shape, n, fc, bw = (64, 64), 300, 12.0, 20.0
    p = ff.bandpass_probs(shape, fc=fc, bandwidth=bw)
    # the formula, evaluated independently on the centred grid
    u, v = np.meshgrid(np.arange(64) - 32, np.arange(64) - 32, indexing="ij")
    d = np.hypot(u, v)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.exp(-(((d**2 - fc**2) / (d * bw)) ** 2))
    q[d == 0] = 0
    np.testing.assert_allclose(np.fft.fftshift(p), q / q.sum(), rtol=1e-12)
    # empirical radial distribution over 20 seeds vs the expected one (chi-square, fixed seeds)
    radius = np.fft.ifftshift(d)
    edges = np.array([0, 6, 9, 12, 15, 18, 24, 100])
    expected = np.histogram(radius.ravel(), edges, weights=p.ravel())[0]
    counts = np.zeros(len(edges) - 1)
    for s in range(20):
        e = ff.spectral_entries(shape, n, seed=s, frequency_bias=True, fc=fc, bandwidth=bw)
        counts += np.histogram(radius[e[0], e[1]], edges)[0]
    exp_counts = expected * counts.sum()
    keep = exp_counts > 5
    chi2 = np.sum((counts[keep] - exp_counts[keep]) ** 2 / exp_counts[keep])
    assert chi2 < 22.5  # 99.9% quantile of chi-square with <= 6 dof
    # and it is not uniform: the band around fc is strongly over-represented
    uniform = np.histogram(radius.ravel(), edges)[0] / radius.size
    assert counts[3] / counts.sum() > 2 * uniform[3]


def test_bad_n_is_a_clear_error():
    with pytest.raises(ValueError, match="fourierft.n"):
        ff.spectral_entries((4, 4), 17, seed=0)
    with pytest.raises(ValueError, match=r"fourierft.init.*'normal', 'paper', 'zeros'"):
        get_method("fourierft", init="uniform")


def test_paper_init_is_the_default_normal_draw_and_zeros_is_zero(tiny):
    """``init="paper"`` reaches the paper's N(0, 1) coefficients (the current default's draw,
    bit for bit, α = 300 kept); ``init="zeros"`` gives ΔW = 0."""
    _, params = tiny
    default = get_method("fourierft", n=20)
    paper = get_method("fourierft", n=20, init="paper")
    zeros = get_method("fourierft", n=20, init="zeros")
    assert default.hparams["init"] == "normal" and paper.hparams["init"] == "paper"
    assert paper.hparams["alpha"] == default.hparams["alpha"] == 300.0
    a = default.init(jax.random.key(3), params)["fourierft"]
    b = paper.init(jax.random.key(3), params)["fourierft"]
    z = zeros.init(jax.random.key(3), params)["fourierft"]
    assert sorted(a) == sorted(b) == sorted(z) and len(a) == 2 * 2  # q and v of 2 blocks
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.any(np.asarray(z[k]))
    c = np.concatenate([np.asarray(v) for v in b.values()])
    assert abs(c.mean()) < 0.5 and 0.6 < c.std() < 1.4  # N(0, 1): 80 draws
