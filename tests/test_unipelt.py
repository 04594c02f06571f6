"""UniPELT-style gated hybrid (arXiv:2110.07577): each gated branch equals its closed form, LoRA and
adapter branches are exactly zero at init (identity without the prefix branch; the prefix branch
is not identity at init, as in UniPELT: stated), counts on ViT-B/16, gradients reach every part
including the gates, artifacts, the engine."""

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
from guft_jax.methods.report import count_trainable

P, R, ALPHA = 2, 2, 6.0  # α ≠ r: a dropped α/r would show
HP = dict(rank=R, alpha=ALPHA, prefix_tokens=P, reduction=8)
N = (16 // 4) ** 2
Q = "Transformer.encoderblock_0.MultiHeadDotProductAttention_1.query.kernel"


def _x():
    return jax.random.normal(jax.random.key(7), (2, 16, 16, 3))


def _perturb(tree, seed=1, scale=0.1):
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tdef.unflatten(
        [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _f64(t):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), t)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _gate(z, g):  # mean over tokens of σ(z W + b): (B, outputs)
    return _sigmoid(z @ g["kernel"] + g["bias"]).mean(axis=1)


def test_identity_at_init_without_prefix_and_zero_branches_with_it(tiny):
    model, params = tiny
    base = model.apply({"params": params}, _x(), features=True)
    m0 = get_method("unipelt", **{**HP, "prefix_tokens": 0})
    t0 = m0.init(jax.random.key(0), params)
    assert "prefix" not in t0
    np.testing.assert_array_equal(forward(model, m0, params, t0, None, _x(), features=True), base)
    m = get_method("unipelt", **HP)
    tr = m.init(jax.random.key(0), params)
    out = forward(model, m, params, tr, None, _x(), features=True)
    # LoRA (B = 0) and adapter (up = 0) add exactly nothing: only the gated prefixes act
    only_prefix = {**tr, "lora": {}, "adapter": {}}
    np.testing.assert_array_equal(
        out, forward(model, m, params, only_prefix, None, _x(), features=True)
    )
    assert float(jnp.abs(out - base).max()) > 1e-4  # prefixes take attention mass at once


def test_gated_branches_equal_their_closed_forms(tiny):
    model, params = tiny
    m = get_method("unipelt", **HP)
    tr = _perturb(m.init(jax.random.key(0), params), scale=0.3)
    log = {}

    def capture(next_fun, args, kwargs, context):  # outermost: original inputs, final outputs
        out = next_fun(*args, **kwargs)
        mod = context.module
        if mod.path[:2] == ("Transformer", "encoderblock_0"):
            log[(mod.name, context.method_name)] = ([np.asarray(a, np.float64) for a in args], out)
        return out

    with nn.intercept_methods(capture):
        forward(model, m, params, tr, None, _x())
    t = _f64(tr)
    blk0 = _f64(params["Transformer"]["encoderblock_0"])
    att = blk0["MultiHeadDotProductAttention_1"]
    # LoRA on the query: x W0 + b + G_L(x)·(α/r)·x Aᵀ Bᵀ
    (x,), q_out = log[("query", "__call__")]
    f = t["lora"][Q]
    want = x @ att["query"]["kernel"].reshape(32, 32) + att["query"]["bias"].reshape(32)
    want = want + _gate(x, f["gate"])[:, :, None] * (ALPHA / R) * (x @ f["A"].T @ f["B"].T)
    np.testing.assert_allclose(np.asarray(q_out).reshape(2, 1 + N, 32), want, rtol=1e-4, atol=1e-5)
    # prefix: softmax(q [G_k P_k; K]ᵀ / √D) [G_v P_v; V], gates read the attention input
    (xa,), _ = log[("MultiHeadDotProductAttention_1", "__call__")]
    (q, k, v), a_out = log[("MultiHeadDotProductAttention_1", "attend")]
    pf = t["prefix"]["encoderblock_0"]
    g = _gate(xa, pf["gate"])  # (B, 2)
    pk = (g[:, 0, None, None] * pf["key"]).reshape(2, P, 2, 16)
    pv = (g[:, 1, None, None] * pf["value"]).reshape(2, P, 2, 16)
    kk, vv = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
    logits = np.einsum("bqhd,bkhd->bhqk", q / 4.0, kk)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(a_out, np.einsum("bhqk,bkhd->bqhd", w, vv), rtol=1e-4, atol=1e-5)
    # adapter after the MLP: y + G_A(y)·(up(ReLU(down y)))
    (h,), mlp_out = log[("MlpBlock_3", "__call__")]
    y = np.asarray(
        vit.MlpBlock(mlp_dim=64).apply(
            {"params": params["Transformer"]["encoderblock_0"]["MlpBlock_3"]},
            jnp.asarray(h, jnp.float32),
            deterministic=True,
        ),
        np.float64,
    )
    a = t["adapter"]["encoderblock_0"]
    br = (
        np.maximum(y @ a["down"]["kernel"] + a["down"]["bias"], 0) @ a["up"]["kernel"]
        + a["up"]["bias"]
    )
    want = y + _gate(y, a["gate"])[:, :, None] * br
    np.testing.assert_allclose(mlp_out, want, rtol=1e-4, atol=1e-5)


def test_trainable_counts_equal_closed_forms_on_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)

    def count(**hp):
        m = get_method("unipelt", **hp)
        tr = jax.eval_shape(lambda q: m.init(jax.random.PRNGKey(0), q), p)
        return count_trainable(m, p, tr)[0]

    L, d, r, p_, m = 12, 768, 8, 10, 48
    lora = 2 * L * r * (d + d) + 2 * L * (d + 1)
    prefix = 2 * L * p_ * d + L * (2 * d + 2)
    adapter = L * (2 * d * m + m + d) + L * (d + 1)
    assert count() == lora + prefix + adapter == 1_419_900
    assert count(prefix_tokens=0) == lora + adapter
    lora4 = 2 * L * 4 * (d + d) + 2 * L * (d + 1)
    adapter96 = L * (2 * d * 96 + 96 + d) + L * (d + 1)
    assert count(rank=4, reduction=8) == lora4 + prefix + adapter96


