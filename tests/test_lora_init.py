"""PiSSA / OLoRA initialisations of LoRA and DoRA: the removed principal part against numpy's SVD
and QR, the residual base, identity at init, merge == apply, gradients, counts, artifacts and
one trace through the engine."""

import jax
import method_checks as mc
import numpy as np
import pytest

from guft_jax import paths
from guft_jax.methods import get_method
from guft_jax.methods import lora as lo
from guft_jax.methods.base import prepare_base

Q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
# alpha != rank so that a missing or doubled scale α/r cannot pass.
KW = dict(rank=2, alpha=6.0)
SCALE = KW["alpha"] / KW["rank"]
CASES = [("lora", "pissa"), ("lora", "olora"), ("dora", "pissa"), ("dora", "olora")]


def _w0(params, path=Q) -> np.ndarray:
    return np.asarray(lo.ws.matrix(params, path), np.float64)


def _numpy_pissa(w: np.ndarray, r: int, s: float):
    """PEFT's pissa_init in numpy: SVD of the (out, in) weight, √(S_r/s) on both sides."""
    v, sv, uh = np.linalg.svd(w.T, full_matrices=False)
    root = np.sqrt(sv[:r] / s)
    return root[:, None] * uh[:r], v[:, :r] * root[None, :]


def _numpy_olora(w: np.ndarray, r: int):
    q, rr = np.linalg.qr(w.T)
    return rr[:r], q[:, :r]


def _sign_aligned(got, want, axis):
    """``got`` with each rank-1 component's sign matched to ``want`` (SVD/QR factors are unique
    only up to a sign per component)."""
    dot = np.sum(got * want, axis=axis, keepdims=True)
    return got * np.where(dot < 0, -1.0, 1.0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_part_matches_numpy(tiny, init):
    _, params = tiny
    m = get_method("lora", init=init, **KW)
    base = prepare_base(m, params)
    w0 = _w0(params)
    r = KW["rank"]
    a, b = _numpy_pissa(w0, r, SCALE) if init == "pissa" else _numpy_olora(w0, r)
    f = {k: np.asarray(v, np.float64) for k, v in base[lo.INIT_KEY][lo.ws.key(Q)].items()}
    assert f["A"].shape == (r, w0.shape[0]) and f["B"].shape == (w0.shape[1], r)
    # the removed part s·(B A)ᵀ is sign-free: compare it directly ...
    removed = SCALE * (b @ a).T
    np.testing.assert_allclose(SCALE * (f["B"] @ f["A"]).T, removed, atol=2e-5)
    # ... and the factors up to one sign per component
    np.testing.assert_allclose(_sign_aligned(f["A"], a, axis=1), a, atol=2e-5)
    np.testing.assert_allclose(_sign_aligned(f["B"], b, axis=0), b, atol=2e-5)
    # the residual base is W0 minus that part; non-target kernels are untouched (bitwise)
    np.testing.assert_allclose(_w0(base), w0 - removed, atol=2e-5)
    other = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"
    np.testing.assert_array_equal(paths.get(base, other), paths.get(params, other))
    if init == "pissa":  # the top-r SVD part: the residual's top singular value is σ_{r+1}
        sv = np.linalg.svd(w0, compute_uv=False)
        np.testing.assert_allclose(np.linalg.svd(_w0(base), compute_uv=False)[0], sv[r], rtol=1e-4)
    # prepare_base is idempotent, and init reads the factors from the prepared base
    assert prepare_base(m, base) is base
    tr = m.init(jax.random.key(0), base)
    np.testing.assert_array_equal(tr["lora"][lo.ws.key(Q)]["A"], f["A"].astype(np.float32))


@pytest.mark.parametrize("name,init", CASES)
def test_identity_merge_and_gradients(tiny, name, init):
    model, params = tiny
    m = get_method(name, init=init, **KW)
    mc.identity_at_init(model, params, m)
    mc.merge_equals_apply(model, params, m)
    mc.gradients_reach_every_trained_leaf(model, params, m)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_onto_unprepared_base_equals_prepared(tiny, init):
    _, params = tiny
    m = get_method("dora", init=init, **KW)
    base = prepare_base(m, params)
    tr = mc.perturb(m.init(jax.random.key(0), base))
    a, b = m.merge(base, tr), m.merge(params, tr)
    assert lo.INIT_KEY not in a and jax.tree.structure(a) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_dora_magnitude_starts_at_w0_norms(tiny):
    _, params = tiny
    m = get_method("dora", init="pissa", **KW)
    tr = m.init(jax.random.key(0), prepare_base(m, params))
    np.testing.assert_allclose(
        tr["dora"][lo.ws.key(Q)]["m"], np.linalg.norm(_w0(params), axis=0), rtol=1e-5
    )


def test_artifact_round_trip(tiny, tmp_path):
    _, params = tiny
    mc.artifact_round_trip(params, get_method("lora", init="pissa", **KW), tmp_path)


def test_trains_in_one_trace(tiny, source):
    model, params = tiny
    mc.trains_in_one_trace(model, params, get_method("lora", init="olora", **KW), source)


def test_vit_b16_counts_equal_lora():
    # PEFT (LoraConfig(r=8, target_modules=["query", "value"], init_lora_weights="pissa" or
    # "olora")) on ViT-B/16 trains r·(768 + 768) per adapted Linear, 24 of them: 294,912, the
    # same as plain LoRA (the inits change values, not shapes).
    want = 24 * 8 * (768 + 768)
    assert want == 294_912
    for init in ("pissa", "olora"):
        assert mc.vit_b16_count("lora", rank=8, alpha=16.0, init=init) == want
    # DoRA adds the magnitude vector, one per output unit
    assert mc.vit_b16_count("dora", rank=8, alpha=16.0, init="pissa") == want + 24 * 768


def test_bad_init_and_rank_name_the_field(tiny):
    _, params = tiny
    with pytest.raises(ValueError, match=r"lora\.init: 'svd' not in .*pissa"):
        get_method("lora", init="svd")
    m = get_method("lora", init="pissa", rank=64, alpha=1.0)
    with pytest.raises(ValueError, match=r"lora\.rank: 64 exceeds"):
        prepare_base(m, params)


def test_random_init_has_no_base_hook():
    # kaiming / gaussian keep today's method: no prepare_base, factors from the rng
    for init in ("kaiming", "gaussian"):
        assert get_method("lora", init=init).hooks.prepare_base is None
