"""GUFT: exact global top-k, OR-merge, schedule, bitwise-frozen weights, sparse == dense, one
trace across mask growth, saliency against straightforward loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_source

from guft_jax import guft, masks, paths, saliency, train, vit
from guft_jax import kernels as kernels_lib
from guft_jax.config import TrainConfig
from guft_jax.methods.base import EpochContext, forward


def _scores(seed, ties=False):
    rng = np.random.default_rng(seed)
    shapes = {"a.kernel": (5, 7), "b.bias": (13,), "c.scale": (3, 2, 4)}
    if ties:
        return {k: jnp.asarray(rng.integers(0, 4, s).astype(np.float32)) for k, s in shapes.items()}
    return {k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}


def _leaf(params, key):
    return paths.get(params, paths.path_of(key))


def _kernel_calls(tiny, m, state, name):
    """Calls of the jitted op ``name`` in the jaxpr of the method's gradient at a run's state."""
    model, params = tiny
    x = jnp.zeros((2, 16, 16, 3), jnp.float32)

    def loss(tr):
        return jnp.sum(forward(model, m, params, tr, state.method_state, x))

    return kernels_lib.count_calls(jax.make_jaxpr(jax.grad(loss))(state.trainable), name)


def _numpy_topk(scores, k, exclude=None):
    keys = sorted(scores)
    flat = np.concatenate([np.asarray(scores[key]).ravel() for key in keys])
    if exclude is not None:
        ex = np.concatenate([np.asarray(exclude[key]).ravel() for key in keys])
        flat = np.where(ex, -np.inf, flat)
    order = np.argsort(-flat, kind="stable")[:k]  # stable: lower index wins ties
    chosen = np.zeros(flat.size, bool)
    chosen[order] = True
    out, off = {}, 0
    for key in keys:
        n = np.asarray(scores[key]).size
        out[key] = chosen[off : off + n].reshape(np.shape(scores[key]))
        off += n
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [0, 1, 9, 40, 72])
def test_topk_mask_equals_numpy_argsort_reference(k, ties):
    s = _scores(k, ties)
    got = masks.topk_mask(s, k)
    ref = _numpy_topk(s, k)
    assert masks.count(got) == k
    for key in s:
        np.testing.assert_array_equal(got[key], ref[key])


@pytest.mark.parametrize("exclude_selected", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [0, 1, 9, 40, 50])
def test_round_selection_equals_topk_mask_merge(k, ties, exclude_selected):
    """The recompute's one-program global top-k (bit-by-bit threshold) picks exactly the entries
    of masks.topk_mask, ties and excluded entries included, with negative and zero scores."""
    s = {key: v - 1.5 for key, v in _scores(k + 100, ties).items()}
    s["b.bias"] = s["b.bias"].at[:3].set(jnp.array([-0.0, 0.0, jnp.nan]))
    prev = masks.topk_mask(_scores(7), 20)
    got, nonzero = guft.topk_merge_global(s, prev, k=k, exclude_selected=exclude_selected)
    new = masks.topk_mask(s, k, exclude=prev if exclude_selected else None)
    ref = masks.merge_masks(prev, new)
    assert bool(nonzero)
    for key in s:
        np.testing.assert_array_equal(got[key], ref[key])
    zeros = {key: jnp.zeros_like(v) for key, v in s.items()}
    assert not bool(guft.topk_merge_global(zeros, prev, k=k, exclude_selected=False)[1])


def test_or_merge_is_monotone_and_exclude_selected_grows_by_exactly_k():
    s1, s2 = _scores(1), _scores(2)
    m1 = masks.topk_mask(s1, 10)
    plain = masks.merge_masks(m1, masks.topk_mask(s2, 10))
    assert all(np.all(np.asarray(plain[k]) >= np.asarray(m1[k])) for k in m1)
    assert 10 <= masks.count(plain) <= 20
    new = masks.topk_mask(s1, 10, exclude=m1)  # same scores: must pick 10 *other* entries
    grown = masks.merge_masks(m1, new)
    assert masks.count(grown) == 20
    ref = _numpy_topk(s1, 10, exclude=m1)
    for k in s1:
        np.testing.assert_array_equal(new[k], ref[k])
    with pytest.raises(ValueError, match="k:"):
        masks.topk_mask(s1, 73)


def test_schedule_validation_names_the_field():
    for kw, field in (
        (dict(recompute_epochs=[1, 6], ratios=[0.1]), "guft.ratios"),
        (dict(recompute_epochs=[6, 1], ratios=[0.1, 0.1]), "guft.recompute_epochs"),
        (dict(recompute_epochs=[0], ratios=[0.1]), "guft.recompute_epochs"),
        (dict(recompute_epochs=[1], ratios=[0.0]), "guft.ratios"),
        (dict(recompute_epochs=[1, 2], ratios=[0.6, 0.6]), "guft.ratios"),
        (dict(mode="token"), "guft.mode"),
    ):
        with pytest.raises(ValueError, match=field):
            guft.guft(**kw)


def test_eligibility_regex_matching_nothing_is_an_error(tiny):
    _, params = tiny
    with pytest.raises(ValueError, match="matches no parameter"):
        masks.eligible_leaves(params, include=["nonexistent_layer"])
    e = masks.eligible_leaves(params, exclude=["LayerNorm", "pos_embedding|cls"])
    assert not any("LayerNorm" in k or "cls" == k for k in e) and "head.kernel" not in e


def _fit(tiny, method, epochs=4, wd=1e-2, log=None, **kw):
    model, params = tiny
    cfg = dict(image_size=16, batch_size=16, epochs=epochs, lr=1e-2, weight_decay=wd)
    cfg = TrainConfig(**cfg, progress=False, warmup_epochs=0, **kw)
    return train.fit(model, params, method, make_source(), cfg, hooks=log or (lambda s: None))


def test_unselected_entries_stay_bitwise_equal_under_adamw_with_weight_decay(tiny):
    model, params = tiny
    m = guft.guft(recompute_epochs=[1, 3], ratios=[0.02, 0.02], sparse=False)
    r = _fit(tiny, m, wd=0.1)
    st = r["state"]
    eff = m.merge(params, st.trainable, st.method_state)
    sel_total = 0
    for key, mask in st.method_state.selected.items():
        w0 = np.asarray(_leaf(params, key))
        w = np.asarray(_leaf(eff, key))
        mask = np.asarray(mask)
        assert np.array_equal(w[~mask].view(np.uint32), w0[~mask].view(np.uint32)), key
        sel_total += mask.sum()
        # deltas (and so Adam moments' effect) are exactly zero outside the mask
        assert np.all(np.asarray(st.trainable["delta"][key])[~mask] == 0)
    assert sel_total > 0
    moved = sum(
        int(np.sum(np.asarray(_leaf(eff, k)) != np.asarray(_leaf(params, k))))
        for k in st.method_state.selected
    )
    assert moved > 0


@pytest.mark.parametrize("block_forward", [True, False])
def test_sparse_path_follows_the_dense_reference_trajectory(tiny, block_forward):
    # both forms of the block path (kernels.block_forward); the tiny layers' blocks are taken
    kw = dict(recompute_epochs=[1, 2, 3], ratios=[0.01, 0.01, 0.01])
    choice = {"block_forward": "on" if block_forward else "off"}
    md, ms = guft.guft(sparse=False, **kw), guft.guft(sparse=True, kernels=choice, **kw)
    rd, rs = _fit(tiny, md, wd=1e-2), _fit(tiny, ms, wd=1e-2)
    ld = [h["train_loss"] for h in rd["history"]]
    ls = [h["train_loss"] for h in rs["history"]]
    np.testing.assert_allclose(ls, ld, rtol=1e-5)
    _, params = tiny
    pd = md.merge(params, rd["state"].trainable, rd["state"].method_state)
    ps = ms.merge(params, rs["state"].trainable, rs["state"].method_state)
    for a, b in zip(jax.tree.leaves(pd), jax.tree.leaves(ps), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert guft.selected_counts(rd["state"].method_state) == guft.selected_counts(
        rs["state"].method_state
    )


def test_blocks_are_exactly_the_selected_rows_and_columns_and_are_used(tiny):
    """The sparse path's per-kernel block holds the sorted unique rows / columns of the selected
    entries (padded with in / out), and the step takes the weight gradient through it where it is
    small: the trajectory test above then checks it against the dense reference."""
    m = guft.guft(recompute_epochs=[1, 2, 3], ratios=[0.01] * 3)
    run = _fit(tiny, m)["state"]
    st = run.method_state
    _, params = tiny
    kernels = [k for k in st.selected if k.endswith(".kernel")]
    assert kernels and sorted(st.blocks) == sorted(kernels)
    for k in kernels:
        n_in, n_out = guft.store_dims(k, _leaf(params, k).shape)
        idx = np.asarray(st.selected[k])[: int(st.count[k])]
        br, bc = (np.asarray(st.blocks[k][f]) for f in ("rows", "cols"))
        ur, uc = np.unique(idx // n_out), np.unique(idx % n_out)
        assert br[: len(ur)].tolist() == ur.tolist() and np.all(br[len(ur) :] == n_in), k
        assert bc[: len(uc)].tolist() == uc.tolist() and np.all(bc[len(uc) :] == n_out), k
    # traced through the block SDDMM for at least one layer
    assert _kernel_calls(tiny, m, run, "block_sddmm") > 0


def test_blocks_off_keeps_no_blocks_and_never_takes_the_block_path(tiny):
    kw = dict(recompute_epochs=[1, 2, 3], ratios=[0.01] * 3)
    m = guft.guft(blocks=False, **kw)
    r = _fit(tiny, m)
    calls = _kernel_calls(tiny, m, r["state"], "block_sddmm")
    assert r["state"].method_state.blocks == {} and not calls
    d = _fit(tiny, guft.guft(sparse=False, **kw))
    np.testing.assert_allclose(
        [h["train_loss"] for h in r["history"]], [h["train_loss"] for h in d["history"]], rtol=1e-5
    )


def test_resize_adopts_the_checkpoints_grown_entry_and_block_capacities(tiny):
    """What a resumed run does before restoring: shapes (entries, moments, blocks) from the
    checkpoint's stored structure, which the strict restore then fills."""
    from guft_jax import checkpoint

    _, params = tiny
    m = guft.guft(recompute_epochs=[1, 2, 3], ratios=[0.01] * 3, capacity_floor=2)
    done = _fit(tiny, m)["state"]
    fresh_tr = m.init(jax.random.PRNGKey(0), params)
    tx = optax.adam(1e-3)
    fresh = done._replace(
        trainable=fresh_tr,
        opt_state=tx.init(fresh_tr),
        method_state=m.hooks.init_state(params, fresh_tr),
    )
    structure = checkpoint.describe(done._replace(opt_state=tx.init(done.trainable)))
    tr, opt, ms = m.hooks.resize(fresh.trainable, fresh.opt_state, fresh.method_state, structure)
    got = checkpoint.describe(fresh._replace(trainable=tr, opt_state=opt, method_state=ms))
    assert got == structure
    grown = [k for k, b in done.method_state.blocks.items()
             if b["rows"].shape[0] > 2 or b["cols"].shape[0] > 2]  # fmt: skip
    assert grown and all(ms.blocks[k]["rows"].shape == done.method_state.blocks[k]["rows"].shape
                         for k in grown)  # fmt: skip


