"""LayerNorm tuning ("ln_tuning"): exactly the LayerNorm scales and biases train (with the head),
the ViT-B/16 count (ours and PEFT's), identity, merge, gradients, the engine, artifacts."""

import jax
import method_checks as mc
import numpy as np
import pytest

from guft_jax import paths
from guft_jax.methods import get_method


def test_trains_exactly_the_layernorms_and_the_head(tiny):
    _, params = tiny
    tr = get_method("ln_tuning").init(jax.random.key(0), params)
    norms = [f"Transformer/encoderblock_{i}/LayerNorm_{j}" for i in (0, 1) for j in (0, 2)]
    norms.append("Transformer/encoder_norm")
    want = {f"{n}/{leaf}" for n in norms + ["head"] for leaf in ("scale", "bias")}
    want = want - {"head/scale"} | {"head/kernel"}
    assert set(paths.leaf_paths(tr)) == want
    for p in want:  # initialised to the pretrained values
        np.testing.assert_array_equal(paths.get(tr, p), paths.get(params, p))


def test_count_on_vit_b16_matches_peft():
    # PEFT 0.17.1 LNTuningConfig(target_modules=["layernorm_before", "layernorm_after",
    # "layernorm"]) on Hugging Face's ViT-B/16 trains a copy of each of the 25 LayerNorms
    # (LNTuningLayer.update_layer deep-copies the module): weight and bias, 768 each.
    assert mc.vit_b16_count("ln_tuning") == 25 * 2 * 768 == 38_400
    scales = mc.vit_b16_count("ln_tuning", targets=(r"LayerNorm_\d+/scale$",))
    assert scales == 24 * 768


def test_identity_merge_gradients(tiny):
    m = get_method("ln_tuning")
    mc.identity_at_init(*tiny, m)
    mc.merge_equals_apply(*tiny, m)
    g = mc.gradients_reach_every_trained_leaf(*tiny, m)
    assert set(paths.leaf_paths(g)) == set(paths.leaf_paths(m.init(jax.random.key(0), tiny[1])))


def test_trains_in_one_trace_with_frozen_base(tiny, source):
    _, params = tiny
    r = mc.trains_in_one_trace(*tiny, get_method("ln_tuning"), source)
    moved = jax.device_get(r.state.trainable["Transformer"]["encoder_norm"]["scale"])
    assert np.any(moved != np.asarray(params["Transformer"]["encoder_norm"]["scale"]))


def test_artifact_round_trip(tiny, tmp_path):
    mc.artifact_round_trip(tiny[1], get_method("ln_tuning"), tmp_path)


def test_bad_targets_name_the_field(tiny):
    with pytest.raises(ValueError, match=r"ln_tuning\.targets"):
        get_method("ln_tuning", targets=(r"LayerNorm_9/scale$",)).init(jax.random.key(0), tiny[1])
    with pytest.raises(ValueError, match=r"ln_tuning\.targets"):
        get_method("ln_tuning", targets=())
