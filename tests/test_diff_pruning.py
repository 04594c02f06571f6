"""Diff pruning: the hard-concrete gate and its expected L0 against the closed form, identity at
init, closed-form counts, the top-k phase switch (exactly k entries, no retrace, frozen entries
bitwise unchanged), merge == forward, gradients, the sparse artifact."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import artifacts, masks, paths, train, vit
from guft_jax.methods import EpochContext, forward, get_method
from guft_jax.methods import diff_pruning as dp
from guft_jax.methods.base import init_state
from guft_jax.methods.report import count_trainable


def _x(n=4):
    return jax.random.normal(jax.random.key(7), (n, 16, 16, 3))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_hard_concrete_sample_lies_in_unit_interval_and_its_l0_is_the_closed_form():
    log_alpha = jnp.asarray([-4.0, -1.5, 0.0, 0.7, 2.0, 5.0])
    n = 40_000
    z = jax.vmap(lambda k: dp.hard_concrete_sample(k, log_alpha))(
        jax.random.split(jax.random.key(0), n)
    )
    z = np.asarray(z)
    assert z.min() >= 0.0 and z.max() <= 1.0
    assert np.any(z == 0.0) and np.any(z == 1.0)  # the stretch-and-clip gives exact 0s and 1s
    # P(z != 0) = sigmoid(log α − β log(−γ/ζ)) per entry (Louizos et al., Eq. 12)
    beta, zeta, gamma = 2 / 3, 1.1, -0.1
    p = _sigmoid(np.asarray(log_alpha, np.float64) - beta * np.log(-gamma / zeta))
    freq = (z > 0).mean(0)
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-4), (freq, p)
    np.testing.assert_allclose(float(dp.expected_l0(log_alpha)), p.sum(), rtol=1e-6)
    # the deterministic gate: min(1, max(0, σ(log α)(ζ − γ) + γ))
    ref = np.clip(_sigmoid(np.asarray(log_alpha, np.float64)) * (zeta - gamma) + gamma, 0, 1)
    np.testing.assert_allclose(dp.hard_concrete_gate(log_alpha), ref, rtol=1e-6, atol=1e-7)


def test_identity_at_init_in_training_and_in_eval(tiny):
    model, params = tiny
    m = get_method("diff_pruning")
    tr = m.init(jax.random.key(0), params)
    st = init_state(m, params, tr)
    f = jax.jit(lambda tr, st, rng: forward(model, m, params, tr, st, _x(), rng=rng, features=True))
    base = jax.jit(lambda p: model.apply({"params": p}, _x(), features=True))(params)
    np.testing.assert_allclose(f(tr, st, None), base, atol=1e-6)
    np.testing.assert_allclose(f(tr, st, jax.random.key(3)), base, atol=1e-6)  # δ = z ⊙ 0


def test_trainable_counts_closed_form_on_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    m = get_method("diff_pruning", ratio=0.005)
    tr = jax.eval_shape(lambda q: m.init(jax.random.PRNGKey(0), q), p)
    L, d, mlp = 12, 768, 3072
    # eligible = the blocks' Dense kernels (4 d² + 2 d·mlp) and biases (4 d + mlp + d)
    n = L * (4 * d * d + 2 * d * mlp + 5 * d + mlp)
    assert n == 85_017_600
    assert count_trainable(m, p, tr)[0] == 2 * n  # L0 phase: w and log α
    assert masks.budget(0.005, n) == round(0.005 * n) == 425_088  # the re-fit budget k


def _switched(m, params, tr, st):
    ctx = EpochContext(params, tr, (), st, None, None, lambda s: None, epochs=1)
    return m.hooks.epoch_start(1, ctx)


def _perturbed(m, params, seed=1):
    """w ~ N(0, 0.05²), log α ≈ 5 ± 3 (some gates partly closed), a random head; in numpy (no
    per-shape compiles)."""
    tr = m.init(jax.random.key(0), params)
    rng = np.random.default_rng(seed)
    diff = {k: 0.05 * rng.standard_normal(v.shape, np.float32) for k, v in tr["diff"].items()}
    la = {
        k: np.asarray(v) + 3e-3 * rng.standard_normal(v.shape, np.float32)
        for k, v in tr["log_alpha"].items()
    }
    head = {**params["head"], "kernel": rng.standard_normal(params["head"]["kernel"].shape)}
    return jax.tree.map(jnp.asarray, {"head": head, "diff": diff, "log_alpha": la})


def test_phase_switch_merge_gradients_and_artifacts(tiny, tmp_path):
    model, params = tiny
    m = get_method("diff_pruning", ratio=0.02, prune_epoch=1, alpha_lr_scale=1000.0)
    tr = _perturbed(m, params)  # log α ≈ 5 ± 3: some gates partly closed
    st = init_state(m, params, tr)
    n = sum(v.size for v in tr["diff"].values())
    k = masks.budget(0.02, n)
    loss_fn = train.make_loss_fn(model, m)

    @jax.jit
    def fwd_grad(tr, st):  # one program: the deterministic forward and a training gradient
        g = jax.grad(loss_fn)(tr, params, st, _x(), jnp.arange(4) % 3, jax.random.key(4))
        return forward(model, m, params, tr, st, _x()), g

    plain = jax.jit(lambda p: model.apply({"params": p}, _x()))
    for phase in (0, 1):
        if phase == 1:
            tr, _, st = _switched(m, params, tr, st)
            assert int(st.phase) == 1 and masks.count(st.mask) == k
            # the kept entries are the top-k magnitudes of the gated diff; the rest are zero
            for key, w in tr["diff"].items():
                assert np.all(np.asarray(w)[~np.asarray(st.mask[key])] == 0)
        merged = m.merge(params, tr, st)
        logits, g = fwd_grad(tr, st)
        np.testing.assert_allclose(logits, plain(merged), rtol=1e-5, atol=1e-5)
        if phase == 1:
            assert _changed(merged, params, tr) == k  # exactly the budget's non-zeros
        if phase == 0:
            assert all(float(jnp.abs(v).max()) > 0 for v in g["log_alpha"].values())
        else:  # only the k kept entries (and the head) receive gradient
            for key, v in g["diff"].items():
                assert np.all(np.asarray(v)[~np.asarray(st.mask[key])] == 0)
            assert all(float(jnp.abs(v).max()) == 0 for v in g["log_alpha"].values())
            assert count_trainable(m, params, tr, st)[0] == k
        # the sparse artifact round trip is bitwise
        d = tmp_path / f"a{phase}"
        meta = artifacts.save_artifact(str(d), method=m, params=params, trainable=tr, state=st)
        loaded, _ = artifacts.load_artifact(str(d), params)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(merged), strict=True):
            np.testing.assert_array_equal(a, b)
        if phase == 1:
            assert meta["numbers"] == 2 * k  # k int32 indices + k values


def _changed(merged, params, tr) -> int:
    """Entries where the merged params differ from the base: the final diff's non-zeros."""
    return sum(
        int(
            np.sum(
                np.asarray(paths.get(merged, paths.path_of(k)))
                != paths.get(params, paths.path_of(k))
            )
        )
        for k in tr["diff"]
    )


