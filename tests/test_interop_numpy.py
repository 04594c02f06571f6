"""The PyTorch converters without torch: name maps, fused/split algebra, refusals, round trips."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from guft_jax import vit
from guft_jax.interop import (
    export_hf,
    export_timm,
    load_peft,
    load_timm,
    peft_io,
    save_peft,
    timm_io,
)
from guft_jax.methods import base as base_lib
from guft_jax.methods import get_method

ATT = "MultiHeadDotProductAttention_1"
SIZES = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def vit_tiny():
    model = vit.VisionTransformer(num_classes=5, gelu_approximate=False, **SIZES)
    params = vit.init_params(model, jax.random.key(0), 16)
    leaves, tdef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tdef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    return model, params


def _flat(tree):
    return {k: np.asarray(v) for k, v in base_lib.flat_arrays(tree).items()}


def _noisy(tree, seed=2):
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tdef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def test_timm_state_dict_round_trip_is_exact(vit_tiny):
    model, params = vit_tiny
    state = export_timm(params, model)
    assert state["blocks.0.attn.qkv.weight"].shape == (96, 32)
    model2, params2 = load_timm(state, num_heads=2)
    assert (model2.gelu_approximate, model2.layer_norm_eps, model2.num_classes) == (False, 1e-6, 5)
    a, b = _flat(params), _flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_timm_qkv_rows_are_q_k_v(vit_tiny):
    _, params = vit_tiny
    state = export_timm(params, vit_tiny[0])
    attn = params["Transformer"]["encoderblock_1"][ATT]
    w = state["blocks.1.attn.qkv.weight"]
    for j, n in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(
            w[32 * j : 32 * (j + 1)], np.asarray(attn[n]["kernel"]).reshape(32, 32).T
        )


def test_hf_export_matches_the_hf_importer(vit_tiny):
    from guft_jax import checkpoint_import as ci

    model, params = vit_tiny
    flat, unknown = ci.hf_to_flat(export_hf(params, model), num_heads=2)
    assert not unknown
    want = _flat(params)
    assert flat.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(flat[k].reshape(want[k].shape), want[k], err_msg=k)


def test_load_timm_refuses_registers_and_unknown_weights(vit_tiny):
    state = export_timm(vit_tiny[1], vit_tiny[0])
    with pytest.raises(ValueError, match="reg_token"):
        load_timm({**state, "reg_token": np.zeros((1, 4, 32))}, num_heads=2)
    with pytest.raises(ValueError, match="fc_norm.weight"):
        load_timm({**state, "fc_norm.weight": np.zeros(32)}, num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        load_timm(state)  # width 32: heads cannot be inferred


def test_torch_linear_names():
    p = f"Transformer/encoderblock_3/{ATT}/key/kernel"
    assert timm_io.torch_linear(p, "timm") == ("blocks.3.attn.qkv", 1)
    assert timm_io.torch_linear(p, "hf") == ("vit.encoder.layer.3.attention.attention.key", None)
    assert timm_io.guft_linear("blocks.3.attn.qkv", "timm") == [
        f"Transformer/encoderblock_3/{ATT}/{n}" for n in ("query", "key", "value")
    ]
    with pytest.raises(ValueError, match="patch_embed.proj"):
        timm_io.guft_linear("patch_embed.proj", "timm")


def _merged(method, params, tr, state=None):
    return _flat(method.merge(params, tr, state))


@pytest.mark.parametrize("name", ["lora", "dora", "adalora", "loha"])
def test_fused_qkv_round_trip_same_weights(vit_tiny, tmp_path, name):
    """Split q/v adapters -> one fused timm qkv adapter -> split again: the same merged weights."""
    _, params = vit_tiny
    hp = dict(init_rank=3, target_rank=2) if name == "adalora" else dict(rank=2)
    method = get_method(name, alpha=3.0, targets=(rf"{ATT}/(query|value)/kernel$",), **hp)
    tr = _noisy(method.init(jax.random.key(3), params))
    config = save_peft(str(tmp_path), method, tr, params=params, base="timm")
    assert config["target_modules"] == r"^(?:blocks\.0\.attn\.qkv|blocks\.1\.attn\.qkv)$"
    loaded = load_peft(str(tmp_path), params, base="timm")
    a, b = _merged(method, params, tr), _merged(loaded.method, params, loaded.trainable)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_lora_fused_rank_and_alpha(vit_tiny, tmp_path):
    _, params = vit_tiny
    method = get_method("lora", rank=2, alpha=3.0, targets=(rf"{ATT}/(query|key|value)/kernel$",))
    config = save_peft(str(tmp_path), method, method.init(jax.random.key(0), params), params=params)
    # rank-2 adapters on q, k, v are one rank-6 adapter with the same scale 3/2
    assert config["rank_pattern"] == {r"0\.attn\.qkv": 6, r"1\.attn\.qkv": 6}
    assert config["alpha_pattern"] == {r"0\.attn\.qkv": 9.0, r"1\.attn\.qkv": 9.0}


def test_adalora_alpha_carries_peft_ranknum_epsilon(vit_tiny, tmp_path):
    _, params = vit_tiny
    m = get_method("adalora", init_rank=4, target_rank=2, alpha=6.0)
    config = save_peft(
        str(tmp_path), m, m.init(jax.random.key(0), params), params=params, base="hf"
    )
    assert math.isclose(config["lora_alpha"] / (config["init_r"] + 1e-5), 6.0 / 4, rel_tol=1e-12)


@pytest.mark.parametrize("name", ["vera", "fourierft"])
def test_vera_fourierft_on_fused_qkv_refused_in_one_line(vit_tiny, tmp_path, name):
    _, params = vit_tiny
    hp = dict(n=8) if name == "fourierft" else dict(rank=4)
    m = get_method(name, **hp)  # default targets: query and value
    with pytest.raises(ValueError, match=r"fused blocks\.0\.attn\.qkv") as e:
        save_peft(str(tmp_path), m, m.init(jax.random.key(0), params), params=params, base="timm")
    assert "\n" not in str(e.value)
    save_peft(str(tmp_path), m, m.init(jax.random.key(0), params), params=params, base="hf")


def test_fourierft_entries_travel_in_peft_order(vit_tiny, tmp_path):
    """Exported spectrum positions are guft_jax's entries in PEFT's permutation order, and the
    imported method uses exactly those entries."""
    _, params = vit_tiny
    m = get_method("fourierft", n=8, alpha=40.0, targets=(r"Dense_0/kernel$",))
    tr = m.init(jax.random.key(0), params)
    config = save_peft(str(tmp_path), m, tr, params=params, base="timm")
    loaded = load_peft(str(tmp_path), params, base="timm")
    key = "Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel"
    spec = np.asarray(loaded.trainable["fourierft"][key])
    assert np.count_nonzero(spec) == 8 and spec.shape[0] <= config["n_frequency"]
    a, b = _merged(m, params, tr), _merged(loaded.method, params, loaded.trainable)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_torch_randperm_is_a_permutation():
    p = peft_io.torch_randperm(1000, 7)
    assert sorted(p.tolist()) == list(range(1000))
    np.testing.assert_array_equal(p, peft_io.torch_randperm(1000, 7))
    assert not np.array_equal(p, peft_io.torch_randperm(1000, 8))


def _write(tmp_path, config, tensors):
    from safetensors.numpy import save_file

    (tmp_path / peft_io.CONFIG).write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / peft_io.WEIGHTS))


def test_unknown_peft_type_refused_in_one_line(vit_tiny, tmp_path):
    _write(tmp_path, {"peft_type": "POLY"}, {"x": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="peft_type 'POLY'") as e:
        load_peft(str(tmp_path), vit_tiny[1])
    assert "\n" not in str(e.value)


def test_unsupported_target_refused_naming_it(vit_tiny, tmp_path):
    a = np.zeros((2, 48), np.float32)
    b = np.zeros((32, 2), np.float32)
    _write(
        tmp_path,
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2},
        {
            "base_model.model.patch_embed.proj.lora_A.weight": a,
            "base_model.model.patch_embed.proj.lora_B.weight": b,
        },
    )
    with pytest.raises(ValueError, match="'patch_embed.proj'") as e:
        load_peft(str(tmp_path), vit_tiny[1])
    assert "\n" not in str(e.value)


def test_guft_selection_as_shira(vit_tiny, tmp_path):
    """GUFT's selected kernel entries become SHiRA indices + values (padded to r·(in+out) with
    zeros); selected biases/LayerNorms go to base_updates; loading back gives the same weights."""
    _, params = vit_tiny
    method = get_method("guft", sparse=False, recompute_epochs=[1], ratios=[0.05])
    tr = method.init(jax.random.key(0), params)
    st = base_lib.init_state(method, params, tr)
    rng = np.random.default_rng(0)
    sel = {k: jax.numpy.asarray(rng.random(m.shape) < 0.05) for k, m in st.selected.items()}
    st = st._replace(selected=sel)
    tr = {"head": tr["head"], "delta": _noisy(tr["delta"], 3)}
    config = save_peft(str(tmp_path), method, tr, params=params, state=st, base="timm")
    assert config["peft_type"] == "SHIRA"
    assert config["guft_jax"]["base_updates"]  # biases / norms selected too
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / peft_io.WEIGHTS))
    w = t["base_model.model.blocks.0.attn.qkv.shira_weight"]
    assert w.shape == (config["r"] * (32 + 96),)
    loaded = load_peft(str(tmp_path), params, base="timm")
    a = _merged(method, params, tr, st)
    b = _merged(loaded.method, loaded.params, loaded.trainable)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_method_without_peft_form_is_a_merged_export(vit_tiny, tmp_path):
    _, params = vit_tiny
    m = get_method("bitfit")
    tr = _noisy(m.init(jax.random.key(0), params))
    assert save_peft(str(tmp_path), m, tr, params=params) == {"format": "merged"}
    from safetensors.numpy import load_file

    model2, p2 = load_timm(load_file(str(tmp_path / peft_io.MERGED)), num_heads=2)
    a, b = _flat(m.merge(params, tr)), _flat(p2)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=0, err_msg=k)


def test_bad_base_names_allowed_values(vit_tiny, tmp_path):
    m = get_method("lora")
    with pytest.raises(ValueError, match=r"base: 'torch' not in \['timm', 'hf'\]"):
        save_peft(
            str(tmp_path),
            m,
            m.init(jax.random.key(0), vit_tiny[1]),
            params=vit_tiny[1],
            base="torch",
        )


@pytest.mark.parametrize("base", ["timm", "hf"])
@pytest.mark.parametrize("name", ["ia3", "ln_tuning"])
def test_ia3_ln_tuning_round_trip_same_weights(vit_tiny, tmp_path, name, base):
    _, params = vit_tiny
    method = get_method(name)
    tr = _noisy(method.init(jax.random.key(3), params))
    config = save_peft(str(tmp_path), method, tr, params=params, base=base)
    if name == "ia3" and base == "timm":  # key/value output scaling on the fused qkv, q at 1
        assert config["feedforward_modules"] == r"^(?:blocks\.0\.mlp\.fc2|blocks\.1\.mlp\.fc2)$"
    loaded = load_peft(str(tmp_path), params, base=base)
    a, b = _merged(method, params, tr), _merged(loaded.method, params, loaded.trainable)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_ia3_feedforward_on_fused_qkv_needs_one_vector(vit_tiny, tmp_path):
    _, params = vit_tiny
    qkv = rf"{ATT}/(query|key|value)/kernel$"
    m = get_method("ia3", targets=(qkv,), feedforward=(qkv,))
    tr = _noisy(m.init(jax.random.key(0), params))
    with pytest.raises(ValueError, match=r"fused blocks\.0\.attn\.qkv needs one vector"):
        save_peft(str(tmp_path), m, tr, params=params, base="timm")


@pytest.mark.parametrize("base", ["timm", "hf"])
def test_lokr_round_trip_and_fused_refusal(vit_tiny, tmp_path, base):
    _, params = vit_tiny
    m = get_method("lokr", rank=2, alpha=3.0, targets=(r"Dense_[01]/kernel$",))
    tr = _noisy(m.init(jax.random.key(0), params))
    save_peft(str(tmp_path), m, tr, params=params, base=base)
    loaded = load_peft(str(tmp_path), params, base=base)
    a, b = _merged(m, params, tr), _merged(loaded.method, params, loaded.trainable)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=k)
    if base == "timm":
        m = get_method("lokr", rank=2, alpha=3.0)  # query and value: timm's fused qkv
        with pytest.raises(ValueError, match=r"lokr on timm's fused blocks\.0\.attn\.qkv"):
            save_peft(str(tmp_path), m, m.init(jax.random.key(0), params), params=params)


def test_load_timm_new_head_is_zero(vit_tiny):
    state = export_timm(vit_tiny[1], vit_tiny[0])
    model, params = load_timm(state, num_heads=2, num_classes=7)
    assert model.num_classes == 7 and params["head"]["kernel"].shape == (32, 7)
    assert not np.any(np.asarray(params["head"]["kernel"]))
    np.testing.assert_array_equal(params["cls"], vit_tiny[1]["cls"])


@pytest.mark.parametrize("base", ["timm", "hf"])
@pytest.mark.parametrize(
    "name, hp",
    [("oft", dict(oft_block_size=8)), ("boft", dict(boft_block_size=4)), ("hra", dict(r=2))],
)
def test_input_side_methods_round_trip(vit_tiny, tmp_path, name, hp, base):
    """OFT/BOFT/HRA: 1:1 on separate Linears; on timm's fused qkv only q, k, v sharing one
    input transform (refused otherwise, in one line)."""
    _, params = vit_tiny
    m = get_method(name, targets=(rf"{ATT}/out/kernel$|Dense_0/kernel$",), **hp)
    tr = _noisy(m.init(jax.random.key(0), params))
    save_peft(str(tmp_path), m, tr, params=params, base=base)
    loaded = load_peft(str(tmp_path), params, base=base)
    a, b = _merged(m, params, tr), _merged(loaded.method, params, loaded.trainable)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
    if base == "timm":
        m = get_method(name, **hp)  # query and value only: the fused input transform hits k too
        with pytest.raises(ValueError, match=rf"{name} on timm's fused blocks\.0\.attn\.qkv") as e:
            save_peft(str(tmp_path), m, _noisy(m.init(jax.random.key(0), params)), params=params)
        assert "\n" not in str(e.value)
