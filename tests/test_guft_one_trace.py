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


def _recorded(method, shapes: list, counts: list | None = None):
    """The method with each ``epoch_start`` recording the store's shapes after it (entries and
    blocks), so a test sees that no later round changes one, and the per-tensor counts."""
    hook = method.hooks.epoch_start

    def rec(epoch, ctx):
        out = hook(epoch, ctx)
        tr, _, st = out
        shapes.append(jax.tree.map(np.shape, (tr["delta"], st.selected, st.blocks)))
        if counts is not None:
            counts.append({key: int(c) for key, c in st.count.items()})
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

    fn.base, fn.kth = base, kth
    return fn, t, k


def test_later_rounds_that_outgrew_the_first_rounds_split_fit_without_a_retrace(tiny, source):
    """Three rounds whose last two select only inside a kernel ``t`` the first round left empty.
    Sized for the first round's split (``capacity_estimate="split"``, the rule before) ``t``
    would hold fewer slots than it ends with (a growth: a second trace); sized for the first
    round's ranking of the whole budget (the registered default) every round fits: one trace,
    no shape changes, and exactly the entries the scores rank first."""
    fn, t, k = _moving_saliency(tiny, 0.02)
    kw = dict(recompute_epochs=[1, 2, 3], ratios=[0.02] * 3, saliency_fn=fn)
    ranked = guft.guft(capacity_estimate="ranking", **kw)
    shapes, lines, counts = [], [], []
    r = _fit(tiny, source, _recorded(ranked, shapes, counts), lines)
    st = r["state"].method_state
    assert r["traces"] == 1 and not any("one retrace" in s for s in lines)
    assert len(shapes) == 3 and shapes[1] == shapes[0] and shapes[2] == shapes[0]
    # exactly the scores' picks: the other tensors' top k (round 1), then 2k entries of t
    _, params = tiny
    eligible = masks.eligible_leaves(params, preset="blocks")
    for key in eligible:
        got = np.sort(np.asarray(st.selected[key])[: int(st.count[key])])
        want = np.arange(2 * k) if key == t else np.flatnonzero(fn.base[key].ravel() >= fn.kth)
        np.testing.assert_array_equal(got, want)
    assert int(st.count[t]) == 2 * k and counts[0][t] == 0
    assert r["state"].trainable["delta"][t].shape[0] == 2 * k  # its bound c1 + K - k1
    # the first round's split alone (the rule before) leaves t short of its final count
    split = guft.capacity_rule(eligible, 3 * k, k, slack=2.0, floor=16)
    assert split(counts[0], counts[0], first=True)[t] < int(st.count[t])


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