def test_train_step_is_traced_once_across_mask_growth(tiny):
    dense = guft.guft(recompute_epochs=[1, 2, 3], ratios=[0.01] * 3, sparse=False)
    assert _fit(tiny, dense)["traces"] == 1
    # sparse: capacities that hold every later round -> growing the mask never retraces
    sparse = guft.guft(recompute_epochs=[1, 2, 3], ratios=[0.01] * 3, capacity_floor=10**6)
    r = _fit(tiny, sparse)
    assert r["traces"] == 1
    assert int(r["state"].method_state.round) == 3


def test_shipped_guft_run_compiles_its_train_step_once(tiny):
    """The registry's GUFT (its shipped kwargs, the auto schedule: 3 rounds) traces the step once:
    entry and block capacities are sized for the whole schedule at the first round."""
    from guft_jax.methods import get_method, spec

    m = get_method("guft", **spec("guft").defaults.kwargs)
    lines = []
    r = _fit(tiny, m, epochs=6, log=lines.append)
    st = r["state"].method_state
    assert r["traces"] == 1 and int(st.round) == 3
    _, params = tiny
    e = masks.eligible_leaves(params, preset="blocks")
    n = sum(int(np.prod(_leaf(params, k).shape)) for k in st.selected)
    ks = [masks.budget(x, n) for x in spec("guft").defaults.kwargs["ratios"]]
    assert sum(int(c) for c in st.count.values()) > ks[0]  # later rounds added entries
    assert len(st.selected) == len(e)
    assert not any("one retrace" in s for s in lines)


