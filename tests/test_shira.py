"""SHiRA: every mask type against its definition (numpy oracles for weight magnitude, gradient
and SNIP; the random mask is PEFT's ``randperm[:n]`` from the seed), exact per-tensor counts,
identity at init, merge == apply, frozen entries bitwise under AdamW, closed-form counts on
ViT-B/16, artifact round trip, one trace."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import optax
import pytest
from conftest import make_source

from guft_jax import artifacts, guft, masks, paths
from guft_jax.methods import forward, get_method
from guft_jax.methods.base import EpochContext, init_state
from guft_jax.methods.report import count_trainable

QV = ("query", "value")


_LOSS: dict = {}


def loss_fn(model):
    """Per-example losses ``(variables, x, y) -> (B,)``, one function per model: GUFT caches its
    saliency program by this function, so the tests share one compile."""
    if id(model) not in _LOSS:
        f = jax.jit(
            lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, x), y
            )
        )
        _LOSS[id(model)] = lambda v, x, y: f(v["params"], x, y)
    return _LOSS[id(model)]


def batches(n_train=32):
    """Two full batches of 16 (no padding: the oracles sum plain batch gradients)."""
    src = make_source(n_train=n_train, n_val=0)
    return list(src.batches("train800", batch_size=16, image_size=16))


def with_head(params):
    """A random head: the backbone gets a gradient without GUFT's head warm-up (a constant head
    gives every class the same logit and the backbone an exactly zero gradient)."""
    return dict(params, head=mc.perturb(params["head"], seed=2, scale=0.5))


def select_once(model, params, m, data):
    """Runs the method's epoch-1 selection; returns ``(trainable, state)``."""
    tr = m.init(jax.random.key(0), params)
    st = init_state(m, params, tr)
    ctx = EpochContext(
        params, tr, optax.adamw(1e-3).init(tr), st, loss_fn(model), lambda: iter(data), print
    )
    tr, _, st = m.hooks.epoch_start(1, ctx)
    return tr, st


def kernels(params, names=QV):
    return {
        p: np.asarray(paths.get(params, p)).reshape(-1)
        for p in paths.leaf_paths(params)
        if p.endswith("kernel") and p.split("/")[-2] in names
    }


def batch_grads(model, params, data, names=QV):
    """Per batch, the gradient of the batch-mean loss w.r.t. each targeted kernel (flat)."""
    f = loss_fn(model)
    mean_loss = lambda p, x, y: jnp.mean(f({"params": p}, x, np.asarray(y, np.int32)))
    out = []
    for x, y in data:
        g = jax.grad(mean_loss)(params, x, y)
        out.append({p: np.asarray(v, np.float64) for p, v in kernels(g, names).items()})
    return out


def assert_top(selected: np.ndarray, score: np.ndarray, q: int, rtol=1e-5):
    """``selected`` (flat indices) are ``q`` entries of ``score`` that no unselected entry beats
    (beyond float32 accumulation-order noise ``rtol``): a top-``q`` set of the oracle score."""
    assert len(selected) == len(np.unique(selected)) == q
    rest = np.setdiff1d(np.arange(score.size), selected)
    assert score[selected].min() >= score[rest].max() * (1 - rtol)


def test_random_mask_is_peft_randperm_from_the_seed(tiny):
    model, params = tiny
    picked = {}
    for seed in (3, 3, 4):
        m = get_method("shira", r=2, mask_type="random", random_seed=seed)
        _, st = select_once(model, params, m, batches())
        picked.setdefault(seed, []).append(guft.selected_indices(st))
    a, b = picked[3]
    assert all(np.array_equal(a[p], b[p]) for p in a)  # reproducible from the seed
    assert any(not np.array_equal(a[p], picked[4][0][p]) for p in a)  # and the seed matters
    for i, (p, w) in enumerate(sorted(kernels(params).items())):
        q = 2 * (32 + 32)  # r·(d_in + d_out)
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(3), i), w.size))
        np.testing.assert_array_equal(a[p], np.sort(perm[:q]))


def test_weight_magnitude_mask_is_the_top_abs_w0(tiny):
    model, params = tiny
    m = get_method("shira", r=3, mask_type="weight_magnitude")
    _, st = select_once(model, params, m, batches())
    idx = guft.selected_indices(st)
    for p, w in kernels(params).items():
        q = 3 * 64
        want = np.sort(np.argsort(-np.abs(w), kind="stable")[:q])  # ties: lower index
        np.testing.assert_array_equal(idx[p], want)


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
def test_gradient_and_snip_masks_match_their_definitions(tiny, mask_type):
    model, params = tiny
    params = with_head(params)
    data = batches()
    grads = batch_grads(model, params, data)
    w0 = kernels(params)
    if mask_type == "gradient":  # Σ_batches |∇ batch-mean loss|
        oracle = {p: sum(np.abs(g[p]) for g in grads) for p in w0}
    else:  # SNIP: |W0 ⊙ ∇| on the first batch
        oracle = {p: np.abs(w0[p] * grads[0][p]) for p in w0}
    m = get_method("shira", r=2, mask_type=mask_type)
    _, st = select_once(model, params, m, data)
    idx = guft.selected_indices(st)
    assert sorted(idx) == sorted(w0)
    for p in w0:
        assert_top(idx[p], oracle[p], 2 * 64)


