"""Adapter, AdaptFormer and Compacter (issue 14): identity at init, the sub-layer closed forms,
trainable counts on ViT-B/16, gradients, merge of linear adapters, artifacts, the engine."""

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
from guft_jax.methods.adapters import kron_sum
from guft_jax.methods.base import default_load
from guft_jax.methods.report import count_trainable

NAMES = ("adapter", "adaptformer", "compacter")
TINY = {  # hyperparameters for ViT-tiny/4 (d = 32)
    "adapter": dict(reduction=8),
    "adaptformer": dict(bottleneck=8, scale=0.1),
    "compacter": dict(reduction=8, n=2, rank=2),
}


def _x():
    return jax.random.normal(jax.random.key(7), (2, 16, 16, 3))


def _perturb(tree, seed=1):
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tdef.unflatten(
        [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _capture(log):
    """An outermost test interceptor: records (block, kind, input, final output) of sub-layers."""

    def icpt(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, vit.Attention | vit.MlpBlock):
            log[(mod.path[-2], type(mod).__name__)] = (args[0], out)
        return out

    return icpt


def _sublayer(params, block, kind, x):
    """The pretrained sub-layer alone (no interceptor)."""
    if kind == "Attention":
        mod, name = vit.Attention(num_heads=2), "MultiHeadDotProductAttention_1"
    else:
        mod, name = vit.MlpBlock(mlp_dim=64), "MlpBlock_3"
    p = params["Transformer"][block][name]
    return mod.apply({"params": p}, x, deterministic=True)


def _np(f):
    return {k: np.asarray(v, np.float64) for k, v in f.items()}


@pytest.mark.parametrize("name", NAMES + ("compacter_linear",))
def test_identity_at_init(name, tiny):
    model, params = tiny
    hp = dict(TINY["compacter"], act="identity") if name == "compacter_linear" else TINY[name]
    m = get_method(name.split("_")[0], **hp)
    tr = m.init(jax.random.key(0), params)
    # compare tokens: the zero-initialised head would hide any backbone change in the logits
    out = forward(model, m, params, tr, None, _x(), features=True)
    np.testing.assert_array_equal(out, model.apply({"params": params}, _x(), features=True))


def test_adapter_and_adaptformer_closed_forms(tiny):
    """Houlsby: y + up(gelu(down y)) on attention and MLP outputs; AdaptFormer:
    MLP(h) + s·up(relu(down h)) with h the LayerNorm'd MLP input."""
    model, params = tiny
    gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    for name in ("adapter", "adaptformer"):
        m = get_method(name, **TINY[name])
        tr = _perturb(m.init(jax.random.key(0), params))
        log = {}
        with nn.intercept_methods(_capture(log)):
            forward(model, m, params, tr, None, _x())
        for blk in ("encoderblock_0", "encoderblock_1"):
            for kind, pos in (("Attention", "attn"), ("MlpBlock", "mlp")):
                x, out = log[(blk, kind)]
                y = np.asarray(_sublayer(params, blk, kind, x), np.float64)
                if name == "adapter":
                    f = tr["adapter"][blk][pos]
                    dn, up = _np(f["down"]), _np(f["up"])
                    want = y + gelu(y @ dn["kernel"] + dn["bias"]) @ up["kernel"] + up["bias"]
                elif kind == "MlpBlock":
                    f = tr["adaptformer"][blk]
                    dn, up = _np(f["down"]), _np(f["up"])
                    h = np.asarray(x, np.float64)
                    want = y + 0.1 * (
                        relu(h @ dn["kernel"] + dn["bias"]) @ up["kernel"] + up["bias"]
                    )
                else:
                    want = y  # AdaptFormer leaves attention alone
                np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-5)


def test_compacter_kronecker_sum_and_sharing(tiny):
    _, params = tiny
    rng = np.random.default_rng(0)
    n, p, q, r = 3, 4, 2, 2
    a, s, t = rng.normal(size=(n, n, n)), rng.normal(size=(n, p, r)), rng.normal(size=(n, r, q))
    want = sum(np.kron(a[i], s[i] @ t[i]) for i in range(n))
    got = kron_sum(*(jnp.asarray(z, jnp.float32) for z in (a, s, t)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A_i: one (n, n, n) set for down- and one for up-projections, shared by all adapters
    tr = get_method("compacter", **TINY["compacter"]).init(jax.random.key(0), params)
    c = tr["compacter"]
    assert {k: v.shape for k, v in c["shared"].items()} == {"down": (2, 2, 2), "up": (2, 2, 2)}
    per_adapter = {k for b, v in c.items() if b != "shared" for k in paths.leaf_paths(v)}
    assert {k.rsplit("/", 1)[1] for k in per_adapter} == {"s", "t", "bias"}
    assert c["encoderblock_0"]["attn"]["down"]["s"].shape == (2, 16, 2)  # (n, d/n, r)
    assert c["encoderblock_0"]["attn"]["up"]["t"].shape == (2, 2, 16)  # (n, r, d/n), zero
    assert not np.any(np.asarray(c["encoderblock_1"]["mlp"]["up"]["t"]))


def test_trainable_counts_equal_closed_forms_on_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)

    def count(name, **hp):
        m = get_method(name, **hp)
        tr = jax.eval_shape(lambda q: m.init(jax.random.PRNGKey(0), q), p)
        return count_trainable(m, p, tr)

    L, d = 12, 768
    m = d // 8
    assert count("adapter") == (2 * L * (2 * d * m + m + d), 10 * (d + 1)) == (3_559_680, 7_690)
    assert count("adapter", positions=("mlp",), reduction=16)[0] == L * (2 * d * 48 + 48 + d)
    m = 64
    assert count("adaptformer")[0] == L * (2 * d * m + m + d) == 1_189_632
    n, r, m = 4, 1, 96
    assert count("compacter")[0] == 2 * n**3 + 2 * L * (2 * r * (d + m) + m + d) == 62_336
    assert count("compacter", n=8, rank=2)[0] == 2 * 8**3 + 2 * L * (2 * 2 * (d + m) + m + d)


@pytest.mark.parametrize("name", ["adapter", "compacter"])
def test_linear_adapters_merge_into_the_preceding_layer(name, tiny):
    model, params = tiny
    m = get_method(name, **TINY[name], act="identity")
    tr = _perturb(m.init(jax.random.key(0), params))
    a = forward(model, m, params, tr, None, _x(), features=True)
    merged = m.merge(params, tr)
    b = model.apply({"params": merged}, _x(), features=True)
    assert float(jnp.abs(a - model.apply({"params": params}, _x(), features=True)).max()) > 1e-2
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    assert get_method(name, **TINY[name]).merge is None  # nonlinear: not mergeable


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_trained_leaf_and_nothing_else_moves(name, tiny):
    model, params = tiny
    m = get_method(name, **TINY[name])
    tr = _perturb(m.init(jax.random.key(0), params))
    y = jnp.array([0, 1])

    def loss(t):
        return train.cross_entropy(forward(model, m, params, t, None, _x()), y)

    g = jax.jit(jax.grad(loss))(tr)
    leaves = zip(paths.leaf_paths(g), jax.tree.leaves(g), strict=True)
    assert not [k for k, v in leaves if not np.any(v)]
    # the engine differentiates only this tree; the frozen base is an argument (see the fit test)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(tr)


def _trainable_back(directory, m, params):
    """The artifact's arrays strictly checked against the method's template, as a tree."""
    arrays = load_file(os.path.join(directory, artifacts.WEIGHTS))
    return default_load(m.init, lambda p, t: t, params, arrays)


@pytest.mark.parametrize("name", NAMES + ("adapter_linear",))
def test_artifact_round_trip_is_bitwise(name, tiny, tmp_path):
    model, params = tiny
    base = name.split("_")[0]
    hp = dict(TINY[base], act="identity") if name == "adapter_linear" else TINY[base]
    m = get_method(base, **hp)
    tr = _perturb(m.init(jax.random.key(0), params))
    d = str(tmp_path / "a")
    meta = artifacts.save_artifact(d, method=m, params=params, trainable=tr, base_id="tiny")
    assert meta["numbers"] == count_trainable(m, params, tr)[0]
    back = _trainable_back(d, m, params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tr)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(tr), strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(
        forward(model, m, params, back, None, _x()), forward(model, m, params, tr, None, _x())
    )
    if m.merge is None:  # additive and nonlinear: no plain params to load into
        with pytest.raises(ValueError, match="cannot be merged"):
            artifacts.load_artifact(d, params)
    else:
        merged, meta2 = artifacts.load_artifact(d, params)
        assert meta2["hparams"]["act"] == "identity"
        for u, v in zip(jax.tree.leaves(merged), jax.tree.leaves(m.merge(params, tr)), strict=True):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("name", NAMES)
def test_trains_through_the_engine_in_one_trace(name, tiny, source):
    model, params = tiny
    d = spec(name).defaults
    m = get_method(name, **{**(d.kwargs or {}), **(d.dry_kwargs or {})})  # the registered dry run
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
    tr = r.state.trainable[name]
    ups = [v for p, v in zip(paths.leaf_paths(tr), jax.tree.leaves(tr), strict=True) if "up/" in p]
    assert ups and all(np.any(np.asarray(u)) for u in ups)  # zero-initialised parts moved
    for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(u, v)
