"""AFLoRA (arXiv:2403.13269): keep-ratio schedule, counts, gradients, adaptive freezing replayed
in numpy, one trace, artifacts."""

import math

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import artifacts, paths, train, vit
from guft_jax.methods import aflora as af
from guft_jax.methods import get_method
from guft_jax.methods.base import init_state
from guft_jax.methods.report import count_trainable


def _x():
    return jax.random.normal(jax.random.key(7), (2, 16, 16, 3))


def test_keep_ratio_equals_the_closed_form():
    # T = 1000, t_i = 0.05·T = 50, t_f = 0.7·T = 700: τ = (1 − (t − 50)/250)³ on [50, 300)
    T = 1000
    want = {
        0: 1.0,
        49: 1.0,
        50: 1.0,
        100: 0.8**3,
        175: 0.5**3,
        250: 0.2**3,
        299: (1 / 250) ** 3,
        300: 0.0,
        999: 0.0,
    }
    for t_init, t_final in ((0.05, 0.7), (50, 700), (50.0, 0.7)):
        for t, tau in want.items():
            got = af.keep_ratio(t, total_steps=T, t_init=t_init, t_final=t_final)
            assert got == pytest.approx(tau, rel=1e-12, abs=1e-15), (t_init, t)
    # fractions are floored to steps: T = 30, t_i = ⌊0.1·30⌋ = 3, t_f = ⌊0.3·30⌋ = 9
    assert af.keep_ratio(2, total_steps=30, t_init=0.1, t_final=0.3) == 1.0
    assert af.keep_ratio(12, total_steps=30, t_init=0.1, t_final=0.3) == pytest.approx(0.5**3)
    assert af.keep_ratio(21, total_steps=30, t_init=0.1, t_final=0.3) == 0.0
    with pytest.raises(ValueError, match="aflora.t_init"):
        get_method("aflora", t_init=2.5)
    with pytest.raises(ValueError, match="aflora.window"):
        get_method("aflora", window=0)


def test_identity_at_init_and_counts_on_vit_b16(tiny):
    model, params = tiny
    m = get_method("aflora", rank=4)
    tr = m.init(jax.random.key(0), params)
    out = model.apply(m.apply(params, tr), _x(), features=True)  # s_b = 0
    np.testing.assert_allclose(out, model.apply({"params": params}, _x(), features=True), atol=1e-6)

    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)

    def count(**hp):
        mm = get_method("aflora", **hp)
        return count_trainable(mm, p, jax.eval_shape(lambda q: mm.init(jax.random.key(0), q), p))[0]

    L, d, f, r = 12, 768, 3072, 4
    # per kernel (in, out): A r·in + B out·r + s_d r + s_b out
    sq = r * (d + d) + r + d  # query, key, value, out
    up, down = r * (d + f) + r + f, r * (f + d) + r + d  # Dense_0 (d -> f), Dense_1 (f -> d)
    assert count(rank=r) == L * (4 * sq + up + down) == 746_784
    # the official code: A, B of square kernels never train, only their s_d, s_b
    assert count(rank=r, freeze_square=True) == L * (4 * (r + d) + up + down) == 451_872
    qv = (r"MultiHeadDotProductAttention_1/(query|value)/kernel$",)
    assert count(rank=r, targets=qv) == 2 * L * sq == 165_984


def test_gradients_reach_only_what_trains(tiny):
    model, params = tiny
    m = get_method("aflora", rank=2, freeze_square=True)
    tr = m.init(jax.random.key(0), params)

    def loss(t):
        return jnp.sum(model.apply(m.apply(params, t), _x(), features=True) ** 2)

    g = jax.jit(jax.grad(loss))(tr)["aflora"]
    for f in g.values():  # at init s_b = 0 blocks every path but its own
        assert float(jnp.abs(f["s_b"]).max()) > 0
        for x in ("A", "B", "s_d"):
            assert float(jnp.abs(f[x]).max()) == 0.0
    # the optimizer mask: square kernels' A, B never train, the rest and the head do
    st = init_state(m, params, tr)
    mask = m.hooks.update_mask(st)
    assert mask["head"] is True
    for k, f in tr["aflora"].items():
        square = f["A"].shape[1] == f["B"].shape[0]
        assert mask["aflora"][k]["s_d"] is True and mask["aflora"][k]["s_b"] is True
        assert bool(mask["aflora"][k]["A"]) == bool(mask["aflora"][k]["B"]) == (not square)
    assert any(bool(v["A"]) for v in mask["aflora"].values())  # the MLP kernels (32 <-> 64)


def _replay(records, keys, *, T, ti, tf, window, b1, b2):
    """The freezing schedule in float32 numpy on the recorded gradients: returns the step each
    matrix froze at (-1: never) and the final Ī, Ū."""
    mats = [(k, x) for k in keys for x in ("A", "B")]
    shape = {kx: records[0][1][kx[0]][kx[1]].shape for kx in mats}
    w = {kx: np.zeros(shape[kx], np.float32) for kx in mats}
    ib = {kx: np.zeros(shape[kx], np.float32) for kx in mats}
    ub = {kx: np.zeros(shape[kx], np.float32) for kx in mats}
    active = dict.fromkeys(mats, True)
    frozen_at = dict.fromkeys(mats, -1)
    for t, grads in records:
        local = t % window
        for kx in mats:
            if not active[kx]:
                continue
            gi = np.abs(np.asarray(grads[kx[0]][kx[1]], np.float32))
            if local == 0:  # the previous window's mean enters the EMAs
                ib[kx] = b1 * ib[kx] + (1 - b1) * w[kx]
                ub[kx] = b2 * ub[kx] + (1 - b2) * np.abs(w[kx] - ib[kx])
                w[kx] = gi
            else:
                w[kx] = (w[kx] * np.float32(local) + gi) / np.float32(local + 1)
        if local != 0 or t < ti:
            continue
        # τ(t) = 1 before t_i, (1 − (t − t_i)/(T − t_i − t_f))³ until T − t_f, then 0
        tau = (1.0 - (t - ti) / (T - ti - tf)) ** 3 if t < T - tf else 0.0
        live = [kx for kx in mats if active[kx]]
        n = sum(math.prod(shape[kx]) for kx in live)
        k = int(np.floor(np.float32(n) * np.float32(1.0 - tau)))
        if k < 1:
            continue
        scores = {kx: ib[kx] * ub[kx] for kx in live}
        thr = np.sort(np.concatenate([s.ravel() for s in scores.values()]))[k - 1]
        for kx in live:  # a whole matrix freezes when its mean score is below the threshold
            if scores[kx].mean() < thr:
                active[kx], frozen_at[kx] = False, t
    return frozen_at, ib, ub


