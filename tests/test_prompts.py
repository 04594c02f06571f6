"""VPT (shallow / deep) and prefix tuning (issue 14): token counts and positions on the model's
sequence, deep prompts replaced not accumulated, key/value prefixes, counts on ViT-B/16,
gradients, artifacts and the engine. Neither is the pretrained function at init (stated)."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest
from safetensors.numpy import load_file

from guft_jax import artifacts, paths, train, vit
from guft_jax.methods import forward, get_method, spec
from guft_jax.methods.base import default_load
from guft_jax.methods.prompts import prompt_bound
from guft_jax.methods.report import count_trainable

P = 3  # prompts / prefixes on the tiny model
N = (16 // 4) ** 2  # patch tokens of ViT-tiny/4 at 16 px
CASES = {
    "vpt_shallow": ("vpt", dict(num_tokens=P, deep=False)),
    "vpt_deep": ("vpt", dict(num_tokens=P, deep=True)),
    "prefix": ("prefix", dict(num_tokens=P)),
}


def _x():
    return jax.random.normal(jax.random.key(7), (2, 16, 16, 3))


def _perturb(tree, seed=1):
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tdef.unflatten(
        [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _build(case):
    name, hp = CASES[case]
    return get_method(name, **hp)


def _blocks_seen(model, m, params, tr):
    """Innermost test interceptor: each block's input and output as the block itself sees them,
    and the final LayerNorm's input."""
    log = {}

    def icpt(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, vit.Encoder1DBlock):
            log[mod.name] = (np.asarray(args[0]), np.asarray(out))
        elif context.method_name == "__call__" and mod.name == "encoder_norm":
            log["encoder_norm"] = np.asarray(args[0])
        return out

    none = lambda f, a, kw, c: f(*a, **kw)  # noqa: E731
    outer = m.hooks.intercept(tr, None, None) if m.hooks.intercept else none
    with nn.intercept_methods(outer), nn.intercept_methods(icpt):
        feats = model.apply(m.apply(params, tr), _x(), features=True)
    return log, feats


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_tokens_count_and_positions(deep, tiny):
    model, params = tiny
    m = _build("vpt_deep" if deep else "vpt_shallow")
    tr = _perturb(m.init(jax.random.key(0), params))
    log, feats = _blocks_seen(model, m, params, tr)
    base, _ = _blocks_seen(model, get_method("linear"), params, {"head": params["head"]})
    x0, _ = base["encoderblock_0"]
    assert x0.shape[1] == 1 + N
    prompts = tr["vpt"]
    assert sorted(prompts) == (["encoderblock_0", "encoderblock_1"] if deep else ["encoderblock_0"])
    for i, blk in enumerate(["encoderblock_0", "encoderblock_1"]):
        xin, _ = log[blk]
        assert xin.shape == (2, 1 + P + N, 32)  # [CLS], P prompts, N patches
        if i == 0:  # inserted after [CLS], before the patches (which keep their positions)
            np.testing.assert_array_equal(xin[:, 0], x0[:, 0])
            np.testing.assert_array_equal(xin[:, 1 + P :], x0[:, 1:])
            np.testing.assert_array_equal(
                xin[:, 1 : 1 + P], np.broadcast_to(prompts[blk], (2, P, 32))
            )
        else:
            prev_out = log["encoderblock_0"][1]
            # [CLS] and patches flow on; the prompt slots hold P_i (deep: replaced, bitwise, not
            # added to the previous block's prompt outputs) or those outputs (shallow)
            np.testing.assert_array_equal(xin[:, 0], prev_out[:, 0])
            np.testing.assert_array_equal(xin[:, 1 + P :], prev_out[:, 1 + P :])
            want = np.broadcast_to(prompts[blk], (2, P, 32)) if deep else prev_out[:, 1 : 1 + P]
            np.testing.assert_array_equal(xin[:, 1 : 1 + P], want)
            if deep:  # accumulating would have shown: the previous prompt outputs are not 0
                assert np.abs(prev_out[:, 1 : 1 + P]).max() > 1e-2
    # the prompt outputs are dropped before the final LayerNorm: the encoder's sequence length
    last = log["encoderblock_1"][1]
    np.testing.assert_array_equal(
        log["encoder_norm"], np.concatenate([last[:, :1], last[:, 1 + P :]], 1)
    )
    assert feats.shape == (2, 1 + N, 32)
    # VPT is not the pretrained function at init (prompts join attention at once): stated
    t0 = m.init(jax.random.key(0), params)
    out0 = forward(model, m, params, t0, None, _x(), features=True)
    assert float(jnp.abs(out0 - model.apply({"params": params}, _x(), features=True)).max()) > 1e-3


