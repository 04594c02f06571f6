"""GUFT and LoRA on models that are not guft_jax's ViT, in a user's own loop: a Flax linen CNN
and a Flax NNX MLP (through ``nnx.split`` / ``nnx.merge``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from guft_jax import peft, saliency, transforms


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
        targets=TARGETS[name], rank=2, alpha=6.0, layout=layout, train=r"^head/"
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
    kw = {"bitfit": dict(train=[r"bias$", r"^head/"]), "fourierft": dict(n=16, init="zeros")}
    kw.setdefault(method, {})
    if method != "bitfit":
        kw[method].update(targets=TARGETS["nnx_mlp"], train=r"^head/")
    ad = getattr(peft, method)(**kw[method])
    adapter = ad.init(jax.random.key(0), params)
    np.testing.assert_allclose(
        forward(ad.apply(params, adapter), x), forward(params, x), rtol=1e-5, atol=1e-5
    )
    loss = lambda a: jnp.mean(_ce(forward(ad.apply(params, a), x), y))  # noqa: E731
    _, _, losses, _ = _loop(loss, adapter, optax.adam(1e-2), 8)
    assert losses[-1] < losses[0]
