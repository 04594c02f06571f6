"""GPS: exactly K connections per output neuron (numpy oracle, with ties), the selection against
straightforward gradient sums, the budget derivation and closed-form counts on ViT-B/16, frozen
entries bitwise under AdamW, merge == apply, artifact round trip, one trace."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest
from test_shira import batch_grads, batches, check_engine_run, kernels, select_once, with_head

from guft_jax import artifacts, guft, masks, paths, vit
from guft_jax.methods import forward, get_method
from guft_jax.methods.report import count_trainable

BLOCK = ("query", "key", "value", "out", "Dense_0", "Dense_1")


def numpy_per_neuron(score: np.ndarray, k: int) -> np.ndarray:
    """The tie rule, in numpy: per output neuron (column of the ``(d_in, d_out)`` view) the ``k``
    largest scores, NaN lowest, -0.0 == 0.0, ties to the lower input index (stable sort)."""
    s = np.where(np.isnan(score), -np.inf, score.astype(np.float64))
    s = s + 0.0  # -0.0 -> 0.0
    out = np.zeros(s.shape, bool)
    for j in range(s.shape[1]):
        out[np.argsort(-s[:, j], kind="stable")[:k], j] = True
    return out


@pytest.mark.parametrize("k", [1, 2, 5])
def test_exactly_k_per_output_neuron_with_ties(k):
    rng = np.random.default_rng(k)
    views = {"a.kernel": (6, 4), "b.kernel": (9, 3), "c.kernel": (5, 7)}
    scores = {}
    for key, (d_in, d_out) in views.items():
        s = rng.integers(0, 3, (d_in, d_out)).astype(np.float32)  # many ties
        s[0, 0], s[1, 0], s[2, 1] = np.nan, -0.0, 0.0
        scores[key] = jnp.asarray(s)
    quotas = {key: k * d_out for key, (_, d_out) in views.items()}
    got = masks.topk_mask(
        scores, sum(quotas.values()), allocation="per_row", quotas=quotas, row_dims=views
    )
    for key, s in scores.items():
        m = np.asarray(got[key])
        assert (m.sum(axis=0) == k).all()
        np.testing.assert_array_equal(m, numpy_per_neuron(np.asarray(s), k))


def test_selection_is_the_top_k_gradient_sums_per_neuron(tiny):
    model, params = tiny
    params = with_head(params)
    data = batches()
    grads = batch_grads(model, params, data, names=BLOCK)
    _, st = select_once(model, params, get_method("gps", k=2), data)
    idx = guft.selected_indices(st)
    w0 = kernels(params, BLOCK)
    assert sorted(idx) == sorted(w0) and len(w0) == 12
    for p in w0:
        d_in, d_out = masks.row_view(paths.key_of(p), paths.get(params, p).shape)
        g = sum(np.abs(gr[p]) for gr in grads).reshape(d_in, d_out)
        m = np.zeros(d_in * d_out, bool)
        m[idx[p]] = True
        m = m.reshape(d_in, d_out)
        assert (m.sum(axis=0) == 2).all(), p  # exactly K per output neuron
        # the chosen are the column's largest sums (up to float32 summation-order noise)
        low = np.where(m, g, np.inf).min(axis=0)
        high = np.where(m, -np.inf, g).max(axis=0)
        assert (low >= high * (1 - 1e-5)).all(), p


def test_identity_at_init_after_selection(tiny):
    model, params = tiny
    m = get_method("gps", k=2)
    tr, st = select_once(model, params, m, batches())
    assert sum(int(c) for c in st.count.values()) == 2 * 2 * (4 * 32 + 64 + 32)
    # capacity = K·d_out per kernel: values (and optimizer state) only for the selected entries
    want = {k: (2 * (64 if "Dense_0" in k else 32),) for k in tr["delta"]}
    assert {k: v.shape for k, v in tr["delta"].items()} == want
    x = mc.images()
    np.testing.assert_array_equal(
        forward(model, m, params, tr, st, x, features=True),
        model.apply({"params": params}, x, features=True),
    )


def test_budget_matches_guft_default_and_counts_on_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    n_elig = sum(np.prod(s) for s in masks.eligible_leaves(p, preset="blocks").values())
    assert n_elig == 12 * 7_084_800 == 85_017_600
    guft_budget = 3 * masks.budget(0.001, n_elig)
    assert guft_budget == 255_054
    neurons = 12 * (4 * 768 + 3072 + 768)
    assert neurons == 82_944 and round(guft_budget / neurons) == 3
    assert mc.vit_b16_count("gps") == 3 * neurons == 248_832  # default k=3
    assert mc.vit_b16_count("gps", k=1) == neurons
    # GPS is not in PEFT 0.17.1: no PEFT count to compare with.


def test_frozen_entries_bitwise_merge_equals_apply_one_trace(tiny, source):
    model, params = tiny
    sel = check_engine_run(model, params, get_method("gps", k=1), source)
    for p in kernels(params, BLOCK):
        m = np.asarray(paths.get(sel, p))
        d_in, d_out = masks.row_view(paths.key_of(p), m.shape)
        assert (m.reshape(d_in, d_out).sum(axis=0) == 1).all(), p


def test_artifact_round_trip(tiny, tmp_path):
    model, params = tiny
    m = get_method("gps", k=2)
    tr, st = select_once(model, params, m, batches())
    tr = mc.perturb(tr)
    meta = artifacts.save_artifact(
        str(tmp_path / "a"), method=m, params=params, trainable=tr, state=st, base_id="tiny"
    )
    n = count_trainable(m, params, tr, st)[0]
    # per block: 2 × (4·32 + 64 + 32) output neurons; stored as indices and values
    assert n == 2 * 2 * (4 * 32 + 64 + 32) and meta["numbers"] == 2 * n
    merged, meta2 = artifacts.load_artifact(str(tmp_path / "a"), params)
    assert meta2["method"] == "gps" and meta2["hparams"]["k"] == 2
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m.merge(params, tr, st)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_name_the_field(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"gps\.k: must be >= 1"):
        get_method("gps", k=0)
    with pytest.raises(ValueError, match=r"gps\.mode: 'pooled' not in"):
        get_method("gps", mode="pooled")
    with pytest.raises(ValueError, match=r"gps\.targets"):
        get_method("gps", targets=["nothing_matches$"]).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"gps\.k: 33 selects more than"):  # query: d_in = 32
        select_once(model, params, get_method("gps", k=33), batches())
