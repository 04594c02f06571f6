"""AdaLoRA: budget schedule, orthogonality regulariser, counts, gradients, pruning to the budget
inside the jitted step (one trace), artifacts."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import artifacts, paths, train, vit
from guft_jax.methods import adalora as ada
from guft_jax.methods import get_method
from guft_jax.methods.report import count_trainable


def _x():
    return jax.random.normal(jax.random.key(7), (2, 16, 16, 3))


def test_budget_schedule_equals_the_closed_form():
    # ViT-B/16 query+value: L = 24 kernels, init 12 -> target 8: 288 -> 192 over T = 1000 steps,
    # t_i = 0.1·T = 100, t_f = 0.3·T = 300:  b(t) = 192 + ⌊96·(1 − (t − 100)/600)³⌋ on (100, 700]
    kw = dict(total_steps=1000, init_budget=288, target_budget=192, t_init=0.1, t_final=0.3)
    want = {0: 288, 100: 288, 101: 287, 250: 232, 400: 204, 550: 193, 699: 192, 700: 192, 999: 192}
    for t, b in want.items():
        assert ada.rank_budget(t, **kw) == b, t
        if 100 < t <= 700:
            assert b == 192 + int(96 * (1 - (t - 100) / 600) ** 3)
    assert (
        ada.rank_budget(400, **{**kw, "t_init": 100, "t_final": 300}) == 204
    )  # steps, not fractions
    with pytest.raises(ValueError, match="adalora.target_rank"):
        get_method("adalora", init_rank=4, target_rank=5)


def test_orthogonality_regulariser_is_zero_for_orthogonal_factors():
    rng = np.random.default_rng(0)
    p = np.linalg.qr(rng.normal(size=(40, 6)))[0]  # orthonormal columns: PᵀP = I
    q = np.linalg.qr(rng.normal(size=(30, 6)))[0].T  # orthonormal rows: QQᵀ = I
    assert float(ada.orthogonality(jnp.asarray(p), jnp.asarray(q))) == pytest.approx(0, abs=1e-10)
    # P = c·[I; 0], Q = [I 0]: ‖(c² − 1) I_r‖²_F = r (c² − 1)²
    c, r = 2.0, 6
    pc = jnp.zeros((40, r)).at[:r].set(c * jnp.eye(r))
    qc = jnp.zeros((r, 30)).at[:, :r].set(jnp.eye(r))
    assert float(ada.orthogonality(pc, qc)) == pytest.approx(r * (c * c - 1) ** 2)
    # the loss hook: γ · mean over kernels
    m = get_method("adalora", init_rank=r, target_rank=2, orth_reg=0.25)
    tr = {"head": {}, "adalora": {"a": {"P": pc, "Q": qc}, "b": {"P": p, "Q": q}}}
    assert float(m.hooks.loss(None, tr, None, None)) == pytest.approx(0.25 * r * 9 / 2, rel=1e-6)


def test_identity_at_init_counts_and_gradients(tiny):
    model, params = tiny
    m = get_method("adalora", init_rank=4, target_rank=2, alpha=6.0)
    tr = m.init(jax.random.key(0), params)
    base = model.apply({"params": params}, _x(), features=True)
    np.testing.assert_allclose(model.apply(m.apply(params, tr), _x(), features=True), base)

    def task(t):
        return jnp.sum(model.apply(m.apply(params, t), _x(), features=True) ** 2)

    g_task = jax.jit(jax.grad(task))(tr)["adalora"]
    g_reg = jax.grad(lambda t: m.hooks.loss(params, t, None, jax.random.key(0)))(tr)["adalora"]
    for gt, gr in zip(g_task.values(), g_reg.values(), strict=True):
        # λ = 0 at init: the task reaches only λ; the regulariser reaches only P and Q
        assert float(jnp.abs(gt["lambda"]).max()) > 0
        assert float(jnp.abs(gt["P"]).max()) == float(jnp.abs(gt["Q"]).max()) == 0.0
        assert float(jnp.abs(gr["P"]).max()) > 0 and float(jnp.abs(gr["Q"]).max()) > 0
        assert float(jnp.abs(gr["lambda"]).max()) == 0.0

    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    mb = get_method("adalora", init_rank=12, target_rank=8)
    n = count_trainable(mb, p, jax.eval_shape(lambda q: mb.init(jax.random.key(0), q), p))[0]
    L, d, r = 24, 768, 12  # query + value of 12 blocks; P (d, r), λ (r,), Q (r, d)
    assert n == L * r * (d + d + 1) == 442_656


def test_pruning_follows_the_budget_one_trace_loss_falls(tiny, source):
    model, params = tiny
    hp = dict(init_rank=4, target_rank=2, alpha=6.0, t_init=0.1, t_final=0.3, delta_t=2)
    m = get_method("adalora", **hp)
    seen = {}

    def record(t, keep, lam):
        seen[int(t)] = (keep, lam)

    def step(info):
        out = m.hooks.step(info)
        lam = {k: f["lambda"] for k, f in out[0]["adalora"].items()}
        jax.debug.callback(record, info.step, out[2].keep, lam)
        return out

    rec = m._replace(hooks=m.hooks._replace(step=step))
    r = train.fit(
        model,
        params,
        rec,
        source,
        mc.tiny_config(epochs=8, head_lr=None),
        hooks=mc.print_nothing,
    )
    assert r.results["traces"] == 1
    losses = [h["train_loss"] for h in r.results["history"]]
    assert losses[-1] < losses[0], losses
    # 64 examples / 16 = 4 steps per epoch: T = 32; t_i = ⌊0.1·32⌋ = 3, t_f = ⌊0.3·32⌋ = 9.
    # 4 kernels (query, value of 2 blocks): budget 16 -> 8, b(t) = 8 + ⌊8·(1 − (t − 3)/20)³⌋
    T, ti, tf = 32, 3, 9
    assert sorted(seen) == list(range(T))
    mask_steps = [t for t in range(T) if (ti < t < T - tf and t % 2 == 0) or t == T - tf]
    assert mask_steps == [4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 23]
    kept = 16
    for t in range(T):
        keep, lam = seen[t]
        n = int(sum(np.sum(v) for v in keep.values()))
        if t in mask_steps:
            kept = 8 + int(8 * (1 - (t - ti) / 20) ** 3)
            assert kept == ada.rank_budget(
                t, total_steps=T, init_budget=16, target_budget=8, t_init=0.1, t_final=0.3
            )
        assert n == kept, (t, n, kept)  # the pattern changes only at mask steps
        if t in mask_steps or t > T - tf:  # pruned triplets have λ = 0 after the step
            for k in keep:
                assert not np.any(lam[k][~keep[k]]), (t, k)
    assert sum(ada.rank_pattern(r.state.method_state).values()) == 8
    # the final adapter has exactly the kept rank per kernel: λ is zero exactly where pruned
    pattern = ada.rank_pattern(r.state.method_state)
    for k, f in r.state.trainable["adalora"].items():
        assert int(np.count_nonzero(np.asarray(f["lambda"]))) == pattern[paths.path_of(k)]


def test_artifact_round_trip_is_exact(tiny, tmp_path):
    model, params = tiny
    m = get_method("adalora", init_rank=4, target_rank=2, alpha=6.0)
    tr = m.init(jax.random.key(0), params)
    tr = jax.tree.map(lambda v: v + 0.01 * jnp.arange(v.size).reshape(v.shape) / v.size, tr)
    artifacts.save_artifact(str(tmp_path / "a"), method=m, params=params, trainable=tr)
    merged, meta = artifacts.load_artifact(str(tmp_path / "a"), params)
    assert meta["method"] == "adalora" and meta["hparams"]["init_rank"] == 4
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m.merge(params, tr)), strict=True):
        np.testing.assert_array_equal(a, b)
    # merged kernel = W0 + (α/r)·(P diag(λ) Q)ᵀ, written out for one kernel
    k = "Transformer.encoderblock_1.MultiHeadDotProductAttention_1.value.kernel"
    f = jax.tree.map(np.asarray, tr["adalora"][k])
    pk = k.replace(".", "/")
    w0 = np.asarray(vit.kernel_as_matrix(paths.get(params, pk), pk))
    ref = w0 + (6.0 / 4) * ((f["P"] * f["lambda"]) @ f["Q"]).T
    got = np.asarray(vit.kernel_as_matrix(paths.get(merged, pk), pk))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
