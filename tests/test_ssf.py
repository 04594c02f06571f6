"""SSF (scale-shift after linears and norms, through the interceptor): identity at init, where it
acts, closed-form counts, merge == intercepted forward, gradients, artifacts, the engine."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import artifacts, train, vit
from guft_jax.methods import forward, get_method
from guft_jax.methods.report import count_trainable
from guft_jax.methods.ssf import target_layers


def _x(n=4):
    return jax.random.normal(jax.random.key(7), (n, 16, 16, 3))


def _perturb(tree, seed=1, std=0.1):
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tdef.unflatten(
        [x + std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _random_head(params, seed=5):
    k = params["head"]["kernel"]
    return {**params["head"], "kernel": jax.random.normal(jax.random.key(seed), k.shape)}


@pytest.fixture(scope="module")
def fwd(tiny):
    model, _ = tiny

    @jax.jit
    def f(params, tr, x):
        m = get_method("ssf")
        logits = forward(model, m, params, tr, None, x)
        return logits, forward(model, m, params, tr, None, x, features=True)

    return f


def test_identity_at_init_and_the_layers_it_scales(tiny, fwd):
    model, params = tiny
    m = get_method("ssf")
    tr = m.init(jax.random.key(0), params)
    layers = target_layers(params, m.hparams["targets"])
    blocks = [f"Transformer/encoderblock_{i}" for i in range(2)]
    attn = [f"{b}/MultiHeadDotProductAttention_1/{n}" for b in blocks for n in ("query", "key")]
    attn += [f"{b}/MultiHeadDotProductAttention_1/{n}" for b in blocks for n in ("value", "out")]
    mlp = [f"{b}/MlpBlock_3/Dense_{j}" for b in blocks for j in (0, 1)]
    norms = [f"{b}/LayerNorm_{j}" for b in blocks for j in (0, 2)] + ["Transformer/encoder_norm"]
    assert sorted(layers) == sorted(attn + mlp + norms)
    assert all(np.all(v["scale"] == 1) and np.all(v["shift"] == 0) for v in tr["ssf"].values())
    tokens = jax.jit(lambda p, x: model.apply({"params": p}, x, features=True))(params, _x())
    np.testing.assert_allclose(fwd(params, tr, _x())[1], tokens, rtol=0, atol=1e-6)
    # the interceptor acts on exactly these layers: a shift on each moves the output
    seen = []
    icpt = m.hooks.intercept(tr)

    def spy(next_fun, args, kwargs, context):
        out = icpt(next_fun, args, kwargs, context)
        if context.method_name == "__call__":
            seen.append("/".join(context.module.path))
        return out

    import flax.linen as nn

    with nn.intercept_methods(spy):
        jax.eval_shape(lambda: model.apply({"params": params}, _x(), features=True))
    assert set(layers) <= set(seen)


def test_trainable_count_closed_form_on_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    m = get_method("ssf")
    tr = jax.eval_shape(lambda q: m.init(jax.random.PRNGKey(0), q), p)
    L, d, mlp = 12, 768, 3072
    # per block: q, k, v (3d) + out (d) + fc1 (mlp) + fc2 (d) + LayerNorm_0/2 (2d); + final norm
    expect = 2 * (L * (3 * d + d + mlp + d + 2 * d) + d)
    assert count_trainable(m, p, tr) == (expect, 10 * d + 10) and expect == 204_288
    emb = get_method("ssf", targets=m.hparams["targets"] + [r"^embedding/kernel$"])
    tr = jax.eval_shape(lambda q: emb.init(jax.random.PRNGKey(0), q), p)
    assert count_trainable(emb, p, tr)[0] == expect + 2 * d


def test_merged_equals_intercepted_forward(tiny, fwd):
    model, params = tiny
    m = get_method("ssf")
    tr = _perturb(m.init(jax.random.key(0), params))
    tr = {**tr, "head": _random_head(params)}
    logits, tokens = fwd(params, tr, _x())
    merged = m.merge(params, tr)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    ref = model.apply({"params": merged}, _x(), features=True)
    assert (
        float(jnp.abs(tokens - model.apply({"params": params}, _x(), features=True)).max()) > 1e-2
    )
    np.testing.assert_allclose(tokens, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, model.apply({"params": merged}, _x()), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_scale_and_shift(tiny):
    model, params = tiny
    m = get_method("ssf")
    tr = _perturb(m.init(jax.random.key(0), params))
    tr = {**tr, "head": _random_head(params)}

    def loss(t):
        return jnp.sum(forward(model, m, params, t, None, _x()) ** 2)

    g = jax.jit(jax.grad(loss))(tr)
    assert set(g) == {"head", "ssf"}  # the frozen base is not differentiated at all
    for k, v in g["ssf"].items():
        assert float(jnp.abs(v["scale"]).max()) > 0 and float(jnp.abs(v["shift"]).max()) > 0, k


def test_artifact_round_trip_is_bitwise(tiny, tmp_path):
    _, params = tiny
    m = get_method("ssf")
    tr = _perturb(m.init(jax.random.key(0), params))
    meta = artifacts.save_artifact(str(tmp_path / "a"), method=m, params=params, trainable=tr)
    assert meta["numbers"] == count_trainable(m, params, tr)[0]
    merged, meta2 = artifacts.load_artifact(str(tmp_path / "a"), params)
    assert meta2["method"] == "ssf"
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m.merge(params, tr)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_trains_through_the_engine_in_one_trace(tiny, source):
    model, params = tiny
    m = get_method("ssf")
    r = train.fit(
        model,
        params,
        m,
        source,
        mc.tiny_config(lr=3e-2),
        hooks=mc.print_nothing,
    )
    losses = [h["train_loss"] for h in r["history"]]
    assert r.results["traces"] == 1 and losses[-1] < losses[0], losses
    assert any(np.any(v["scale"] != 1) for v in jax.device_get(r.state.trainable["ssf"]).values())