def test_trains_through_the_engine_with_one_trace_and_the_budget(tiny, source):
    model, params = tiny
    m = get_method("diff_pruning", ratio=0.01, prune_epoch=2)
    seen = {}
    hook = m.hooks.epoch_start

    def spy(epoch, ctx):
        out = hook(epoch, ctx)
        if epoch == 2:
            seen["at_switch"] = jax.tree.map(np.array, out[0])
        return out

    m = m._replace(hooks=m.hooks._replace(epoch_start=spy))
    r = mc.trains_in_one_trace(model, params, m, source, lr=1e-3)
    losses = [h["train_loss"] for h in r["history"]]
    assert r.results["traces"] == 1 and losses[-1] < losses[0], losses
    st, tr = r.state.method_state, jax.device_get(r.state.trainable)
    n = sum(v.size for v in tr["diff"].values())
    k = masks.budget(0.01, n)
    assert int(st.phase) == 1 and masks.count(st.mask) == k
    assert r.results["trainable_params"] == k
    at = seen["at_switch"]
    changed = 0
    for key, w in tr["diff"].items():
        keep = np.asarray(st.mask[key])
        np.testing.assert_array_equal(w[~keep], at["diff"][key][~keep])  # frozen: bitwise
        np.testing.assert_array_equal(tr["log_alpha"][key], at["log_alpha"][key])
        changed += int(np.sum(w[keep] != at["diff"][key][keep]))
    assert changed == k  # every kept entry re-fitted
    assert _changed(m.merge(params, tr, st), params, tr) == k


@pytest.mark.parametrize("bad", [dict(ratio=0.0), dict(prune_epoch=0), dict(l0_penalty=-1.0)])
def test_bad_hyperparameters_fail_loudly(bad):
    with pytest.raises(ValueError, match="diff_pruning"):
        get_method("diff_pruning", **bad)


def test_auto_prune_epoch():
    assert dp.auto_prune_epoch(100, 0.2) == 81 and dp.auto_prune_epoch(1, 0.2) == 1
    assert dp.auto_prune_epoch(3, 0.2) == 3 and dp.auto_prune_epoch(10, 0.5) == 6