def test_capacities_hold_the_whole_schedule_from_the_first_round(tiny):
    """After round 1 each tensor's capacity is min(size, c1 + K - k1, max(floor, 2·c1·K/k1,
    2·K·size/N)) (slack 2) and never changes again; the final counts fit."""
    _, params = tiny
    m = guft.guft(recompute_epochs=[1], ratios=[0.01], capacity_floor=1)
    one = _fit(tiny, m, epochs=1)["state"]
    m3 = guft.guft(recompute_epochs=[1, 2, 3], ratios=[0.01] * 3, capacity_floor=1)
    lines = []
    three = _fit(tiny, m3, log=lines.append)
    sizes = {k: int(np.prod(_leaf(params, k).shape)) for k in one.method_state.selected}
    n = sum(sizes.values())
    k = masks.budget(0.01, n)
    for key, c1 in one.method_state.count.items():
        c1, size = int(c1), sizes[key]
        want = max(1, -(-2 * c1 * 3 * k // k), -(-2 * 3 * k * size // n))
        cap = three["state"].trainable["delta"][key].shape[0]
        assert cap == max(c1, min(size, c1 + 2 * k, want)), key
        assert int(three["state"].method_state.count[key]) <= cap
    assert three["traces"] == 1 and not any("one retrace" in s for s in lines)


def test_an_outgrown_block_switches_to_the_block_free_sddmm_without_a_retrace(tiny):
    """Blocks sized to the first round exactly: later rounds outgrow them, the step takes the
    block-free weight gradient there (lax.cond), stays on the dense reference's trajectory and
    traces once."""
    kw = dict(recompute_epochs=[1, 2, 3], ratios=[0.02] * 3)
    lines = []
    # block_slack=0 and capacity_floor=1: each block holds exactly the first round's rows/columns
    ms = guft.guft(block_slack=0.0, capacity_floor=1, **kw)
    rs = _fit(tiny, ms, log=lines.append)
    covers = _kernel_calls(tiny, ms, rs["state"], "block_covers")
    assert covers  # the run-time switch was traced for at least one layer
    rd = _fit(tiny, guft.guft(sparse=False, **kw))
    assert any("outgrew their blocks" in s for s in lines) and rs["traces"] == 1
    np.testing.assert_allclose(
        [h["train_loss"] for h in rs["history"]],
        [h["train_loss"] for h in rd["history"]],
        rtol=1e-5,
    )


def test_block_capacity_is_sized_for_the_schedule_and_stays_where_the_block_pays():
    assert guft.block_capacity((10, 4), (384, 384), 1.0, floor=1) == (15, 6)
    assert guft.block_capacity((10, 4), (384, 384), 4.0, floor=1) == (30, 12)
    assert guft.block_capacity((0, 0), (384, 384), 3.0) == (16, 16)
    # (384, 260) would pass half the matrix: both scaled by one factor, not below the need
    r, c = guft.block_capacity((150, 100), (384, 384), 3.0)
    assert r * c <= kernels_lib.BLOCK_MAX_FRACTION * 384 * 384 and r >= 150 and c >= 100
    assert abs(r / c - 384 / 260) < 0.02


def test_sparse_optimizer_state_scales_with_the_budget():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), p)
    m = guft.guft(eligible="all")
    tr = m.init(jax.random.PRNGKey(0), params)
    # before the first recompute: capacity_floor per eligible tensor
    n = sum(x.size for x in jax.tree.leaves(tr["delta"]))
    assert n == 16 * len(masks.eligible_leaves(params))


