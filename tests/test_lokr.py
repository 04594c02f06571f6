"""LoKr ("lokr"): PEFT's factorization rule, the Kronecker shapes and when a factor is
decomposed, PEFT's two inits, ΔW against ``np.kron`` with α ≠ r, closed-form counts (ours and
PEFT's), identity, merge, gradients, the engine, artifacts, bad input."""

import jax
import method_checks as mc
import numpy as np
import pytest
from test_loha import assert_unmerged_equals_merged

from guft_jax import paths
from guft_jax.methods import get_method
from guft_jax.methods.lokr import factorization, lokr_delta, lokr_shapes

ALPHA = 6.0  # never equal to the ranks used here, so a wrong scale would show
Q0 = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"


def test_factorization_matches_peft():
    # Values of peft.tuners.lokr.layer.factorization (PEFT 0.17.1, src/peft/tuners/lokr/
    # layer.py), obtained by running that function: its docstring's examples, then the
    # ViT-B/16 widths 768 (hidden) and 3072 (MLP) with the default factor -1 and with factors.
    assert [factorization(256), factorization(128), factorization(127)] == [
        (16, 16),
        (8, 16),
        (1, 127),
    ]
    assert factorization(128, 4) == (4, 32)
    assert factorization(768) == (24, 32) and factorization(3072) == (48, 64)
    assert factorization(768, 8) == (8, 96) and factorization(3072, 8) == (8, 384)
    assert factorization(768, 5) == (4, 192)  # 5 does not divide: largest divisor walk <= 5
    assert factorization(32, 8) == (8, 4)  # a dividing factor comes first, unsorted
    assert factorization(32) == (4, 8)
    for d in range(1, 200):
        m, n = factorization(d)
        assert m * n == d and m <= n


def test_shapes_and_decomposition_rule():
    # PEFT: out = l·k, in = m·n; W2 decomposed when r < max(k, n)/2, C when decompose_both and
    # r < max(l, m)/2.
    assert lokr_shapes(768, 768, rank=8, decompose_both=False, factor=-1) == (
        (24, 24),
        (32, 32),
        False,
        True,
    )
    assert lokr_shapes(768, 768, rank=8, decompose_both=True, factor=-1)[2:] == (True, True)
    assert lokr_shapes(768, 768, rank=16, decompose_both=True, factor=-1)[2:] == (False, False)
    assert lokr_shapes(768, 3072, rank=8, decompose_both=False, factor=-1)[:2] == (
        (48, 24),
        (64, 32),
    )


def test_counts_closed_form_and_peft():
    # PEFT 0.17.1 LoKrConfig(r, target_modules=["query", "value"]) on ViT-B/16, from
    # LoKrLayer.update_layer / create_adapter_parameters: 768 = 24·32, so lokr_w1 is (24, 24)
    # and W2 is lokr_w2_a (32, r) @ lokr_w2_b (r, 32) while r < 16, else lokr_w2 (32, 32).
    assert mc.vit_b16_count("lokr") == 24 * (24 * 24 + 2 * 32 * 8) == 26_112
    assert mc.vit_b16_count("lokr", rank=16) == 24 * (24 * 24 + 32 * 32) == 38_400
    both = mc.vit_b16_count("lokr", decompose_both=True)
    assert both == 24 * (2 * 24 * 8 + 2 * 32 * 8) == 21_504
    # factor 8: 768 = 8·96, C (8, 8), W2 (96, 8) @ (8, 96)
    assert mc.vit_b16_count("lokr", decompose_factor=8) == 24 * (8 * 8 + 2 * 96 * 8)


@pytest.mark.parametrize(
    "hp, names",
    [
        (dict(rank=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # 2 < max(8, 8)/2
        (dict(rank=5), {"lokr_w1", "lokr_w2"}),  # nothing decomposed on d = 32 = 4·8
        (dict(rank=1, decompose_both=True), {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
        (dict(rank=3, decompose_factor=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # 2·16
    ],
)
def test_delta_is_the_numpy_kronecker_product(tiny, hp, names):
    _, params = tiny
    m = get_method("lokr", alpha=ALPHA, **hp)
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.3)
    merged = m.merge(params, tr)
    for k, f in jax.device_get(tr["lokr"]).items():
        assert set(f) == names
        f = {n: np.asarray(v, np.float64) for n, v in f.items()}
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        want = (ALPHA / hp["rank"]) * np.kron(w1, w2)  # torch (out, in)
        p = paths.path_of(k)
        got = np.asarray(paths.get(merged, p) - paths.get(params, p), np.float64)
        np.testing.assert_allclose(got.reshape(32, 32), want.T, rtol=1e-5, atol=1e-6)
        assert np.abs(want).max() > 1e-3


@pytest.mark.parametrize(
    "hp, zero",
    [
        (dict(rank=2), "lokr_w1"),
        (dict(rank=1, decompose_both=True), "lokr_w1_a"),
        (dict(rank=2, init="lycoris"), "lokr_w2_b"),
        (dict(rank=5, init="lycoris"), "lokr_w2"),
    ],
)
def test_inits_zero_one_factor_so_identity(tiny, hp, zero):
    _, params = tiny
    m = get_method("lokr", alpha=ALPHA, **hp)
    f = jax.device_get(m.init(jax.random.key(0), params)["lokr"][paths.key_of(Q0)])
    for n, v in f.items():
        bound = 1 / np.sqrt(v.shape[1])  # kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(fan_in))
        assert np.all(v == 0) if n == zero else np.abs(v).max() > 0.5 * bound, n
        assert np.all(np.abs(v) <= bound), n
    mc.identity_at_init(*tiny, m)


def test_unmerged_forward_equals_merged(tiny):
    model, params = tiny
    m = get_method("lokr", rank=2, alpha=ALPHA)
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.3)
    assert_unmerged_equals_merged(model, params, m, tr, lambda f: lokr_delta(f, ALPHA / 2))


def test_merge_gradients_artifact(tiny, tmp_path):
    m = get_method("lokr", rank=2, alpha=ALPHA, decompose_both=True)
    mc.merge_equals_apply(*tiny, m)
    g = mc.gradients_reach_every_trained_leaf(*tiny, m)
    assert set(g) == {"head", "lokr"}
    mc.artifact_round_trip(tiny[1], m, tmp_path)


def test_trains_in_one_trace_with_frozen_base(tiny, source):
    r = mc.trains_in_one_trace(*tiny, get_method("lokr", rank=2, alpha=ALPHA), source)
    f = jax.device_get(r.state.trainable["lokr"][paths.key_of(Q0)])
    assert np.any(f["lokr_w1"] != 0)  # the zero factor moved


@pytest.mark.parametrize(
    "hp, field",
    [
        (dict(rank=0), "lokr.rank"),
        (dict(alpha=-1.0), "lokr.alpha"),
        (dict(init="zeros"), "lokr.init"),
        (dict(decompose_factor=0), "lokr.decompose_factor"),
    ],
)
def test_bad_hyperparameters_name_the_field(hp, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        get_method("lokr", **hp)


def test_bad_targets_name_the_field(tiny):
    with pytest.raises(ValueError, match=r"lokr\.targets"):
        get_method("lokr", targets=(r"no_such/kernel$",)).init(jax.random.key(0), tiny[1])
