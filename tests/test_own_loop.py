"""GUFT and LoRA on models that are not guft_jax's ViT, in a user's own loop: a Flax linen CNN
and a Flax NNX MLP (through ``nnx.split`` / ``nnx.merge``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from guft_jax import optim, peft, saliency, transforms


def _data(shape, n=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, *shape)).astype(np.float32) + y.reshape(-1, *[1] * len(shape))
    return jnp.asarray(x), jnp.asarray(y, jnp.int32)


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.Dense(16)(x.reshape(x.shape[0], -1))
        return nn.Dense(3, name="head")(nn.relu(x))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(10, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 32, rngs=rngs)
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def _linen():
    model = CNN()
    x, y = _data((8, 8, 1))
    params = model.init(jax.random.key(0), x[:1])["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params, x, y


def _nnx():
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    x, y = _data((10,))
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params, x, y


MODELS = {"linen_cnn": _linen, "nnx_mlp": _nnx}
TARGETS = {"linen_cnn": r"(Conv_\d+|Dense_0)/kernel$", "nnx_mlp": r"fc\d/kernel$"}


def _loop(loss, trainable, tx, steps, *, extra=lambda i: {}):
    opt = tx.init(trainable)
    traces = []

    @jax.jit
    def step(t, opt, kw):
        traces.append(1)
        value, g = jax.value_and_grad(loss)(t)
        u, opt = tx.update(g, opt, t, **kw)
        return optax.apply_updates(t, u), opt, value

    losses = []
    for i in range(steps):
        trainable, opt, value = step(trainable, opt, extra(i))
        losses.append(float(value))
    return trainable, opt, losses, len(traces)


@pytest.mark.parametrize("name", MODELS)
def test_guft_in_a_user_loop_on_a_foreign_model(name):
    forward, params, x, y = MODELS[name]()
    per_example = lambda p, xb, yb: _ce(forward(p, xb), yb)  # noqa: E731
    loss = lambda p: jnp.mean(per_example(p, x, y))  # noqa: E731
    tx = transforms.gradual_unfreeze(
        optax.adamw(3e-2, weight_decay=0.1), steps=[0, 5, 10], ratios=[0.02] * 3
    )
    opt = tx.init(params)
    traces = []

    @jax.jit
    def step(p, opt, scores):
        traces.append(1)
        value, g = jax.value_and_grad(loss)(p)
        u, opt = tx.update(g, opt, p, saliency=scores)
        return optax.apply_updates(p, u), opt, value

    new, losses = params, []
    for i in range(15):
        if i in (0, 5, 10):  # saliency at the current weights, before each round
            scores, _ = saliency.compute(per_example, new, [(np.asarray(x), np.asarray(y))])
        new, opt, value = step(new, opt, scores)
        losses.append(float(value))
    assert len(traces) == 1 and losses[-1] < losses[0]
    mask = transforms.unfrozen(opt, params)
    n_elig = sum(
        v.size
        for p, v in zip(transforms.tree_paths(params), jax.tree.leaves(params), strict=True)
        if not p.startswith("head/")
    )
    n_sel = sum(
        int(np.sum(m))
        for p, m in zip(transforms.tree_paths(mask), jax.tree.leaves(mask), strict=True)
        if not p.startswith("head/")
    )
    assert 0 < n_sel <= 3 * round(0.02 * n_elig)
    for a, b, m in zip(
        jax.tree.leaves(new), jax.tree.leaves(params), jax.tree.leaves(mask), strict=True
    ):
        m = np.asarray(m)
        assert np.array_equal(np.asarray(a)[~m].view(np.uint32), np.asarray(b)[~m].view(np.uint32))
    assert type(new) is type(params)  # GUFT trains the params themselves: plain params


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_in_a_user_loop_on_a_foreign_model(name, method):
    forward, params, x, y = MODELS[name]()
    layout = [(r"Conv_\d+/kernel$", 3)]  # (kh, kw, cin, cout): the leading three are the input
    ad = getattr(peft, method)(
        targets=TARGETS[name], rank=2, alpha=6.0, layout=layout, head=r"^head/"
    )
    adapter = ad.init(jax.random.key(1), params)
    np.testing.assert_allclose(
        forward(ad.apply(params, adapter), x), forward(params, x), rtol=1e-5, atol=1e-5
    )  # identity at init
    loss = lambda a: jnp.mean(_ce(forward(ad.apply(params, a), x), y))  # noqa: E731
    new, _, losses, traces = _loop(loss, adapter, optax.adam(1e-2), 15)
    assert traces == 1 and losses[-1] < losses[0]
    merged = ad.merge(params, new)
    assert type(merged) is type(params)  # an NNX State stays a State
    np.testing.assert_allclose(
        forward(merged, x), forward(ad.apply(params, new), x), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(float(jnp.mean(_ce(forward(merged, x), y))), losses[-1], rtol=0.5)
    # the frozen base is untouched; non-target leaves of the merged params are the base's
    for p, a, b in zip(
        transforms.tree_paths(params), jax.tree.leaves(merged), jax.tree.leaves(params), strict=True
    ):
        if not (p.startswith("head/") or p.endswith("kernel")):
            assert np.array_equal(np.asarray(a), np.asarray(b)), p


def test_a_conv_kernel_without_a_layout_rule_is_an_error():
    _, params, _, _ = _linen()
    with pytest.raises(ValueError, match="layout: Conv_0/kernel"):
        peft.lora(targets=r"Conv_0/kernel$").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="lora.targets"):
        peft.lora(targets=r"query").init(jax.random.key(0), params)


@pytest.mark.parametrize("method", ["vera", "fourierft", "bitfit"])
def test_other_weight_space_methods_on_the_nnx_mlp(method):
    forward, params, x, y = _nnx()
    kw = {"bitfit": dict(head=r"^head/"), "fourierft": dict(n=16, init="zeros")}
    kw.setdefault(method, {})
    if method != "bitfit":
        kw[method].update(targets=TARGETS["nnx_mlp"], head=r"^head/")
    ad = getattr(peft, method)(**kw[method])
    adapter = ad.init(jax.random.key(0), params)
    np.testing.assert_allclose(
        forward(ad.apply(params, adapter), x), forward(params, x), rtol=1e-5, atol=1e-5
    )
    loss = lambda a: jnp.mean(_ce(forward(ad.apply(params, a), x), y))  # noqa: E731
    _, _, losses, _ = _loop(loss, adapter, optax.adam(1e-2), 8)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- issue 23 defects


def _small():
    """A dict model with a head, and a mask selecting entries of one leaf only (``b`` and the
    head's bias have none selected: the sparse stores must still save)."""
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        "head": {"kernel": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32), "bias": jnp.ones(2)},
    }
    mask = {
        "a": jnp.asarray(rng.random((6, 5)) < 0.3),
        "b": jnp.zeros(4, bool),
        "head": {"kernel": jnp.ones((5, 2), bool), "bias": jnp.zeros(2, bool)},
    }
    return params, mask


