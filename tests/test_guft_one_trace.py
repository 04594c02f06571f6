"""GUFT's whole run traces its train step once: the sparse store's capacities are sized for the
whole schedule at the first round (issue 28), and a schedule whose later rounds move into a tensor
the first round left empty fits without growth, with the selection and losses unchanged."""

import math

import jax
import numpy as np
from method_checks import tiny_config

from guft_jax import guft, masks, train
from guft_jax.guft.capacity import whole_budget_counts
from guft_jax.methods import get_method, spec


def _recorded(method, shapes: list):
    """The method with each ``epoch_start`` recording the store's shapes after it (entries and
    blocks), so a test sees that no later round changes one."""
    hook = method.hooks.epoch_start

    def rec(epoch, ctx):
        out = hook(epoch, ctx)
        tr, _, st = out
        shapes.append(jax.tree.map(np.shape, (tr["delta"], st.selected, st.blocks)))
        return out

    return method._replace(hooks=method.hooks._replace(epoch_start=rec))


def _fit(tiny, source, method, lines, epochs=3):
    model, params = tiny
    return train.fit(model, params, method, source, tiny_config(epochs=epochs), hooks=lines.append)


def test_shipped_guft_run_compiles_its_train_step_once(tiny, source):
    """The registered GUFT with its shipped kwargs (auto schedule: 3 rounds in 3 epochs) traces
    its step once, and no round after the first changes a shape of the store."""
    d = spec("guft").defaults
    m = get_method("guft", **d.kwargs)
    assert m.hparams["sparse"] and m.hparams["capacity_estimate"] == "ranking"
    shapes, lines = [], []
    r = _fit(tiny, source, _recorded(m, shapes), lines)
    st = r["state"].method_state
    assert r["traces"] == 1 and int(st.round) == len(d.kwargs["ratios"]) == 3
    assert len(shapes) == 3 and shapes[1] == shapes[0] and shapes[2] == shapes[0]
    assert not any("one retrace" in s for s in lines)
    assert sum(int(c) for c in st.count.values()) > int(st.history["k"][0])  # later rounds added


def _moving_saliency(tiny, ratio: float):
    """A ``saliency_fn`` whose later rounds move into one kernel ``t`` that the first round
    leaves empty: round 1 ranks 2k entries ``s`` of ``t`` just below the other tensors' top k
    (so its top k holds none of them, its top 3k all), round 2 puts ``s[:k]`` on top, round 3
    ``s[k:]``. Returns ``(fn, t, k)``."""
    _, params = tiny
    eligible = masks.eligible_leaves(params, preset="blocks")
    n = sum(math.prod(s) for s in eligible.values())
    k = masks.budget(ratio, n)
    t = max(sorted(eligible), key=lambda key: math.prod(eligible[key]))
    assert 2 * k <= math.prod(eligible[t]) and 3 * math.prod(eligible[t]) < n  # the case holds
    rng = np.random.default_rng(0)
    base = {key: rng.uniform(0.0, 1.0, s).astype(np.float32) for key, s in eligible.items()}
    others = np.concatenate([v.ravel() for key, v in base.items() if key != t])
    kth = np.partition(others, others.size - k)[others.size - k]

    def fn(ctx, elig, dense, **kw):
        i = int(ctx.state.round)
        out = dict(base)
        flat = 0.5 * base[t].ravel() * kth  # below every other tensor's top k
        flat[: 2 * k] = np.nextafter(kth, np.float32(0)) if i == 0 else 0.0
        if i > 0:
            flat[(i - 1) * k : i * k] = 2.0
        out[t] = flat.reshape(base[t].shape)
        return {key: jax.numpy.asarray(v) for key, v in out.items()}, {}

    return fn, t, k


def test_later_rounds_that_outgrew_the_first_rounds_split_fit_without_a_retrace(tiny, source):
    """Three rounds whose last two select only inside a kernel the first round left empty: sized
    for the first round's split (``capacity_estimate="split"``) that kernel grows at round 2 (a
    second trace); sized for the first round's ranking of the whole budget (the registered
    default) it holds every round, one trace, the same selection and the same losses."""
    fn, t, k = _moving_saliency(tiny, 0.02)
    kw = dict(recompute_epochs=[1, 2, 3], ratios=[0.02] * 3, saliency_fn=fn)
    runs = {}
    for est in ("split", "ranking"):
        shapes, lines = [], []
        m = _recorded(guft.guft(capacity_estimate=est, **kw), shapes)
        runs[est] = (_fit(tiny, source, m, lines), shapes, lines)
    (split, s_shapes, s_lines), (rank, r_shapes, r_lines) = runs["split"], runs["ranking"]
    assert split["traces"] == 2 and any("one retrace" in s and t in s for s in s_lines)
    assert s_shapes[-1] != s_shapes[0]
    assert rank["traces"] == 1 and not any("one retrace" in s for s in r_lines)
    assert r_shapes[1] == r_shapes[0] == r_shapes[2]
    a, b = split["state"].method_state, rank["state"].method_state
    assert int(a.count[t]) == int(b.count[t]) == 2 * k  # every later entry landed in t
    assert rank["state"].trainable["delta"][t].shape[0] == 2 * k  # its bound c1 + K - k1
    for key in a.selected:
        na, nb = int(a.count[key]), int(b.count[key])
        np.testing.assert_array_equal(np.asarray(a.selected[key])[:na], b.selected[key][:nb])
    np.testing.assert_allclose(
        [h["train_loss"] for h in split["history"]],
        [h["train_loss"] for h in rank["history"]],
        rtol=1e-6,
    )


def test_whole_budget_counts_match_a_numpy_top_k():
    rng = np.random.default_rng(3)
    scores = {"a": rng.normal(size=(7, 5)), "b": rng.normal(size=(11,)), "c": rng.normal(size=3)}
    scores["b"][2] = np.nan  # ranks lowest
    flat = np.concatenate([np.nan_to_num(scores[key].ravel(), nan=-np.inf) for key in "abc"])
    for n in (0, 1, 10, 30, flat.size, flat.size + 5):
        top = np.argsort(-flat, kind="stable")[: min(n, flat.size)]
        ends = np.cumsum([scores[key].size for key in "abc"])
        want = np.bincount(np.searchsorted(ends, top, side="right"), minlength=3)
        got = whole_budget_counts(scores, n)
        assert [got[key] for key in "abc"] == want.tolist(), n


def test_capacity_estimate_is_checked():
    import pytest

    with pytest.raises(ValueError, match=r"guft\.capacity_estimate.*'ranking'"):
        guft.guft(capacity_estimate="whole")