def test_vpt_init_bound_uses_the_model_patch_size(tiny):
    _, params = tiny
    b16 = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    assert prompt_bound(b16) == math.sqrt(6 / (3 * 16 * 16 + 768))
    bound = math.sqrt(6 / (3 * 4 * 4 + 32))
    assert prompt_bound(params) == bound
    m = get_method("vpt", num_tokens=64, deep=True)
    p = np.concatenate([np.ravel(v) for v in m.init(jax.random.key(0), params)["vpt"].values()])
    assert np.all(np.abs(p) <= bound) and np.abs(p).max() > 0.95 * bound
    assert abs(p.std() - bound / math.sqrt(3)) < 0.05 * bound  # U(-b, b)


def test_prefix_extends_keys_and_values_of_every_block(tiny):
    model, params = tiny
    m = _build("prefix")
    tr = _perturb(m.init(jax.random.key(0), params))
    seen = {}

    def icpt(next_fun, args, kwargs, context):  # innermost: sees the prefixed k, v
        if context.method_name == "attend":
            seen[context.module.path[-2]] = [np.asarray(a) for a in args]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(m.hooks.intercept(tr, None, None)), nn.intercept_methods(icpt):
        model.apply(m.apply(params, tr), _x())
    for blk in ("encoderblock_0", "encoderblock_1"):
        q, k, v = seen[blk]
        assert q.shape == (2, 1 + N, 2, 16) and k.shape == v.shape == (2, P + 1 + N, 2, 16)
        for got, name in ((k, "key"), (v, "value")):
            want = np.broadcast_to(
                np.asarray(tr["prefix"][blk][name]).reshape(P, 2, 16), got[:, :P].shape
            )
            np.testing.assert_array_equal(got[:, :P], want)
    # not the pretrained function at init: prefixes take attention mass (stated)
    t0 = m.init(jax.random.key(0), params)
    out0 = forward(model, m, params, t0, None, _x(), features=True)
    assert float(jnp.abs(out0 - model.apply({"params": params}, _x(), features=True)).max()) > 1e-4


def test_trainable_counts_equal_closed_forms_on_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)

    def count(name, **hp):
        m = get_method(name, **hp)
        tr = jax.eval_shape(lambda q: m.init(jax.random.PRNGKey(0), q), p)
        return count_trainable(m, p, tr)[0]

    L, d, p_ = 12, 768, 10
    assert count("vpt", num_tokens=p_, deep=False) == p_ * d == 7_680
    assert count("vpt", num_tokens=p_, deep=True) == L * p_ * d == 92_160
    assert count("vpt", num_tokens=50, deep=True) == L * 50 * d
    assert count("prefix", num_tokens=p_) == 2 * L * p_ * d == 184_320


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_reach_every_prompt(case, tiny):
    model, params = tiny
    m = _build(case)
    tr = m.init(jax.random.key(0), params)
    tr = {**tr, "head": _perturb(tr["head"])}  # a non-zero head so the backbone gets gradients

    def loss(t):
        return train.cross_entropy(forward(model, m, params, t, None, _x()), jnp.array([0, 1]))

    g = jax.jit(jax.grad(loss))(tr)
    leaves = zip(paths.leaf_paths(g), jax.tree.leaves(g), strict=True)
    assert not [k for k, v in leaves if not np.any(v)]
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(tr)


@pytest.mark.parametrize("case", sorted(CASES))
def test_artifact_round_trip_is_bitwise(case, tiny, tmp_path):
    model, params = tiny
    m = _build(case)
    tr = _perturb(m.init(jax.random.key(0), params))
    d = str(tmp_path / "a")
    meta = artifacts.save_artifact(d, method=m, params=params, trainable=tr, base_id="tiny")
    assert meta["numbers"] == count_trainable(m, params, tr)[0]
    arrays = load_file(os.path.join(d, artifacts.WEIGHTS))
    back = default_load(m.init, lambda p, t: t, params, arrays)  # strict against the template
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tr)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(tr), strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(
        forward(model, m, params, back, None, _x()), forward(model, m, params, tr, None, _x())
    )
    with pytest.raises(ValueError, match="cannot be merged"):  # additive: no plain params
        artifacts.load_artifact(d, params)


@pytest.mark.parametrize("case", ["vpt_deep", "prefix"])
def test_trains_through_the_engine_in_one_trace(case, tiny, source):
    model, params = tiny
    name = CASES[case][0]
    d = spec(name).defaults
    m = get_method(name, **{**(d.kwargs or {}), **(d.dry_kwargs or {})})  # the registered dry run
    t0 = m.init(jax.random.key(0), params)
    before = jax.tree.map(np.array, params)
    r = train.fit(
        model,
        params,
        m,
        source,
        mc.tiny_config(),
        hooks=mc.print_nothing,
    )
    losses = [h["train_loss"] for h in r.results["history"]]
    assert r.results["traces"] == 1
    assert losses[-1] < losses[0], losses
    moved = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), r.state.trainable, t0
    )
    assert all(jax.tree.leaves(moved[name]))
    for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(u, v)
