"""guft_jax.transforms: masked / gradual_unfreeze / one-shot masks as optax transforms."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_source

from guft_jax import guft, masks, optim, saliency, train, transforms
from guft_jax.methods.base import EpochContext


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


def _warm(params):  # a non-zero head: the backbone gets gradient from the first step on
    return dict(params, head=jax.tree.map(lambda x: x + 0.1, params["head"]))


def _bits(x):
    return np.asarray(x).view(np.uint32)


def test_masked_adamw_leaves_frozen_entries_bitwise_in_a_user_loop(tiny):
    model, params = tiny
    params = _warm(params)
    # -0.0 entries too: the -0.0 updates keep them -0.0 (x + -0.0 == x for every x)
    params = jax.tree.map(lambda x: x.at[..., 0].set(-0.0) if x.ndim else x, params)
    rng = np.random.default_rng(0)
    mask = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < 0.1), params)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        transforms.masked(optax.adamw(1e-2, weight_decay=0.1), mask),
    )
    opt = tx.init(params)

    @jax.jit
    def step(p, opt, x, y):
        loss, g = jax.value_and_grad(lambda p: jnp.mean(_ce(model.apply({"params": p}, x), y)))(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, loss

    p = params
    for x, y in make_source().batches("train800", batch_size=16, image_size=16):
        p, opt, _ = step(p, opt, x, y)
    moved = 0
    for a, b, m in zip(
        jax.tree.leaves(p), jax.tree.leaves(params), jax.tree.leaves(mask), strict=True
    ):
        m = np.asarray(m)
        assert np.array_equal(_bits(a)[~m], _bits(b)[~m])  # bitwise, -0.0 included
        moved += int(np.sum(np.asarray(a)[m] != np.asarray(b)[m]))
    assert moved > 0.9 * sum(int(np.sum(m)) for m in jax.tree.leaves(mask))
    # Adam's moments are exactly zero outside the mask
    adam = opt[1].inner_state[0]
    for mu, m in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(mask), strict=True):
        assert np.all(np.asarray(mu)[~np.asarray(m)] == 0)


def test_mask_as_extra_argument_never_retraces():
    params = {"w": jnp.arange(6.0) + 1}
    tx = transforms.masked(optax.adam(0.1))
    opt = tx.init(params)
    traces = []

    @jax.jit
    def step(p, opt, mask):
        traces.append(1)
        u, opt = tx.update({"w": jnp.ones(6)}, opt, p, mask=mask)
        return optax.apply_updates(p, u), opt

    p = params
    for i in range(3):
        m = {"w": jnp.arange(6) <= i}
        p, opt = step(p, opt, m)
    assert len(traces) == 1
    np.testing.assert_array_equal(np.asarray(p["w"])[3:], np.arange(6.0)[3:] + 1)
    assert np.all(np.asarray(p["w"])[:3] < np.arange(3.0) + 1)
    with pytest.raises(ValueError, match="mask:"):
        tx.update({"w": jnp.ones(6)}, opt, p)


def test_sparse_masked_follows_the_dense_one_with_state_of_the_selected_size():
    rng = np.random.default_rng(1)
    params = {"a": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "b": jnp.ones(3)}
    mask = {"a": jnp.asarray(rng.random((8, 5)) < 0.2), "b": jnp.zeros(3, bool)}
    dense = transforms.masked(optax.adamw(0.05, weight_decay=0.1), mask)
    sparse = transforms.masked(optax.adamw(0.05, weight_decay=0.1), mask, sparse=True)
    pd, ps = params, params
    od, os_ = dense.init(pd), sparse.init(ps)
    n_sel = int(np.sum(np.asarray(mask["a"])))
    state_sizes = {x.size for x in jax.tree.leaves(os_.inner_state) if x.ndim}
    # Adam's moments cover the selected entries only: one vector over all leaves (was one per
    # leaf, with zero-size vectors for leaves with none selected, which orbax cannot save)
    assert state_sizes == {n_sel}
    for i in range(4):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x + i), params)
        ud, od = dense.update(g, od, pd)
        us, os_ = sparse.update(g, os_, ps)
        pd, ps = optax.apply_updates(pd, ud), optax.apply_updates(ps, us)
    for a, b in zip(jax.tree.leaves(pd), jax.tree.leaves(ps), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    m = np.asarray(mask["a"])
    assert np.array_equal(_bits(ps["a"])[~m], _bits(params["a"])[~m])


def _saliency_sequence(params, n, ties):
    rng = np.random.default_rng(7)
    elig = masks.eligible_leaves(params)
    out = []
    for _ in range(n):
        s = {k: rng.random(shape).astype(np.float32) for k, shape in elig.items()}
        if ties:  # many exact ties: the tie-breaking rule has to agree too
            s = {k: np.round(v * 8) / 8 for k, v in s.items()}
        out.append({k: jnp.asarray(v) for k, v in s.items()})
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(allocation="per_tensor", exclude_selected=True),
        dict(allocation="per_row", exclude_selected=True),
        dict(normalize="mean", exclude_selected=True),
    ],
)
def test_gradual_unfreeze_reproduces_the_mask_sequence_of_guft_in_one_trace(kw, tiny):
    _, params = tiny
    params = _warm(params)
    ratios = [0.05, 0.03, 0.04]
    seq = _saliency_sequence(params, 3, ties=not kw)
    # guft(): its epoch hook, with the saliency it computes replaced by the given sequence
    calls = iter(seq)
    m = guft.guft(
        recompute_epochs=[1, 2, 3],
        ratios=ratios,
        sparse=False,
        eligible="all",
        saliency_fn=lambda *a, **k: (next(calls), {}),
        **kw,
    )
    tr = m.init(jax.random.PRNGKey(0), params)
    ctx = EpochContext(params, tr, (), m.hooks.init_state(params, tr), None, None, lambda s: None)
    want = []
    for epoch in (1, 2, 3):
        tr, _, st = m.hooks.epoch_start(epoch, ctx)
        ctx = ctx._replace(trainable=tr, state=st)
        want.append(st.selected)
    # the transform in a plain jitted step, rounds at steps 0, 2, 4
    tx = transforms.gradual_unfreeze(
        optax.adamw(1e-3, weight_decay=0.1), steps=[0, 2, 4], ratios=ratios, **kw
    )
    opt = tx.init(params)
    traces = []

    @jax.jit
    def step(p, opt, scores):
        traces.append(1)
        g = jax.tree.map(jnp.ones_like, p)
        u, opt = tx.update(g, opt, p, saliency=scores)
        return optax.apply_updates(p, u), opt

    p, got = params, []
    for s in range(6):
        p, opt = step(p, opt, seq[s // 2])
        if s % 2 == 0:
            got.append(transforms.find_state(opt).mask)
    assert len(traces) == 1
    assert int(transforms.find_state(opt).round) == 3
    for w, g in zip(want, got, strict=True):
        assert sorted(w) == sorted(g)
        for k in w:
            np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=k)


def test_gradual_unfreeze_equals_the_engines_guft_step_within_1e6(tiny):
    """A plain user loop (``W = W0 + δ``, AdamW wd 0.1 on the trainable ``{head, δ}``) against
    ``train.make_train_step`` (what ``train.fit`` jits) with dense GUFT, same data and schedule."""
    model, params = tiny
    params = _warm(params)
    src, bs, epochs, lr, wd = make_source(), 16, 3, 1e-2, 0.1
    batches = lambda: src.batches("train800", batch_size=bs, image_size=16)  # noqa: E731
    spe = len(list(batches()))
    ratios = [0.02] * 3
    m = guft.guft(recompute_epochs=[1, 2, 3], ratios=ratios, sparse=False, eligible="all")
    tx, st = train.optimizer_for(
        m, params, steps_per_epoch=spe, epochs=epochs, lr=lr, head_lr=lr, weight_decay=wd
    )
    step_fn = train.make_train_step(model, m, tx, total_steps=spe * epochs)
    engine_masks = []
    for e in range(1, epochs + 1):
        st = train.epoch_start(model, m, params, st, e, batches=batches, epochs=epochs)
        engine_masks.append(jax.tree.map(np.asarray, st.method_state.selected))
        for x, y in batches():
            st, _ = step_fn(st, params, x, y, train.mask_of(m, st))
    engine = m.merge(params, st.trainable, st.method_state)

    # ---- the user's loop
    backbone = {k: v for k, v in params.items() if k != "head"}
    trainable = {"head": params["head"], "delta": jax.tree.map(jnp.zeros_like, backbone)}

    def effective(t):
        w = jax.tree.map(jnp.add, backbone, t["delta"])
        return {**w, "head": t["head"]}

    def per_example(t, x, y):
        return _ce(model.apply({"params": effective(t)}, x), y)

    sched = optim.schedule(lr=lr, warmup_steps=0, total_steps=spe * epochs)
    utx = transforms.gradual_unfreeze(
        optax.adamw(sched, weight_decay=wd),
        steps=transforms.schedule_steps([1, 2, 3], steps_per_epoch=spe),
        ratios=ratios,
    )
    opt = utx.init(trainable)
    traces = []

    @jax.jit
    def step(t, opt, x, y, scores):
        traces.append(1)
        g = jax.grad(lambda t: jnp.mean(per_example(t, x, y)))(t)
        u, opt = utx.update(g, opt, t, saliency=scores)
        return optax.apply_updates(t, u), opt

    user_masks = []
    for _ in range(epochs):
        scores, _ = saliency.compute(per_example, trainable, batches())
        for i, (x, y) in enumerate(batches()):
            trainable, opt = step(trainable, opt, x, y, scores)
            if i == 0:
                user_masks.append(transforms.find_state(opt).mask)
    assert len(traces) == 1
    for w, g in zip(engine_masks, user_masks, strict=True):
        for k, v in w.items():
            np.testing.assert_array_equal(np.asarray(g["delta." + k]), v, err_msg=k)
    user = effective(trainable)
    worst = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(engine), jax.tree.leaves(user), strict=True)
    )
    print(f"max |engine - user loop| over all params: {worst:.3g}")
    assert worst <= 1e-6, worst
    # frozen entries of the user's weights: bitwise the pretrained ones
    final = {
        masks.leaf_key(p): v
        for p, v in zip(transforms.tree_paths(user), jax.tree.leaves(user), strict=True)
    }
    base = {
        masks.leaf_key(p): v
        for p, v in zip(transforms.tree_paths(params), jax.tree.leaves(params), strict=True)
    }
    for k, sel in engine_masks[-1].items():
        assert np.array_equal(_bits(final[k])[~sel], _bits(base[k])[~sel]), k


def test_traced_largest_remainder_equals_the_exact_one():
    rng = np.random.default_rng(3)
    for _ in range(50):
        w = rng.integers(0, 10**6, rng.integers(1, 30)).tolist()
        k = int(rng.integers(0, sum(w) + 1))
        got = jax.jit(masks.largest_remainder_traced, static_argnums=0)(
            k, jnp.asarray(w, jnp.int32)
        )
        assert got.tolist() == masks.largest_remainder(k, w)
    with pytest.raises(ValueError, match="k:"):
        masks.check_traced_bound(10, 2**30)


def test_oneshot_masks_select_exactly_k_and_keep_the_head():
    rng = np.random.default_rng(0)
    scores = {
        "Conv_0": {"kernel": jnp.asarray(rng.random((3, 3, 2, 4)), jnp.float32)},
        "Dense_0": {"kernel": jnp.asarray(rng.random((8, 5)), jnp.float32)},
        "head": {"kernel": jnp.zeros((5, 2))},
    }
    m = transforms.oneshot_mask(scores, ratio=0.1)
    n = 3 * 3 * 2 * 4 + 8 * 5
    assert int(np.sum(m["Conv_0"]["kernel"]) + np.sum(m["Dense_0"]["kernel"])) == round(0.1 * n)
    assert bool(np.all(m["head"]["kernel"]))
    ref = masks.topk_mask({"a": scores["Conv_0"]["kernel"], "b": scores["Dense_0"]["kernel"]}, 9)
    np.testing.assert_array_equal(
        transforms.oneshot_mask(scores, k=9)["Dense_0"]["kernel"], ref["b"]
    )
    mag = transforms.magnitude_mask({"w": jnp.array([0.5, -2.0, 1.0])}, k=2, head=None)
    assert mag["w"].tolist() == [False, True, True]


def test_bad_input_names_the_argument():
    p = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="head: regex"):
        transforms.oneshot_mask(p, k=1, head=r"^head/")  # an explicit head regex matching nothing
    # the default head matches nothing here without failing (was "head: regex ..."; issue 23)
    assert int(np.sum(transforms.oneshot_mask(p, k=1)["Dense_0"]["kernel"])) == 1
    with pytest.raises(ValueError, match="include"):
        transforms.oneshot_mask(p, k=1, head=None, include=r"^Conv_")
    with pytest.raises(ValueError, match="allocation"):
        transforms.gradual_unfreeze(optax.sgd(1.0), steps=[0], ratios=[0.1], allocation="x")
    with pytest.raises(ValueError, match="steps"):
        transforms.gradual_unfreeze(optax.sgd(1.0), steps=[3, 1], ratios=[0.1, 0.1])
    tx = transforms.gradual_unfreeze(optax.sgd(1.0), steps=[0], ratios=[0.5], head=None)
    opt = tx.init(p)
    with pytest.raises(ValueError, match="saliency"):
        tx.update(p, opt, p)
    with pytest.raises(ValueError, match="mask"):
        transforms.masked(optax.sgd(1.0), sparse=True)


def _state_bytes(state):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32)(x))
        x = nn.gelu(nn.Dense(32)(x))
        return nn.Dense(3, name="head")(x)


@pytest.mark.parametrize(
    "kw",
    [
        dict(capacity="all"),
        dict(capacity="grow"),
        dict(capacity="grow", allocation="per_tensor", exclude_selected=True),
    ],
)
def test_sparse_gradual_unfreeze_equals_the_dense_form_within_1e6(kw):
    """AdamW (decoupled decay) after a global-norm clip, three rounds: the sparse store (state
    for the selected entries only) follows the dense transform; growth retraces once each."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = jnp.arange(16) % 3
    model = _MLP()
    params = model.init(jax.random.key(0), x)["params"]
    seq = [
        jax.tree.map(lambda v: jnp.asarray(rng.random(v.shape), jnp.float32), params)
        for _ in range(3)
    ]

    def make(sparse):
        inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
        return transforms.gradual_unfreeze(
            inner, steps=[0, 2, 4], ratios=[0.05, 0.03, 0.05], sparse=sparse, **kw
        )

    def run(tx):
        opt, p, traces, logs = tx.init(params), params, [], []

        @jax.jit
        def step(p, opt, s):
            traces.append(1)
            g = jax.grad(lambda p: jnp.mean(_ce(model.apply({"params": p}, x), y)))(p)
            u, opt = tx.update(g, opt, p, saliency=s)
            return optax.apply_updates(p, u), opt

        for i in range(8):
            if transforms.round_due(opt):
                assert i in (0, 2, 4)
                if isinstance(transforms.find_state(opt), transforms.SparseUnfreezeState):
                    opt = transforms.grow(opt, log=logs.append)
            p, opt = step(p, opt, seq[min(i // 2, 2)])
        return p, opt, len(traces), logs

    pd, od, td, _ = run(make(False))
    ps, os_, ts, logs = run(make(True))
    assert td == 1 and ts == 1 + len(logs)
    assert len(logs) == (2 if kw["capacity"] == "grow" else 0)
    worst = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(pd), jax.tree.leaves(ps), strict=True)
    )
    print(f"max |sparse - dense| over all params: {worst:.3g}")
    assert worst <= 1e-6, worst
    md, ms = transforms.unfrozen(od, params), transforms.unfrozen(os_, params)
    for a, b in zip(jax.tree.leaves(md), jax.tree.leaves(ms), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b, m in zip(
        jax.tree.leaves(ps), jax.tree.leaves(params), jax.tree.leaves(ms), strict=True
    ):
        m = np.asarray(m)
        assert np.array_equal(_bits(a)[~m], _bits(b)[~m])
    n_sel = sum(int(np.sum(v)) for v in transforms.find_state(od).mask.values())
    st = transforms.find_state(os_)
    n = sum(int(np.prod(v)) for v in transforms.eligibility(params).eligible.values())
    assert int(np.sum(np.asarray(st.indices) < n)) == n_sel  # every selected entry has a slot
    assert st.indices.shape[0] <= round(0.05 * n) + round(0.03 * n) + round(0.05 * n)
    assert _state_bytes(os_) < 0.5 * _state_bytes(od)


def test_round_due_under_multisteps_and_scan():
    """Saliency computed only when ``round_due`` says so (MultiSteps: at the first micro-step of
    the accumulation that ends in a round), and a ``lax.scan`` loop chunked by
    ``updates_until_round``; both equal the loop that passes fresh scores at every step."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "head": jnp.ones(6)}
    grad = lambda p, i: jax.tree.map(lambda v: jnp.cos(v * (i + 1)), p)  # noqa: E731
    scores_of = lambda p: jax.tree.map(lambda v: jnp.abs(jnp.sin(3 * v)) + 0.1, p)  # noqa: E731
    gu = transforms.gradual_unfreeze(
        optax.adamw(0.05, weight_decay=0.1), steps=[0, 2], ratios=[0.1, 0.1], sparse=True
    )
    tx = optax.MultiSteps(gu, every_k_schedule=2)

    @jax.jit
    def step(p, opt, i, s):
        u, opt = tx.update(grad(p, i), opt, p, saliency=s)
        return optax.apply_updates(p, u), opt

    def loop(fresh):
        zeros = jax.tree.map(jnp.zeros_like, params)  # read only at rounds: a placeholder
        p, opt, calls, s = params, tx.init(params), [], zeros
        for i in range(8):
            if fresh or transforms.round_due(opt, every_k=2):
                s = scores_of(p)
                calls.append(i)
            p, opt = step(p, opt, i, s)
        return p, calls

    p_due, calls = loop(False)
    p_all, _ = loop(True)
    assert calls == [0, 4]  # inner updates 0 and 2 accumulate over micro-steps 0-1 and 4-5
    for a, b in zip(jax.tree.leaves(p_due), jax.tree.leaves(p_all), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # lax.scan: chunks that end where a round is due
    @functools.partial(jax.jit, static_argnums=3)
    def scan(p, opt, s, n, start):
        def body(c, i):
            p, opt = c
            u, opt = gu.update(grad(p, i), opt, p, saliency=s)
            return (optax.apply_updates(p, u), opt), None

        return jax.lax.scan(body, (p, opt), start + jnp.arange(n))[0]

    p, opt, t, calls, s = params, gu.init(params), 0, 0, jax.tree.map(jnp.zeros_like, params)
    while t < 6:
        left = transforms.updates_until_round(opt)
        if left == 0:
            s, calls = scores_of(p), calls + 1
            left = 1
        n = min(left if left is not None else 6, 6 - t)
        p, opt = scan(p, opt, s, n, t)
        t += n
    ref, opt_r = params, gu.init(params)
    for i in range(6):
        u, opt_r = gu.update(grad(ref, i), opt_r, ref, saliency=scores_of(ref))
        ref = optax.apply_updates(ref, u)
    assert calls == 2 and transforms.updates_until_round(opt) is None
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