def _small_loss(p, x):
    h = jnp.tanh(x @ p["a"] + jnp.sum(p["b"]))
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2)


def _transforms(mask):
    adamw = optax.adamw(1e-2, weight_decay=0.1)
    gu = dict(steps=[0, 2], ratios=[0.1, 0.1])
    return {
        "masked": transforms.masked(adamw, mask),
        "masked_sparse": transforms.masked(adamw, mask, sparse=True),
        "gradual_unfreeze": transforms.gradual_unfreeze(adamw, **gu),
        "gradual_unfreeze_sparse": transforms.gradual_unfreeze(adamw, sparse=True, **gu),
        "gradual_unfreeze_grow": transforms.gradual_unfreeze(
            adamw, sparse=True, capacity="grow", **gu
        ),
    }


def _donating_step(tx, needs_saliency):
    def step(p, opt, x, scores):
        g = jax.grad(_small_loss)(p, x)
        kw = dict(saliency=scores) if needs_saliency else {}
        u, opt = tx.update(g, opt, p, **kw)
        return optax.apply_updates(p, u), opt

    return jax.jit(step, donate_argnums=(0, 1))


def _run(step, p, opt, xs, scores):
    for x in xs:
        if isinstance(opt, transforms.SparseUnfreezeState) and transforms.round_due(opt):
            opt = transforms.grow(opt, log=lambda s: None)
        p, opt = step(p, opt, x, scores)
    return p, opt


