"""(IA)³ ("ia3"): vectors at 1 of the right sizes, the ViT-B/16 count (ours and PEFT's), merged
weights == the unmerged model with its activations scaled (an interceptor oracle), gradients,
the engine, artifacts, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax import paths
from guft_jax.methods import get_method
from guft_jax.vit import Linear

BLOCKS = ("Transformer/encoderblock_0", "Transformer/encoderblock_1")


def test_vectors_start_at_one_with_peft_sizes(tiny):
    _, params = tiny
    tr = get_method("ia3").init(jax.random.key(0), params)
    want = {}
    for b in BLOCKS:  # key/value: one per output unit; fc2 (feed-forward): one per input unit
        want[f"{b}/MultiHeadDotProductAttention_1/key/kernel"] = 32
        want[f"{b}/MultiHeadDotProductAttention_1/value/kernel"] = 32
        want[f"{b}/MlpBlock_3/Dense_1/kernel"] = 64
    got = {paths.path_of(k): v["ia3_l"] for k, v in tr["ia3"].items()}
    assert {p: v.shape[0] for p, v in got.items()} == want
    assert all(np.all(np.asarray(v) == 1.0) for v in got.values())
    mc.identity_at_init(*tiny, get_method("ia3"))


def test_count_on_vit_b16_matches_peft():
    # PEFT 0.17.1 IA3Config(target_modules=[key, value, fc2], feedforward_modules=[fc2]) on
    # ViT-B/16: IA3Layer.update_layer makes ia3_l of shape (out_features, 1) for key and value
    # and (1, in_features) for the feed-forward fc2, i.e. 12 * (768 + 768 + 3072).
    assert mc.vit_b16_count("ia3") == 12 * (768 + 768 + 3072) == 55_296
    # output scaling of fc1 instead: 12 * 3072 per block
    fc1 = mc.vit_b16_count("ia3", targets=(r"MlpBlock_3/Dense_0/kernel$",), feedforward=())
    assert fc1 == 12 * 3072


def _oracle(trainable, feedforward_layers):
    """An interceptor scaling the activations themselves (no weight is touched): the output of
    every adapted Linear (bias included), or the input of a feed-forward one."""
    table = {}
    for k, v in trainable["ia3"].items():
        layer = paths.path_of(k).rsplit("/", 1)[0]
        table[tuple(layer.split("/"))] = (v["ia3_l"], layer in feedforward_layers)

    def icpt(next_fun, args, kwargs, context):
        hit = table.get(tuple(context.module.path))
        if context.method_name != "__call__" or hit is None:
            return next_fun(*args, **kwargs)
        assert isinstance(context.module, Linear)
        vec, ff = hit
        if ff:
            x = args[0] * vec.reshape(context.module.in_shape)
            return next_fun(x, *args[1:], **kwargs)
        return next_fun(*args, **kwargs) * vec.reshape(context.module.out_shape)

    return icpt


def test_merged_weights_equal_scaled_activations(tiny):
    model, params = tiny
    m = get_method("ia3")
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.2)  # head random too
    ff = {f"{b}/MlpBlock_3/Dense_1" for b in BLOCKS}
    x = mc.images()
    with nn.intercept_methods(_oracle(tr, ff)):
        ref = model.apply({"params": {**params, "head": tr["head"]}}, x)
        ref_tokens = model.apply({"params": params}, x, features=True)
    merged = m.merge(params, tr)
    assert float(jnp.abs(ref - model.apply({"params": params}, x)).max()) > 1e-3
    np.testing.assert_allclose(model.apply({"params": merged}, x), ref, rtol=1e-6, atol=1e-6)
    tokens = model.apply({"params": merged}, x, features=True)
    np.testing.assert_allclose(tokens, ref_tokens, rtol=1e-6, atol=1e-6)
    # fc2's bias is not scaled (input scaling), key/value biases are
    b0 = BLOCKS[0]
    np.testing.assert_array_equal(
        paths.get(merged, f"{b0}/MlpBlock_3/Dense_1/bias"),
        paths.get(params, f"{b0}/MlpBlock_3/Dense_1/bias"),
    )
    mc.merge_equals_apply(model, params, m)


def test_gradients_only_to_vectors_and_head(tiny):
    g = mc.gradients_reach_every_trained_leaf(*tiny, get_method("ia3"))
    assert set(g) == {"head", "ia3"} and all(set(v) == {"ia3_l"} for v in g["ia3"].values())


def test_trains_in_one_trace_with_frozen_base(tiny, source):
    r = mc.trains_in_one_trace(*tiny, get_method("ia3"), source, lr=3e-2)
    vecs = jax.device_get(r.state.trainable["ia3"])
    assert any(np.any(v["ia3_l"] != 1.0) for v in vecs.values())


def test_artifact_round_trip(tiny, tmp_path):
    mc.artifact_round_trip(tiny[1], get_method("ia3"), tmp_path)


def test_bad_input_names_the_field(tiny):
    _, params = tiny
    bad_ff = get_method("ia3", feedforward=(r"MlpBlock_3/Dense_0/kernel$",))
    with pytest.raises(ValueError, match=r"ia3\.feedforward"):
        bad_ff.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"ia3\.targets"):
        get_method("ia3", targets=(r"no_such_layer",)).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"ia3\.targets"):
        get_method("ia3", targets=(r"LayerNorm_0/scale$",)).init(jax.random.key(0), params)


def test_any_param_tree_with_explicit_layout():
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3, 4, 8)), "bias": rng.normal(size=(8,))},
        "fc": {"kernel": rng.normal(size=(8, 5)), "bias": rng.normal(size=(5,))},
        "head": {"kernel": np.zeros((5, 2)), "bias": np.zeros((2,))},
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    hp = dict(targets=(r"^conv/kernel$", r"^fc/kernel$"), feedforward=(r"^fc/kernel$",))
    with pytest.raises(ValueError, match="layout"):  # a 4-D kernel needs its rule
        get_method("ia3", **hp).init(jax.random.key(0), params)
    m = get_method("ia3", layout=((r"^conv/kernel$", 3),), **hp)
    tr = mc.perturb(m.init(jax.random.key(0), params), scale=0.5)
    sizes = {k: v["ia3_l"].shape for k, v in tr["ia3"].items()}
    assert sizes == {"conv.kernel": (8,), "fc.kernel": (8,)}  # conv: out channels; fc: inputs
    lc, lf = (np.asarray(tr["ia3"][k]["ia3_l"]) for k in ("conv.kernel", "fc.kernel"))
    merged = jax.tree.map(np.asarray, m.merge(params, tr))
    p = jax.tree.map(np.asarray, params)
    np.testing.assert_allclose(merged["conv"]["kernel"], p["conv"]["kernel"] * lc, rtol=1e-6)
    np.testing.assert_allclose(merged["conv"]["bias"], p["conv"]["bias"] * lc, rtol=1e-6)
    np.testing.assert_allclose(merged["fc"]["kernel"], lf[:, None] * p["fc"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(merged["fc"]["bias"], p["fc"]["bias"])
