"""HRA: the Householder chain against a numpy oracle of PEFT 0.17.1's product, the paired
identity init, the orthogonality regulariser, orthogonality after AdamW steps, the closed-form
count, the interface properties and bad input."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import train
from guft_jax.methods import get_method
from guft_jax.methods import hra as hra_mod
from guft_jax.methods import weight_space as ws

Q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"


def np_hra_weight(u):
    """PEFT's ``get_delta_weight`` (apply_GS=False): I, then weight -= 2 weight u_i u_iᵀ."""
    u = u / np.linalg.norm(u, axis=0)
    weight = np.eye(u.shape[0])
    for i in range(u.shape[1]):
        ui = u[:, i : i + 1]
        weight = weight - 2 * weight @ ui @ ui.T
    return weight


def test_householder_chain_matches_peft_product():
    rng = np.random.default_rng(0)
    u, w = rng.normal(size=(24, 6)), rng.normal(size=(24, 10))
    h = np_hra_weight(u)
    np.testing.assert_allclose(h @ h.T, np.eye(24), atol=1e-12)
    # PEFT merges W' = W0 H (W (out, in)); in the (in, out) kernel layout K' = Hᵀ K0
    want = (w.T @ h).T
    got = hra_mod.householder_chain(jnp.asarray(u, jnp.float32), jnp.asarray(w, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_paired_init_is_the_identity_and_peft_shaped(tiny):
    _, params = tiny
    m = get_method("hra", r=6)
    u = m.init(jax.random.key(0), params)["hra"][ws.key(Q)]["hra_u"]
    assert u.shape == (32, 6)
    np.testing.assert_array_equal(u[:, 0::2], u[:, 1::2])  # repeat_interleave(2, dim=1)
    assert len({float(x) for x in u[0, 0::2]}) == 3  # three distinct vectors
    assert float(jnp.abs(u).max()) <= 1 / np.sqrt(3)  # kaiming_uniform_(a=√5), fan_in = r/2
    h = hra_mod.householder_chain(u, jnp.eye(32))
    np.testing.assert_allclose(h, np.eye(32), atol=1e-6)


def test_regulariser_is_the_papers_and_is_the_loss_hook(tiny):
    _, params = tiny
    lam = 0.3
    m = get_method("hra", r=4, lambda_orth=lam)
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.2)
    want = 0.0
    for f in tr["hra"].values():
        v = np.asarray(f["hra_u"], np.float64)
        v = v / np.linalg.norm(v, axis=0)
        want += np.sum((v.T @ v - np.eye(4)) ** 2)
    got = m.hooks.loss(params, tr, None, jax.random.key(0))
    np.testing.assert_allclose(got, lam * want, rtol=1e-5)
    # the engine's training loss adds it (and only with an rng: evaluation is the task loss)
    model = tiny[0]
    x, y = mc.images(), jnp.array([0, 1])
    loss = train.make_loss_fn(model, m)
    diff = loss(tr, params, None, x, y, jax.random.key(1)) - loss(tr, params, None, x, y)
    # (dropout is off in the tiny ViT, so the difference is the regulariser)
    np.testing.assert_allclose(diff, lam * want, rtol=1e-4)
    assert get_method("hra", lambda_orth=0.0).hooks.loss is None


def test_interface_properties(tiny, tmp_path):
    model, params = tiny
    m = get_method("hra", r=4)
    # the paired reflections cancel exactly in exact arithmetic; in float32 each pair's two rank-1
    # updates leave ~1e-7 relative rounding on the kernel (the tokens move by ~1e-6)
    mc.identity_at_init(model, params, m, atol=1e-5)
    merged = m.merge(params, m.init(jax.random.key(0), params))
    k0 = ws.matrix(params, Q)
    np.testing.assert_allclose(ws.matrix(merged, Q), k0, atol=4 * np.finfo(np.float32).eps)
    mc.merge_equals_apply(model, params, m)
    g = mc.gradients_reach_every_trained_leaf(model, params, m)
    assert set(g) == {"head", "hra"}
    mc.artifact_round_trip(params, m, tmp_path)


def test_engine_one_trace_and_reflections_stay_orthogonal(tiny, source):
    model, params = tiny
    m = get_method("hra", r=4, lambda_orth=1e-3)
    r = mc.trains_in_one_trace(model, params, m, source, lr=3e-2)
    moved = 0.0
    for f in r.state.trainable["hra"].values():
        h = hra_mod.householder_chain(f["hra_u"], jnp.eye(32))
        np.testing.assert_allclose(h @ h.T, np.eye(32), atol=1e-5)
        moved = max(moved, float(jnp.abs(h - jnp.eye(32)).max()))
    assert moved > 1e-2  # the pairs separated: the chain is no longer the identity


def test_vit_b16_count_closed_form_and_peft():
    # PEFT 0.17.1 HRAConfig(r=8, target_modules=["query", "value"]) on a ViT-B/16 (12 blocks x 2
    # Linear(768, 768)): HRALayer.update_layer makes hra_u (in_features, r) = (768, 8) per layer:
    # 24 * 6,144 = 147,456.
    assert mc.vit_b16_count("hra") == 24 * 768 * 8 == 147_456
    assert mc.vit_b16_count("hra", r=2) == 24 * 768 * 2


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(r=3), "hra.r"),
        (dict(r=0), "hra.r"),
        (dict(apply_GS=True), "hra.apply_GS"),
        (dict(lambda_orth=-1.0), "hra.lambda_orth"),
    ],
)
def test_bad_hyperparameters_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        get_method("hra", **kw)