@pytest.mark.parametrize(
    "kind",
    [
        "masked",
        "masked_sparse",
        "gradual_unfreeze",
        "gradual_unfreeze_sparse",
        "gradual_unfreeze_grow",
    ],
)
def test_every_transform_state_donates_and_round_trips_through_orbax(kind, tmp_path):
    """Donation (was "Attempt to donate the same buffer twice": ``count`` and ``round`` were one
    array) and orbax save/restore (was "Cannot save arrays with zero size": empty per-leaf
    vectors) with an abstract target from ``jax.eval_shape``; the resumed run equals the
    uninterrupted one bitwise (a grown sparse store: the abstract target grown to its size)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    params, mask = _small()
    tx = _transforms(mask)[kind]
    needs = kind.startswith("gradual")
    step = _donating_step(tx, needs)
    xs = [jnp.asarray(np.random.default_rng(i).normal(size=(3, 6)), jnp.float32) for i in range(5)]
    scores = jax.tree.map(lambda v: jnp.abs(v) + 0.5, params)
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 (donation consumes the inputs)
    p, opt = _run(step, copy(params), tx.init(copy(params)), xs[:3], scores)  # rounds at 0, 2
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", {"params": p, "opt": opt})
    ckpt.wait_until_finished()
    abstract = jax.eval_shape(tx.init, params)
    if kind == "gradual_unfreeze_grow":  # the store grew at step 2: the target grows likewise
        abstract = transforms.grow(abstract, capacity=opt.indices.shape[0], log=lambda s: None)
        assert opt.indices.shape[0] > jax.eval_shape(tx.init, params).indices.shape[0]
    target = {"params": jax.eval_shape(lambda: params), "opt": abstract}
    restored = ckpt.restore(tmp_path / "state", target)
    assert jax.tree.structure(restored["opt"]) == jax.tree.structure(opt)
    want = _run(step, copy(p), copy(opt), xs[3:], scores)
    got = _run(step, restored["params"], restored["opt"], xs[3:], scores)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    frozen = ~np.asarray(_transforms_mask(kind, mask, want[1], params)["a"])
    assert np.array_equal(np.asarray(want[0]["a"])[frozen], np.asarray(params["a"])[frozen])


def _transforms_mask(kind, mask, opt, params):
    return transforms.unfrozen(opt, params) if kind.startswith("gradual") else mask


def test_the_default_head_matches_nothing_without_failing_and_works_in_multi_transform():
    params, _ = _small()
    body = {k: v for k, v in params.items() if k != "head"}
    tx = transforms.gradual_unfreeze(optax.sgd(0.1), steps=[0], ratios=[0.2])
    opt = tx.init(body)  # no "head" here: was "head: regex '^head/' matches no parameter"
    u, _ = tx.update(body, opt, body, saliency=jax.tree.map(jnp.abs, body))
    assert int(sum(np.sum(np.asarray(x) != 0) for x in jax.tree.leaves(u))) == round(0.2 * 34)
    # inside multi_transform the head is in the other partition
    labels = {"a": "gu", "b": "gu", "head": {"kernel": "full", "bias": "full"}}
    mt = optax.multi_transform({"gu": tx, "full": optax.sgd(0.1)}, labels)
    opt = mt.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    u, opt = mt.update(g, opt, params, saliency=jax.tree.map(jnp.abs, params))
    assert np.all(np.asarray(u["head"]["kernel"]) == -0.1)
    assert int(np.sum(np.asarray(u["a"]) != 0) + np.sum(np.asarray(u["b"]) != 0)) == 7
    with pytest.raises(ValueError, match="head: regex"):
        transforms.gradual_unfreeze(optax.sgd(0.1), steps=[0], ratios=[0.2], head="^cls/").init(
            body
        )


def _strict(lr):
    """An inner transform whose update takes no extra arguments (as optax.lbfgs's line search
    hands its extra arguments to the loss)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree.map(lambda g: -lr * g, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def test_saliency_and_mask_are_consumed_not_forwarded_to_the_inner_optimizer():
    params, mask = _small()
    scores = jax.tree.map(jnp.abs, params)
    for sparse in (False, True):
        tx = transforms.gradual_unfreeze(_strict(0.1), steps=[0], ratios=[0.1], sparse=sparse)
        u, _ = tx.update(params, tx.init(params), params, saliency=scores)  # was a TypeError
        assert np.all(
            np.asarray(u["head"]["kernel"]) == np.asarray(-0.1 * params["head"]["kernel"])
        )
    tx = transforms.masked(_strict(0.1))
    u, _ = tx.update(params, tx.init(params), params, mask=mask)
    assert np.array_equal(np.asarray(u["a"]) != 0, np.asarray(mask["a"]))


def test_non_bool_and_wrongly_shaped_masks_are_rejected_naming_the_leaf():
    params, mask = _small()
    g = jax.tree.map(jnp.ones_like, params)
    scores = dict(mask, a=jnp.asarray(mask["a"], jnp.float32) * 3.0)  # a score tree, not a mask
    ints = dict(mask, b=jnp.zeros(4, jnp.int32))
    bad_shape = dict(mask, a=mask["a"][:, :2])
    for m, msg in (
        (scores, "mask: leaf 'a' has dtype float32; a mask must be bool"),
        (ints, "mask: leaf 'b' has dtype int32"),
        (bad_shape, r"mask: leaf 'a' has shape \(6, 2\), the parameter \(6, 5\)"),
    ):
        tx = transforms.masked(optax.sgd(0.1), m)
        with pytest.raises(ValueError, match=msg):
            tx.update(g, tx.init(params), params)
        with pytest.raises(ValueError, match=msg):
            jax.jit(lambda m: optim.masked_step(optax.sgd(0.1), g, (), params, m))(m)
    prefix = {"a": True, "b": False, "head": True}  # bool leaves covering subtrees still work
    tx = transforms.masked(optax.sgd(0.1), prefix)
    u, _ = tx.update(g, tx.init(params), params)
    assert np.all(np.asarray(u["head"]["bias"]) == -0.1) and np.all(np.asarray(u["b"]) == 0)


def test_keys_with_dots_train_and_colliding_keys_are_an_error():
    rng = np.random.default_rng(1)
    params = {"fc.1": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}}
    params["fc"] = {"2": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
    tx = transforms.gradual_unfreeze(optax.sgd(0.1), steps=[0], ratios=[0.25], sparse=True)
    scores = jax.tree.map(jnp.abs, params)
    u, opt = tx.update(
        jax.tree.map(jnp.ones_like, params), tx.init(params), params, saliency=scores
    )
    mask = transforms.unfrozen(opt, params)
    assert int(sum(np.sum(m) for m in jax.tree.leaves(mask))) == 5
    for a, m in zip(jax.tree.leaves(u), jax.tree.leaves(mask), strict=True):
        np.testing.assert_array_equal(np.asarray(a) != 0, np.asarray(m))
    clash = {"fc.1": {"kernel": jnp.ones(2)}, "fc": {"1": {"kernel": jnp.ones(2)}}}
    with pytest.raises(ValueError, match=r"params: leaves 'fc/1/kernel' and 'fc.1/kernel'"):
        transforms.gradual_unfreeze(optax.sgd(0.1), steps=[0], ratios=[0.5]).init(clash)


@pytest.mark.parametrize("sparse", [False, True])
def test_all_zero_or_non_finite_saliency_at_a_round_raises_naming_the_round(sparse):
    params, _ = _small()
    params["head"] = jax.tree.map(jnp.zeros_like, params["head"])  # a fresh zero head
    tx = transforms.gradual_unfreeze(optax.sgd(0.1), steps=[0, 2], ratios=[0.1] * 2, sparse=sparse)
    zero = jax.tree.map(jnp.zeros_like, params)
    ok = jax.tree.map(lambda v: jnp.abs(v) + 1, params)
    nan = dict(ok, b=ok["b"].at[1].set(jnp.nan))
    g = jax.tree.map(jnp.ones_like, params)
    head_msg = r"round 1 of 2 \(step 0\); the likely cause is a zero-initialised head"
    with pytest.raises(ValueError, match="every eligible score is zero at " + head_msg):
        tx.update(g, tx.init(params), params, saliency=zero)  # eager: a plain ValueError
    step = jax.jit(lambda opt, s: tx.update(g, opt, params, saliency=s)[1])
    opt = step(tx.init(params), ok)
    opt = step(opt, zero)  # no round at step 1: its scores are not read
    with pytest.raises(Exception, match=r"non-finite scores \(NaN or inf\) at round 2 of 2"):
        jax.block_until_ready(step(opt, nan))  # jitted: raised from the compiled step
    with pytest.raises(ValueError, match="zero at oneshot_mask; the likely cause is a zero-init"):
        transforms.oneshot_mask(zero, ratio=0.1)