def check_engine_run(model, params, m, source):
    """``train.fit`` (AdamW, one trace, loss falls, base untouched); then merged − base is
    exactly zero outside the selection and nonzero on most selected entries, and the
    intercepted forward equals the merged params' within 1e-6. Returns the selection."""
    r = mc.trains_in_one_trace(model, params, m, source)
    st, tr = r.state.method_state, r.state.trainable
    merged = m.merge(params, tr, st)
    sel = guft.selection(st, params)
    chosen = set(paths.leaf_paths(sel))
    for p in paths.leaf_paths(params):
        if p.startswith("head/"):
            continue
        d = np.asarray(paths.get(merged, p)) - np.asarray(paths.get(params, p))
        inside = np.asarray(paths.get(sel, p)) if p in chosen else np.zeros(d.shape, bool)
        assert not np.any(d[~inside]), p  # bitwise equal outside the selection
        assert np.count_nonzero(d[inside]) >= 0.9 * inside.sum(), p  # the selection trained
    # apply + the interceptor (the sparse path multiplies kernels through it) == merged params
    a = forward(model, m, params, tr, st, mc.images())
    b = model.apply({"params": merged}, mc.images())
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    return sel


def test_frozen_entries_bitwise_and_merge_equals_apply(tiny, source):
    model, params = tiny
    m = get_method("shira", r=2, mask_type="weight_magnitude")
    sel = check_engine_run(model, params, m, source)
    assert sorted(paths.leaf_paths(sel)) == sorted(kernels(params))
    assert all(int(np.sum(paths.get(sel, p))) == 128 for p in kernels(params))


def test_identity_at_init_and_gradients_only_at_selected(tiny):
    model, params = tiny
    m = get_method("shira", r=2, mask_type="random")
    tr, st = select_once(model, params, m, batches())
    x = mc.images()
    np.testing.assert_array_equal(
        forward(model, m, params, tr, st, x, features=True),
        model.apply({"params": params}, x, features=True),
    )
    # the only backbone leaves that train are the selected values: one per selected entry
    assert set(tr) == {"head", "delta"}
    assert {k: int(st.count[k]) for k in tr["delta"]} == {k: 128 for k in tr["delta"]}
    # the sparse store holds exactly the selected entries (no spare capacity: one known round)
    assert {k: v.shape for k, v in tr["delta"].items()} == {k: (128,) for k in tr["delta"]}
    g = jax.grad(lambda t: jnp.sum(forward(model, m, params, t, st, x) ** 2))(mc.perturb(tr))
    for k, v in g["delta"].items():
        assert np.all(np.asarray(v) != 0), k


def test_dense_reference_path_selects_the_same_entries(tiny):
    model, params = tiny
    got = []
    for sparse in (True, False):
        m = get_method("shira", r=2, mask_type="weight_magnitude", sparse=sparse)
        tr, st = select_once(model, params, m, batches(16))
        got.append(guft.selected_indices(st))
        tr = mc.perturb(tr)  # dense path: δ outside the mask is never applied
        merged = m.merge(params, tr, st)
        np.testing.assert_allclose(
            forward(model, m, params, tr, st, mc.images()),
            model.apply({"params": merged}, mc.images()),
            rtol=1e-6,
            atol=1e-6,
        )
    assert sorted(got[0]) == sorted(got[1])
    assert all(np.array_equal(got[0][p], got[1][p]) for p in got[0])


def test_counts_on_vit_b16():
    # PEFT: ShiraConfig(r=8, target_modules=["query", "value"]) on ViT-B/16 trains
    # r·(768 + 768) = 12,288 entries in each of 24 Linears (update_layer's num_shira_weight).
    assert mc.vit_b16_count("shira", r=8) == 24 * 8 * (768 + 768) == 294_912
    assert mc.vit_b16_count("shira", r=32) == 24 * 32 * 1536 == 1_179_648  # PEFT's default r
    assert mc.vit_b16_count("shira", r=8, targets=[r"MlpBlock_3/Dense_0/kernel$"]) == 12 * 8 * (
        768 + 3072
    )


def test_artifact_round_trip(tiny, tmp_path):
    model, params = tiny
    m = get_method("shira", r=2, mask_type="random", random_seed=5)
    tr, st = select_once(model, params, m, batches())
    tr = mc.perturb(tr)
    meta = artifacts.save_artifact(
        str(tmp_path / "a"), method=m, params=params, trainable=tr, state=st, base_id="tiny"
    )
    n = count_trainable(m, params, tr, st)[0]
    assert n == 4 * 128 and meta["numbers"] == 2 * n  # GUFT's format: indices and values
    assert meta["hparams"]["mask_type"] == "random" and meta["hparams"]["random_seed"] == 5
    merged, meta2 = artifacts.load_artifact(str(tmp_path / "a"), params)
    assert meta2["method"] == "shira"
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m.merge(params, tr, st)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_name_the_field(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"shira\.mask_type: 'struct' not in"):
        get_method("shira", mask_type="struct")
    with pytest.raises(ValueError, match=r"shira\.r: must be >= 1"):
        get_method("shira", r=0)
    with pytest.raises(ValueError, match=r"shira\.targets"):
        get_method("shira", targets=["nothing_matches$"]).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"shira\.r: 17 selects more than"):  # 17·64 > 32·32
        select_once(model, params, get_method("shira", r=17, mask_type="random"), batches())


def test_quotas_in_topk_mask_are_checked():
    s = {"a": jnp.arange(6.0), "b": jnp.arange(4.0)}
    got = masks.topk_mask(s, 3, allocation="per_tensor", quotas={"a": 1, "b": 2})
    assert got["a"].tolist() == [False] * 5 + [True] and got["b"].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="quotas: must sum to k"):
        masks.topk_mask(s, 4, allocation="per_tensor", quotas={"a": 1, "b": 2})
    with pytest.raises(ValueError, match="quotas: need allocation"):
        masks.topk_mask(s, 3, quotas={"a": 1, "b": 2})
    with pytest.raises(ValueError, match=r"quotas: each must be in \[0, selectable"):
        masks.topk_mask(s, 5, allocation="per_tensor", quotas={"a": 0, "b": 5})
