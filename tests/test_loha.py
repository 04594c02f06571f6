"""LoHa ("loha"): PEFT's init (one factor zero, Kaiming bounds), ΔW against a numpy oracle with
α ≠ r, the closed-form count (ours and PEFT's), identity, merge, gradients, the engine, artifacts,
bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import paths
from guft_jax.methods import get_method
from guft_jax.methods.loha import loha_delta

R, ALPHA = 4, 6.0  # α ≠ r, so a wrong scale would show
Q0 = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"


def test_init_follows_peft(tiny):
    _, params = tiny
    tr = get_method("loha", rank=R, alpha=ALPHA).init(jax.random.key(0), params)
    assert len(tr["loha"]) == 4  # query and value of 2 blocks
    f = jax.device_get(tr["loha"][paths.key_of(Q0)])
    shapes = {k: v.shape for k, v in f.items()}
    assert shapes == {
        "hada_w1_a": (32, R),
        "hada_w1_b": (R, 32),
        "hada_w2_a": (32, R),
        "hada_w2_b": (R, 32),
    }
    assert np.all(f["hada_w2_b"] == 0)
    # kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(fan_in)), fan_in = the second dim
    for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
        bound = 1 / np.sqrt(f[k].shape[1])
        assert np.all(np.abs(f[k]) <= bound) and np.abs(f[k]).max() > 0.5 * bound, k
    mc.identity_at_init(*tiny, get_method("loha", rank=R, alpha=ALPHA))


def test_delta_matches_numpy_hadamard_of_two_low_rank_products(tiny):
    _, params = tiny
    m = get_method("loha", rank=R, alpha=ALPHA)
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.3)
    merged = m.merge(params, tr)
    for k, f in jax.device_get(tr["loha"]).items():
        p = paths.path_of(k)
        w1 = np.asarray(f["hada_w1_a"], np.float64) @ np.asarray(f["hada_w1_b"], np.float64)
        w2 = np.asarray(f["hada_w2_a"], np.float64) @ np.asarray(f["hada_w2_b"], np.float64)
        want = (ALPHA / R) * (w1 * w2)  # torch (out, in)
        got = np.asarray(paths.get(merged, p) - paths.get(params, p), np.float64)
        np.testing.assert_allclose(got.reshape(32, 32), want.T, rtol=1e-5, atol=1e-6)
        assert np.abs(want).max() > 1e-3


def unmerged_interceptor(deltas):
    """PEFT's unmerged forward on the frozen params: the 2-D matmul of each adapted layer
    (``{param path of its kernel: (in, out) ΔW}``) becomes ``x @ W0 + x @ ΔW``."""
    table = {tuple(p.split("/")[:-1]): d for p, d in deltas.items()}

    def icpt(next_fun, args, kwargs, context):
        d = table.get(tuple(context.module.path))
        if context.method_name != "matmul" or d is None:
            return next_fun(*args, **kwargs)
        return next_fun(*args, **kwargs) + args[0] @ d

    return icpt


def assert_unmerged_equals_merged(model, params, m, tr, delta):
    """The merged forward equals the unmerged one (``delta(factors)`` added to each adapted
    layer's matmul). In float32 they differ by rounding only (``x @ (W0 + ΔW)`` vs ``x @ W0 +
    x @ ΔW``, ~3e-6 on tokens of size ~1 after two blocks), so 1e-5 there; the same comparison
    in float64 agrees to 1e-10, which shows that the float32 gap is rounding, not a scale or
    layout error."""
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-10)):
        with jax.enable_x64(dtype == jnp.float64):
            p, t = jax.tree.map(lambda a, d=dtype: jnp.asarray(a, d), (params, tr))
            x = mc.images().astype(dtype)
            deltas = {paths.path_of(k): delta(f) for k, f in t[m.name].items()}
            with nn.intercept_methods(unmerged_interceptor(deltas)):
                ref = model.apply({"params": p}, x, features=True)
            base = model.apply({"params": p}, x, features=True)
            assert ref.dtype == dtype and float(jnp.abs(ref - base).max()) > 1e-3
            got = model.apply({"params": m.merge(p, t)}, x, features=True)
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


def test_unmerged_forward_equals_merged(tiny):
    model, params = tiny
    m = get_method("loha", rank=R, alpha=ALPHA)
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.3)
    assert_unmerged_equals_merged(model, params, m, tr, lambda f: loha_delta(f, ALPHA / R))


def test_count_closed_form_and_peft():
    # 2·r·(d_in + d_out) per kernel. PEFT 0.17.1 LoHaConfig(r=8, target_modules=["query",
    # "value"]) on ViT-B/16: create_adapter_parameters makes hada_w1_a/w2_a (768, 8) and
    # hada_w1_b/w2_b (8, 768) per layer, 4·6144 = 24,576, times 24 layers.
    assert mc.vit_b16_count("loha") == 24 * 2 * 8 * (768 + 768) == 589_824
    mlp = mc.vit_b16_count("loha", rank=4, targets=(r"MlpBlock_3/Dense_[01]/kernel$",))
    assert mlp == 12 * 2 * (2 * 4 * (768 + 3072))


def test_merge_gradients_artifact(tiny, tmp_path):
    m = get_method("loha", rank=R, alpha=ALPHA)
    mc.merge_equals_apply(*tiny, m)
    g = mc.gradients_reach_every_trained_leaf(*tiny, m)
    assert set(g) == {"head", "loha"}
    mc.artifact_round_trip(tiny[1], m, tmp_path)


def test_trains_in_one_trace_with_frozen_base(tiny, source):
    r = mc.trains_in_one_trace(*tiny, get_method("loha", rank=R, alpha=ALPHA), source)
    f = jax.device_get(r.state.trainable["loha"][paths.key_of(Q0)])
    assert np.any(f["hada_w2_b"] != 0)  # the zero factor moved


@pytest.mark.parametrize(
    "hp, field", [(dict(rank=0), "loha.rank"), (dict(alpha=0.0), "loha.alpha")]
)
def test_bad_hyperparameters_name_the_field(hp, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        get_method("loha", **hp)


def test_bad_targets_name_the_field(tiny):
    with pytest.raises(ValueError, match=r"loha\.targets"):
        get_method("loha", targets=(r"no_such/kernel$",)).init(jax.random.key(0), tiny[1])