def _per_example_loss(model):
    def f(theta, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": theta}, x), y)

    return f


def test_saliency_batch_mode_equals_a_straightforward_loop(tiny):
    model, params = tiny
    params = dict(params, head=jax.tree.map(lambda x: x + 0.1, params["head"]))
    src = make_source(n_train=40, n_val=0)
    f = _per_example_loss(model)
    batches = list(src.batches("train800", batch_size=16, image_size=16))  # 16, 16, 8
    g, info = saliency.compute(f, params, batches, mode="batch")
    ref = jax.tree.map(jnp.zeros_like, params)
    for x, y in batches:
        gb = jax.grad(lambda p, x=x, y=y: jnp.mean(f(p, x, y)))(params)
        ref = jax.tree.map(lambda a, b: a + jnp.abs(b), ref, gb)
    assert info["num_examples"] == 40 and info["batch_size"] == 16
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_saliency_example_mode_equals_per_example_sum(tiny):
    model, params = tiny
    params = dict(params, head=jax.tree.map(lambda x: x + 0.1, params["head"]))
    src = make_source(n_train=12, n_val=0)
    f = _per_example_loss(model)
    batches = list(src.batches("train800", batch_size=8, image_size=16))  # 8, 4
    g, _ = saliency.compute(f, params, batches, mode="example", chunk=4)
    ref = jax.tree.map(jnp.zeros_like, params)
    for x, y in batches:
        for i in range(len(x)):
            gi = jax.grad(lambda p, i=i, x=x, y=y: f(p, x[i : i + 1], y[i : i + 1])[0])(params)
            ref = jax.tree.map(lambda a, b: a + jnp.abs(b), ref, gi)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_recompute_logs_density_and_records_history(tiny):
    model, params = tiny
    zero_head_logs = []
    params = dict(params, head=jax.tree.map(lambda x: x + 0.1, params["head"]))
    m = guft.guft(recompute_epochs=[1], ratios=[0.05], eligible="all")
    tr = m.init(jax.random.PRNGKey(0), params)
    st = m.hooks.init_state(params, tr)
    logs = []
    src = make_source()
    loss = jax.jit(_per_example_loss(model))
    ctx = EpochContext(
        params,
        tr,
        optax.adam(1e-3).init(tr),
        st,
        lambda v, x, y: loss(v["params"], x, y),
        lambda: src.batches("train800val200", batch_size=16, image_size=16),
        logs.append,
    )
    tr2, _, st2 = m.hooks.epoch_start(1, ctx)
    n = sum(np.prod(s) for s in masks.eligible_leaves(params).values())
    k = round(0.05 * n)
    assert sum(guft.selected_counts(st2).values()) == k
    assert int(st2.history["k"][0]) == k and int(st2.history["batch_size"][0]) == 16
    assert "selected" in logs[-1] and "%" in logs[-1]
    assert not any("WARNING" in line for line in logs)
    # a zero-initialised head gives the backbone no gradient: without the head warm-up the
    # recompute is an error; with it (the default) saliency goes through a fitted head
    zp = dict(params, head=jax.tree.map(jnp.zeros_like, params["head"]))
    ztr = m.init(jax.random.PRNGKey(0), zp)
    zctx = ctx._replace(
        params=zp, trainable=ztr, state=m.hooks.init_state(zp, ztr), log=zero_head_logs.append
    )
    cold = guft.guft(recompute_epochs=[1], ratios=[0.05], eligible="all", head_warmup=False)
    with pytest.raises(ValueError, match="scores are zero"):
        cold.hooks.epoch_start(1, zctx)
    _, _, zst = m.hooks.epoch_start(1, zctx)
    assert any("fitted head" in line for line in zero_head_logs)
    assert sum(guft.selected_counts(zst).values()) == k
    assert np.all(np.asarray(ztr["head"]["kernel"]) == 0)  # the run's own head is untouched
    same = m.hooks.epoch_start(2, ctx._replace(trainable=tr2, state=st2))
    assert same[2] is st2  # not a recompute epoch: unchanged


def test_selection_equals_the_mask_recomputed_from_the_scores(tiny, tmp_path):
    from guft_jax import artifacts, paths

    model, params = tiny
    params = dict(params, head=jax.tree.map(lambda x: x + 0.1, params["head"]))
    m = guft.guft(recompute_epochs=[1], ratios=[0.03])
    tr = m.init(jax.random.PRNGKey(0), params)
    st = m.hooks.init_state(params, tr)
    src = make_source()
    loss = jax.jit(_per_example_loss(model))
    ctx = EpochContext(
        params,
        tr,
        optax.adam(1e-3).init(tr),
        st,
        lambda v, x, y: loss(v["params"], x, y),
        lambda: src.batches("train800val200", batch_size=16, image_size=16),
        lambda s: None,
    )
    tr2, _, st2 = m.hooks.epoch_start(1, ctx)
    eligible = masks.eligible_leaves(params, preset="blocks")
    scores, _ = guft.saliency_scores(ctx, eligible, params, score="guft", mode="batch", chunk=8)
    n = sum(np.prod(s) for s in eligible.values())
    ref = masks.topk_mask(scores, round(0.03 * n))
    sel = guft.selection(st2, params)
    assert sorted(paths.leaf_paths(sel)) == sorted(paths.path_of(k) for k in ref)
    for k, want in ref.items():
        np.testing.assert_array_equal(paths.get(sel, paths.path_of(k)), np.asarray(want))
    idx = guft.selected_indices(st2)
    assert all(
        np.array_equal(np.flatnonzero(np.asarray(ref[paths.key_of(p)])), i) for p, i in idx.items()
    )
    tr2 = dict(tr2, delta=jax.tree.map(lambda v: v + 0.01, tr2["delta"]))
    arrays = artifacts.arrays_of(m, params, tr2, st2)
    stored = {k[len("guft/") : -len("/indices")] for k in arrays if k.endswith("/indices")}
    assert stored == {p for p, i in idx.items() if len(i)}


@pytest.mark.parametrize(
    "kw",
    [
        dict(allocation="per_tensor"),
        dict(allocation="per_row", exclude_selected=True),
        dict(eligible="all", normalize="mean"),
    ],
)
def test_every_selection_option_keeps_unselected_entries_bitwise(kw, tiny):
    model, params = tiny
    m = guft.guft(recompute_epochs=[1, 2], ratios=[0.02, 0.02], sparse=False, **kw)
    r = _fit(tiny, m, epochs=2, wd=0.1)
    st = r["state"]
    eff = m.merge(params, st.trainable, st.method_state)
    n = sum(np.prod(np.shape(v)) for v in st.method_state.selected.values())
    total = 0
    for key, mask in st.method_state.selected.items():
        w0 = np.asarray(_leaf(params, key))
        w = np.asarray(_leaf(eff, key))
        mask = np.asarray(mask)
        assert np.array_equal(w[~mask].view(np.uint32), w0[~mask].view(np.uint32)), key
        total += int(mask.sum())
    k = round(0.02 * n)
    assert (total == 2 * k) if kw.get("exclude_selected") else (k <= total <= 2 * k)