def test_adaptive_freezing_replays_in_numpy_one_trace_loss_falls(tiny, source):
    model, params = tiny
    hp = dict(rank=2, t_init=0.1, t_final=0.3, window=2)
    m = get_method("aflora", **hp)
    records, values = [], {}

    def record(t, grads, tr):
        t = int(t)
        records.append((t, grads))
        values[t] = tr

    def step(info):
        out = m.hooks.step(info)
        ab = lambda tree: {  # noqa: E731
            k: {x: f[x] for x in ("A", "B")} for k, f in tree["aflora"].items()
        }
        jax.debug.callback(record, info.step, ab(info.grads), ab(out[0]))
        return out

    rec = m._replace(hooks=m.hooks._replace(step=step))
    epochs = 8  # train800val200 = 64 examples / batch 16 = 4 steps per epoch: T = 32
    r = train.fit(
        model,
        params,
        rec,
        source,
        mc.tiny_config(epochs=epochs, head_lr=None),
        hooks=mc.print_nothing,
    )
    assert r.results["traces"] == 1
    losses = [h["train_loss"] for h in r.results["history"]]
    assert losses[-1] < losses[0], losses
    T = 4 * epochs
    assert r.results["history"][-1]["step"] == T
    records.sort(key=lambda rec_: rec_[0])
    assert [t for t, _ in records] == list(range(T))

    st = r.state.method_state
    keys = sorted(st.active)
    frozen_at, ib, ub = _replay(
        records, keys, T=T, ti=3, tf=9, window=2, b1=0.85, b2=0.95
    )  # t_i = ⌊0.1·32⌋, t_f = ⌊0.3·32⌋
    got = {(k, x): int(st.frozen_at[k][x]) for k in keys for x in ("A", "B")}
    assert got == frozen_at
    for kx in got:
        assert bool(st.active[kx[0]][kx[1]]) == (frozen_at[kx] < 0)
        np.testing.assert_allclose(st.ipt_bar[kx[0]][kx[1]], ib[kx], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(st.unc_bar[kx[0]][kx[1]], ub[kx], rtol=1e-5, atol=1e-12)
    # the schedule froze matrices at several decisions inside the cubic phase [3, 23), and
    # everything by the first decision at or after T − t_f = 23
    steps = sorted(set(frozen_at.values()))
    assert len(steps) >= 2 and steps[0] >= 3 and 0 <= steps[-1] <= 24, steps
    assert any(3 <= s < 23 for s in steps)
    assert af.frozen_matrices(st) == {
        f"{paths.path_of(k)}/{x}": s for (k, x), s in frozen_at.items() if s >= 0
    }
    # a frozen matrix is bitwise unchanged from its freezing step on; an active one moves
    for (k, x), f in frozen_at.items():
        for t in range(f + 1, T):
            np.testing.assert_array_equal(values[t][k][x], values[f][k][x])
        assert not np.array_equal(values[f][k][x], values[f - 1][k][x])
    # and its Adam moments are exactly zero; s_d, s_b still have moments
    flat = jax.tree_util.tree_flatten_with_path(r.state.opt_state)[0]
    moments = {paths.key_to_str(p): v for p, v in flat}
    proj = [v for p, v in moments.items() if p.split("/")[-1] in ("A", "B")]
    vec = [v for p, v in moments.items() if p.split("/")[-1] == "s_b"]
    assert len(proj) == 2 * 2 * len(keys)  # mu and nu of every A and B
    assert all(not np.any(np.asarray(v)) for v in proj)
    assert all(np.any(np.asarray(v)) for v in vec)


def test_artifact_round_trip_is_exact(tiny, tmp_path):
    model, params = tiny
    m = get_method("aflora", rank=2, freeze_square=True)
    tr = m.init(jax.random.key(0), params)
    tr = jax.tree.map(lambda v: v + 0.01 * jnp.arange(v.size).reshape(v.shape) / v.size, tr)
    artifacts.save_artifact(str(tmp_path / "a"), method=m, params=params, trainable=tr)
    merged, meta = artifacts.load_artifact(str(tmp_path / "a"), params)
    assert meta["method"] == "aflora" and meta["hparams"]["freeze_square"] is True
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m.merge(params, tr)), strict=True):
        np.testing.assert_array_equal(a, b)
    # the merged kernel is W0 + (Aᵀ diag(s_d) Bᵀ) diag(s_b), written out for one kernel
    k = "Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel"
    f = jax.tree.map(np.asarray, tr["aflora"][k])
    w0 = np.asarray(paths.get(params, paths.path_of(k)))
    ref = w0 + ((f["B"] * f["s_b"][:, None]) @ (f["A"] * f["s_d"][:, None])).T
    np.testing.assert_allclose(paths.get(merged, paths.path_of(k)), ref, rtol=1e-5, atol=1e-6)
