"""DyLoRA: truncation equals LoRA of the smaller rank, rank sampling, gradients to the sampled
ranks only, counts, one trace, artifacts."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import artifacts, train, vit
from guft_jax.methods import dylora as dy
from guft_jax.methods import get_method
from guft_jax.methods.report import count_trainable

R, ALPHA = 4, 6.0  # α ≠ r, so a wrong scale would show


def _x():
    return jax.random.normal(jax.random.key(7), (2, 16, 16, 3))


_FWD = {}


def _tokens(model, variables):  # the zero-initialised head would hide the backbone
    if id(model) not in _FWD:  # one compile for every plain-params forward of the file
        _FWD[id(model)] = jax.jit(lambda v: model.apply(v, _x(), features=True))
    return _FWD[id(model)](variables)


def _trained(params, **hp):
    m = get_method("dylora", rank=R, alpha=ALPHA, **hp)
    tr = m.init(jax.random.key(0), params)
    g = tr["dylora"]
    g = {
        k: {"A": f["A"], "B": 0.1 * jax.random.normal(jax.random.key(i), f["B"].shape)}
        for i, (k, f) in enumerate(sorted(g.items()))
    }
    return m, {**tr, "dylora": g}


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_truncated_adapter_is_lora_of_rank_b(tiny, b):
    model, params = tiny
    _, tr = _trained(params)
    lora = get_method("lora", rank=b, alpha=ALPHA)
    low = dy.truncate(tr, b)
    assert all(f["A"].shape[0] == b and f["B"].shape[1] == b for f in low["lora"].values())
    ref = _tokens(model, lora.apply(params, low))
    same = get_method("dylora", rank=R, alpha=ALPHA, eval_rank=b)
    np.testing.assert_allclose(_tokens(model, same.apply(params, tr)), ref, rtol=1e-5, atol=1e-6)
    merged = {"params": same.merge(params, tr)}
    np.testing.assert_allclose(_tokens(model, merged), ref, rtol=1e-5, atol=1e-6)
    # the ranks really differ (the adapter is not trivially rank-1)
    if b < R:
        full = get_method("dylora", rank=R, alpha=ALPHA)
        assert float(jnp.abs(_tokens(model, full.apply(params, tr)) - ref).max()) > 1e-3
    with pytest.raises(ValueError, match="dylora.truncate"):
        dy.truncate(tr, R + 1)


def test_training_forward_uses_the_sampled_rank(tiny):
    model, params = tiny
    m, tr = _trained(params)
    keys = jax.random.split(jax.random.key(1), 4000)
    bs = np.asarray(jax.vmap(lambda k: dy.sample_rank(k, R))(keys))
    counts = np.bincount(bs, minlength=R + 1)
    assert counts[0] == 0 and counts[1:].sum() == 4000
    assert np.all(np.abs(counts[1:] - 1000) < 120)  # uniform on {1..R} (±3.8 sd)
    for k in keys[:6]:
        b = int(dy.sample_rank(k, R))
        out = _tokens(model, jax.jit(m.apply)(params, tr, None, k))
        ref = get_method("dylora", rank=R, alpha=ALPHA, eval_rank=b).apply(params, tr)
        np.testing.assert_allclose(out, _tokens(model, ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen_lower", [False, True])
def test_gradients_reach_only_the_sampled_ranks(tiny, frozen_lower):
    model, params = tiny
    m, tr = _trained(params, frozen_lower=frozen_lower)
    key = next(k for k in jax.random.split(jax.random.key(2), 50) if int(dy.sample_rank(k, R)) == 3)
    b = 3

    def loss(t):
        return jnp.sum(model.apply(m.apply(params, t, None, key), _x(), features=True) ** 2)

    g = jax.jit(jax.grad(loss))(tr)["dylora"]
    lo = b - 1 if frozen_lower else 0  # the frozen variant trains only the b-th rank
    for f in g.values():
        rows = np.abs(np.asarray(f["A"])).max(axis=1)  # per rank
        cols = np.abs(np.asarray(f["B"])).max(axis=0)
        assert np.all(rows[lo:b] > 0) and np.all(cols[lo:b] > 0)
        assert not np.any(rows[:lo]) and not np.any(cols[:lo])
        assert not np.any(rows[b:]) and not np.any(cols[b:])


def test_identity_at_init_and_counts_on_vit_b16(tiny):
    model, params = tiny
    m = get_method("dylora", rank=R, alpha=ALPHA)
    tr = m.init(jax.random.key(0), params)
    base = _tokens(model, {"params": params})
    for rng in (None, jax.random.key(3)):  # B = 0: unchanged at every rank
        out = _tokens(model, m.apply(params, tr, None, rng))
        np.testing.assert_array_equal(out, base)
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    mb = get_method("dylora", rank=8)
    n = count_trainable(mb, p, jax.eval_shape(lambda q: mb.init(jax.random.key(0), q), p))[0]
    L, d, r = 24, 768, 8  # query + value of 12 blocks: A (r, d) + B (d, r), as LoRA at r_max
    assert n == L * r * (d + d) == 294_912
    with pytest.raises(ValueError, match="dylora.eval_rank"):
        get_method("dylora", rank=4, eval_rank=5)


def test_trains_through_the_engine_one_trace_loss_falls(tiny, source):
    model, params = tiny
    r = train.fit(
        model,
        params,
        get_method("dylora", rank=R, alpha=ALPHA),
        source,
        mc.tiny_config(head_lr=None),
        hooks=mc.print_nothing,
    )
    assert r.results["traces"] == 1
    losses = [h["train_loss"] for h in r.results["history"]]
    assert losses[-1] < losses[0], losses
    # every rank of the one run is usable: B moved at each rank
    for f in r.state.trainable["dylora"].values():
        assert np.all(np.abs(np.asarray(f["B"])).max(axis=0) > 0)


def test_artifact_round_trip_is_exact(tiny, tmp_path):
    model, params = tiny
    m, tr = _trained(params, eval_rank=2)
    artifacts.save_artifact(str(tmp_path / "a"), method=m, params=params, trainable=tr)
    merged, meta = artifacts.load_artifact(str(tmp_path / "a"), params)
    assert meta["hparams"]["eval_rank"] == 2
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m.merge(params, tr)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_as_lora_is_the_lora_of_the_truncation(tiny):
    model, params = tiny
    q = (r"query/kernel$",)
    m, tr = _trained(params, targets=q)
    lo, low = dy.as_lora(m, tr, 2)
    assert (lo.name, lo.hparams["rank"], lo.hparams["alpha"]) == ("lora", 2, ALPHA)
    assert lo.hparams["targets"] == list(q) and set(low["lora"]) == set(tr["dylora"])
    at_2 = get_method("dylora", rank=R, alpha=ALPHA, targets=q, eval_rank=2)
    np.testing.assert_allclose(
        _tokens(model, lo.apply(params, low)), _tokens(model, at_2.apply(params, tr)), atol=1e-6
    )
