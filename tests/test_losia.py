"""LoSiA and LoSiA-Pro (arXiv:2507.04487): greedy subnets, closed-form counts,
identity at init, LoSiA-Pro's custom VJP, relocalisation (moments, re-warm, importance, the
retired delta), one trace per run and the artifact round trip."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import artifacts, optim, paths, train, vit
from guft_jax.checkpoint_import import CheckpointMismatchError
from guft_jax.config import TrainConfig
from guft_jax.methods import StepInfo, forward, get_method, method_names
from guft_jax.methods import losia as L
from guft_jax.methods.base import labels_of
from guft_jax.methods.report import count_trainable

GREEDY = jax.jit(L.greedy_subnet, static_argnums=(1, 2))
T = 2  # slot length of the tiny runs (2 encoder blocks: a layer relocalises every 4 steps)


def _x(n=4, seed=7):
    return jax.random.normal(jax.random.key(seed), (n, 16, 16, 3))


def _perturb(tree, seed, scale=0.05):
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tdef.unflatten(
        [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


# ----------------------------------------------------------------------------- greedy subnets


def _candidates(s, kr, kc):
    """The three greedy candidates in numpy (the official PureGreedy, Row2Column, Column2Row)."""
    top = lambda v, k: np.argsort(-v, kind="stable")[:k]
    ra, ca = top(s.sum(1), kr), top(s.sum(0), kc)
    return [(ra, ca), (ra, top(s[ra].sum(0), kc)), (top(s[:, ca].sum(1), kr), ca)]


def _block(s, rows, cols):
    return float(np.asarray(s, np.float64)[np.ix_(np.asarray(rows), np.asarray(cols))].sum())


def test_greedy_equals_brute_force_where_exact():
    rng = np.random.default_rng(0)
    for n_in, n_out, kr, kc in ((6, 5, 2, 3), (7, 6, 3, 2), (5, 8, 1, 4)):
        # rank one u vᵀ (u, v ≥ 0): the block sum factorises, the independent top-k is optimal
        s = np.outer(rng.random(n_in), rng.random(n_out)).astype(np.float32)
        brute = max(
            itertools.product(
                itertools.combinations(range(n_in), kr), itertools.combinations(range(n_out), kc)
            ),
            key=lambda rc: _block(s, rc[0], rc[1]),
        )
        rows, cols = GREEDY(jnp.asarray(s), kr, kc)
        assert rows.tolist() == list(brute[0]) and cols.tolist() == list(brute[1])
    # a planted block over noise is found exactly
    s = rng.random((9, 7)).astype(np.float32) * 0.1
    s[np.ix_([1, 4, 8], [0, 5])] += 10.0
    rows, cols = GREEDY(jnp.asarray(s), 3, 2)
    assert rows.tolist() == [1, 4, 8] and cols.tolist() == [0, 5]


def test_greedy_is_the_best_of_its_three_candidates():
    rng = np.random.default_rng(1)
    wins = set()
    for i in range(36):
        n_in, n_out, kr, kc = ((9, 7, 3, 2), (6, 11, 2, 5), (10, 10, 4, 4))[i % 3]
        s = (rng.random((n_in, n_out)) ** rng.choice([1, 4, 12])).astype(np.float32)
        rows, cols = (np.asarray(a) for a in GREEDY(jnp.asarray(s), int(kr), int(kc)))
        cands = [_block(s, r, c) for r, c in _candidates(s, kr, kc)]
        got = _block(s, rows, cols)
        assert got >= max(cands) * (1 - 1e-6), (i, got, cands)
        assert len(set(rows)) == kr and len(set(cols)) == kc
        assert np.all(np.diff(rows) > 0) and np.all(np.diff(cols) > 0)  # sorted
        wins.add(int(np.argmax(cands)))
    assert len(wins) > 1  # the candidates do differ on these scores


# ----------------------------------------------------------------------------- counts, identity


def test_registered_and_counts_equal_closed_form_on_vit_b16():
    assert {"losia", "losia_pro"} <= set(method_names())
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    n, d, mlp = 12, 768, 3072
    # per block: query, key, value, out (d/8)^2 each; Dense_0 (d/8)(mlp/8); Dense_1 (mlp/8)(d/8)
    expect = n * (4 * (d // 8) ** 2 + 2 * (d // 8) * (mlp // 8))
    assert expect == 1_327_104
    for name in ("losia", "losia_pro"):
        m = get_method(name)
        tr = jax.eval_shape(lambda q, m=m: m.init(jax.random.PRNGKey(0), q), p)
        st = jax.eval_shape(m.hooks.init_state, p, tr)
        assert count_trainable(m, p, tr, st) == (expect, d * 10 + 10)
        assert count_trainable(m, p, tr) == (expect, d * 10 + 10)  # without the state too
        # optimizer-visible extra: the zero probe, one encoder block's kernels (masked)
        assert sum(x.size for x in jax.tree.leaves(tr["probe"])) == 4 * d * d + 2 * d * mlp
        assert st.rows["Transformer.encoderblock_3.MlpBlock_3.Dense_1.kernel"].shape == (384,)
        assert st.res_vals["Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel"].shape == (
            4,
            96,
            384,
        )


@pytest.mark.parametrize("name", ["losia", "losia_pro"])
def test_identity_at_init(name, tiny):
    model, params = tiny
    m = get_method(name)
    tr = m.init(jax.random.key(0), params)
    st = m.hooks.init_state(params, tr)
    base = model.apply({"params": params}, _x(), features=True)
    out = jax.jit(lambda t, s: forward(model, m, params, t, s, _x(), features=True))(tr, st)
    np.testing.assert_allclose(out, base, rtol=0, atol=2e-6)  # jit vs eager rounding only
    merged = m.merge(params, tr, st)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_hyperparameters_and_targets_fail_loudly(tiny):
    _, params = tiny
    for kw in (dict(ratio=0.0), dict(period=0), dict(beta1=1.0), dict(history=-1)):
        with pytest.raises(ValueError, match="losia"):
            get_method("losia", **kw)
    with pytest.raises(ValueError, match="encoder-block kernels"):
        get_method("losia", targets=(r"^embedding/kernel$",)).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="matches no parameter"):
        get_method("losia", targets=(r"nothing_here",)).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        get_method("losia_pro", pro=False)


# ----------------------------------------------------------------------------- LoSiA-Pro's VJP


def _op_case(seed=0, din=12, dout=10, kr=3, kc=4):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (2, 5, din))
    w0 = jax.random.normal(k[1], (din, dout))
    rows = jnp.sort(jax.random.permutation(k[2], din)[:kr]).astype(jnp.int32)
    cols = jnp.sort(jax.random.permutation(k[3], dout)[:kc]).astype(jnp.int32)
    block = jax.random.normal(k[4], (kr, kc))
    # one retired block (overlapping the current one in a row) and one empty slot
    res_rows = jnp.stack([rows[::-1], jnp.full((kr,), din)]).astype(jnp.int32)
    res_cols = jnp.stack([jnp.arange(kc), jnp.zeros(kc)]).astype(jnp.int32)
    res_vals = jax.random.normal(k[5], (2, kr, kc)).at[1].set(0.0)
    return x, w0, rows, cols, block, (res_rows, res_cols, res_vals)


def test_subnet_matmul_block_gradient_is_the_dense_gradient_at_the_block():
    x, w0, rows, cols, block, retired = _op_case()
    w = L.effective_matrix(w0, rows, cols, block, *retired)
    dy = jax.random.normal(jax.random.key(9), (2, 5, w0.shape[1]))
    y_d, vjp_d = jax.vjp(lambda x, w: x @ w, x, w)
    dx_d, dw_d = vjp_d(dy)
    probe = jnp.zeros_like(w0)
    f = lambda x, b, p, record, dense=False: L.subnet_matmul(
        x, w0, rows, cols, b, retired, probe=p, record=record, dense_grad=dense
    )

    @functools.partial(jax.jit, static_argnums=1)
    def pro(record, dense):
        y, vjp = jax.vjp(lambda x, b, p: f(x, b, p, record, dense), x, block, probe)
        return y, *vjp(dy)

    # LoSiA-Pro's block-only backward and LoSiA's dense one, recording or not
    for record, dense in itertools.product((True, False), (False, True)):
        y_p, dx_p, db_p, dp_p = pro(record, dense)
        np.testing.assert_array_equal(y_p, y_d)
        np.testing.assert_allclose(dx_p, dx_d, rtol=1e-6, atol=1e-6)  # dx = dy @ Wᵀ, exact
        np.testing.assert_allclose(db_p, dw_d[rows[:, None], cols[None, :]], rtol=1e-5, atol=1e-6)
        if record:
            np.testing.assert_allclose(dp_p, dw_d, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(dp_p, np.zeros_like(dp_p))
    # what the forward saves: x[:, rows] only without a probe (x, the full input, with one)
    _, vjp_np = jax.vjp(lambda x, b: L.subnet_matmul(x, w0, rows, cols, b, retired), x, block)
    saved = {tuple(a.shape) for a in jax.tree.leaves(vjp_np)}
    assert (2, 5, 3) in saved and x.shape not in saved
    _, vjp_tap = jax.vjp(lambda x, b, p: f(x, b, p, True), x, block, probe)
    assert x.shape in {tuple(a.shape) for a in jax.tree.leaves(vjp_tap)}


def test_pro_gradients_equal_losia_gradients_and_the_dense_ones(tiny):
    model, params = tiny
    params = dict(params, head=_perturb(params["head"], 3, 0.3))
    x, y = _x(8), jnp.arange(8) % 3
    ms = {n: get_method(n, period=T) for n in ("losia", "losia_pro")}
    tr = ms["losia"].init(jax.random.key(0), params)
    tr = dict(tr, blocks=_perturb(tr["blocks"], 4))
    st = ms["losia"].hooks.init_state(params, tr)
    st = st._replace(count=jnp.asarray(T, jnp.int32))  # the second block records
    grads = {}
    for n, m in ms.items():
        loss = train.make_loss_fn(model, m)
        grads[n] = jax.jit(jax.grad(loss))(tr, params, st, x, y)
    for a, b in zip(
        jax.tree.leaves(grads["losia"]), jax.tree.leaves(grads["losia_pro"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
    # ... and both are the dense gradient of the merged kernels, read at the block / the probe
    merged = ms["losia"].merge(params, tr, st)
    dense = jax.jit(jax.grad(lambda p: train.cross_entropy(model.apply({"params": p}, x), y)))(
        merged
    )
    g = grads["losia_pro"]
    for key, gb in g["blocks"].items():
        path = paths.path_of(key)
        dw = vit.kernel_as_matrix(paths.get(dense, path), path)
        rows, cols = st.rows[key], st.cols[key]
        np.testing.assert_allclose(gb, dw[rows[:, None], cols[None, :]], rtol=2e-4, atol=1e-7)
        if "encoderblock_1" in path:
            kind = key.split("encoderblock_1.")[1].removesuffix(".kernel")
            np.testing.assert_allclose(g["probe"][kind], dw, rtol=2e-4, atol=1e-7)
    assert float(jnp.abs(g["blocks"]["Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel"]).sum())


# ----------------------------------------------------------------------------- relocalisation


@pytest.fixture(scope="module")
def hook_case(tiny):
    """The step hook of a period-4 LoSiA on the tiny ViT, jitted once, with synthetic inputs."""
    model, params = tiny
    m = get_method("losia", period=4, history=1)
    tr = m.init(jax.random.key(0), params)
    prev = dict(_perturb(tr, 1), probe=tr["probe"])
    new = dict(_perturb(prev, 2, 0.01), probe=tr["probe"])
    grads = _perturb(jax.tree.map(jnp.zeros_like, tr), 3, 1.0)
    st = m.hooks.init_state(params, tr)
    tx = optim.make_optimizer(labels=labels_of(m, tr), lr=1e-3, total_steps=100)
    opt = tx.init(tr)
    opt = jax.tree.map(lambda v: jnp.ones_like(v) if v.dtype == jnp.float32 else v, opt)
    hook = jax.jit(lambda info: m.hooks.step(info))
    info = lambda count, state: StepInfo(count, 100, new, prev, opt, state, grads, params)
    return m, params, tr, prev, new, grads, st, opt, hook, info


def _layer(key):
    return 0 if "encoderblock_0" in key else 1


def test_rewarm_ramps_each_layers_update_linearly_over_T(hook_case):
    period = 4
    m, params, tr, prev, new, grads, st, opt, hook, info = hook_case
    r = 9  # block 0 re-warms from step 9 (set by hand), block 1 is not re-warming
    for j in range(period + 2):
        t = r + j
        if t % period == period - 1:
            continue  # a slot's last step relocalises: the next test
        s = st._replace(restart=jnp.asarray([r, -period], jnp.int32), count=jnp.asarray(t))
        out, _, s2 = hook(info(jnp.asarray(t), s))
        scale = min(1.0, j / period)  # 0 on the first step after a relocalisation
        for k, b in out["blocks"].items():
            if _layer(k) == 1 or scale == 1.0:  # outside a re-warm: the update as it is
                np.testing.assert_array_equal(b, new["blocks"][k])
            else:
                want = prev["blocks"][k] + scale * (new["blocks"][k] - prev["blocks"][k])
                np.testing.assert_allclose(b, want, rtol=1e-6, atol=1e-7)
        assert int(s2.count) == t + 1
    # the importance EMAs of the recording layer, from zero: Ī = (1-β1) I, Ū = (1-β2) |I - Ī|
    t = 13  # (13 // 4) % 2 == 1: the second block records
    s = st._replace(count=jnp.asarray(t))
    _, _, s2 = hook(info(jnp.asarray(t), s))
    for kind in s2.imp:
        key = f"Transformer.encoderblock_1.{kind}.kernel"
        theta = m.merge(params, prev, st)
        theta = vit.kernel_as_matrix(paths.get(theta, paths.path_of(key)), paths.path_of(key))
        i_now = np.abs((xg := np.asarray(theta) * np.asarray(grads["probe"][kind])) - 0.5 * xg**2)
        np.testing.assert_allclose(s2.imp[kind], 0.15 * i_now, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(s2.unc[kind], 0.15 * np.abs(i_now - 0.15 * i_now), rtol=1e-5)


def test_relocalisation_resets_exactly_that_layers_moments_and_keeps_the_function(hook_case):
    period = 4
    m, params, tr, prev, new, grads, st, opt, hook, info = hook_case
    t = 7  # the last step of block 1's first slot
    imp = jax.tree.map(lambda v: jnp.abs(v) + 1.0, grads["probe"])
    s = st._replace(count=jnp.asarray(t), imp=imp, unc=imp)
    out, opt2, s2 = hook(info(jnp.asarray(t), s))
    # moments mirroring block 1's subnets are exactly zero; every other leaf is unchanged
    flat1 = dict(jax.tree_util.tree_flatten_with_path(opt)[0])
    hits = 0
    for p, v in jax.tree_util.tree_flatten_with_path(opt2)[0]:
        name = paths.key_to_str(p)
        if "/blocks/" in name and "encoderblock_1" in name and ("/mu/" in name or "/nu/" in name):
            assert not np.any(np.asarray(v)) and not np.any(np.signbit(np.asarray(v)))
            hits += 1
        else:
            np.testing.assert_array_equal(v, flat1[p])
    assert hits == 2 * 6  # mu and nu of the 6 matrices of block 1
    for k, b in out["blocks"].items():
        if _layer(k) == 1:
            np.testing.assert_array_equal(b, np.zeros_like(b))  # fresh block
            np.testing.assert_array_equal(s2.res_vals[k][0], new["blocks"][k])  # retired
            np.testing.assert_array_equal(s2.res_rows[k][0], st.rows[k])
            kind = k.split("encoderblock_1.")[1].removesuffix(".kernel")
            # the slot's last step is recorded before the search: the EMAs move once more
            path = paths.path_of(k)
            theta = vit.kernel_as_matrix(paths.get(m.merge(params, prev, st), path), path)
            i_now = L.importance(theta, grads["probe"][kind])
            ib = 0.85 * imp[kind] + 0.15 * i_now
            ub = 0.85 * imp[kind] + 0.15 * jnp.abs(i_now - ib)
            rows, cols = L.greedy_subnet(ib * ub, *b.shape)
            np.testing.assert_array_equal(s2.rows[k], rows)
            np.testing.assert_array_equal(s2.cols[k], cols)
        else:
            np.testing.assert_array_equal(b, new["blocks"][k])
            np.testing.assert_array_equal(s2.rows[k], st.rows[k])
    assert s2.restart.tolist() == [-period, t + 1] and s2.relocs.tolist() == [0, 1]
    assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves((s2.imp, s2.unc)))
    # the retired delta stays in the weights: relocalisation leaves the function unchanged
    before = m.merge(params, new, st)
    after = m.merge(params, out, s2)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_history_zero_keeps_the_values_at_retained_pairs():
    block = jnp.arange(6.0).reshape(2, 3) + 1
    out = L.carry_retained(
        jnp.array([1, 4]), jnp.array([0, 2, 5]), block, jnp.array([4, 7]), jnp.array([2, 3, 5])
    )
    np.testing.assert_array_equal(out, [[5.0, 0.0, 6.0], [0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tiny, source):
    model, params = tiny
    out = {}
    for name in ("losia", "losia_pro"):
        m = get_method(name, period=T, history=2)
        r = train.fit(
            model,
            params,
            m,
            source,
            TrainConfig(
                image_size=16,
                batch_size=8,
                epochs=2,
                lr=1e-2,
                progress=False,
                eval_split=None,
                warmup_epochs=0,
            ),
            hooks=lambda s: None,
        )
        out[name] = (m, r)
    return out


def test_one_trace_falling_loss_and_pro_follows_losia(runs):
    losses = {}
    for name, (_, r) in runs.items():
        res = r.results
        assert res["traces"] == 1 and res["trainable_params"] == 256  # 2 * (4*16 + 2*32)
        losses[name] = [h["train_loss"] for h in res["history"]]
        assert losses[name][-1] < 0.7 * losses[name][0]
        st = r.state.method_state
        # 64 examples / batch 8 x 2 epochs = 16 steps, T = 2, 2 blocks: block 0 relocalises
        # after steps 1, 5, 9, 13, block 1 after 3, 7, 11, 15 (the last step)
        assert st.relocs.tolist() == [4, 4] and st.restart.tolist() == [14, 16]
        assert int(st.count) == int(r.state.step) == 16
    np.testing.assert_allclose(losses["losia"], losses["losia_pro"], rtol=1e-4)


def test_engine_step_zeroed_the_last_relocalised_layers_moments(runs):
    for _, r in runs.values():
        n0 = n1 = 0
        for p, v in jax.tree_util.tree_flatten_with_path(r.state.opt_state)[0]:
            name = paths.key_to_str(p)
            if "/blocks/" in name and ("/mu/" in name or "/nu/" in name):
                if "encoderblock_1" in name:  # relocalised on the run's last step
                    assert not np.any(np.asarray(v))
                    n1 += 1
                else:
                    assert np.any(np.asarray(v))
                    n0 += 1
        assert n0 == n1 == 12
        probe_moments = [
            v
            for p, v in jax.tree_util.tree_flatten_with_path(r.state.opt_state)[0]
            if "/probe/" in paths.key_to_str(p)
        ]
        assert probe_moments and not any(np.any(np.asarray(v)) for v in probe_moments)
        assert not any(np.any(np.asarray(v)) for v in jax.tree.leaves(r.state.trainable["probe"]))


def test_artifact_round_trip_is_bitwise_and_strict(runs, tiny, tmp_path):
    model, params = tiny
    for name, (m, r) in runs.items():
        tr, st = r.state.trainable, r.state.method_state
        d = str(tmp_path / name)
        meta = artifacts.save_artifact(d, method=m, params=params, trainable=tr, state=st)
        loaded, meta2 = artifacts.load_artifact(d, params)
        assert meta2["method"] == name and meta2["hparams"]["period"] == T
        want = m.merge(params, tr, st)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
        # 2 retired + 1 current block per kernel, each with its indices
        assert meta["numbers"] == 3 * 256 + 3 * 2 * (4 * (4 + 4) + 2 * (4 + 8))
        out = forward(model, m, params, tr, st, _x())
        np.testing.assert_allclose(out, model.apply({"params": want}, _x()), rtol=1e-5, atol=1e-5)
        arrays = artifacts.arrays_of(m, params, tr, st)
        key = next(k for k in arrays if k.endswith("/rows"))
        with pytest.raises(CheckpointMismatchError, match="missing"):
            m.hooks.load(params, {k: v for k, v in arrays.items() if k != key})
        bad = dict(arrays, **{key: arrays[key] + 100})
        with pytest.raises(CheckpointMismatchError, match="out of range"):
            m.hooks.load(params, bad)