def test_gradients_reach_every_part_including_the_gates(tiny):
    model, params = tiny
    m = get_method("unipelt", **HP)
    tr = _perturb(m.init(jax.random.key(0), params))

    def loss(t):
        return train.cross_entropy(forward(model, m, params, t, None, _x()), jnp.array([0, 1]))

    g = jax.jit(jax.grad(loss))(tr)
    leaves = zip(paths.leaf_paths(g), jax.tree.leaves(g), strict=True)
    assert not [k for k, v in leaves if not np.any(v)]
    assert sum("gate" in k for k in paths.leaf_paths(g)) == 2 * (4 + 2 + 2)  # kernel + bias


def test_artifact_round_trip_is_bitwise(tiny, tmp_path):
    model, params = tiny
    m = get_method("unipelt", **HP)
    tr = _perturb(m.init(jax.random.key(0), params))
    d = str(tmp_path / "a")
    meta = artifacts.save_artifact(d, method=m, params=params, trainable=tr, base_id="tiny")
    assert meta["numbers"] == count_trainable(m, params, tr)[0]
    arrays = load_file(os.path.join(d, artifacts.WEIGHTS))
    back = default_load(m.init, lambda p, t: t, params, arrays)  # strict against the template
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(tr), strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(
        forward(model, m, params, back, None, _x()), forward(model, m, params, tr, None, _x())
    )
    with pytest.raises(ValueError, match="cannot be merged"):  # input-dependent gates
        artifacts.load_artifact(d, params)


def test_trains_through_the_engine_in_one_trace(tiny, source):
    model, params = tiny
    d = spec("unipelt").defaults
    m = get_method("unipelt", **{**d.kwargs, **d.dry_kwargs})  # the registered dry run
    t0 = m.init(jax.random.key(0), params)
    before = jax.tree.map(np.array, params)
    r = mc.trains_in_one_trace(model, params, m, source)
    losses = [h["train_loss"] for h in r.results["history"]]
    assert r.results["traces"] == 1
    assert losses[-1] < losses[0], losses
    moved = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), r.state.trainable, t0
    )
    assert all(jax.tree.leaves(moved))
    for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(u, v)
