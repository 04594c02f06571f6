"""Adapter artifacts know their backbone and every load error names the file (issue 25)."""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest
from fault_rows import record
from safetensors.numpy import load_file, save_file

from guft_jax import artifacts, vit
from guft_jax.methods import get_method


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    _, params = tiny
    m = get_method("lora", rank=2, alpha=3.0)
    tr = m.init(jax.random.key(0), params)
    tr = jax.tree.map(lambda x: x + 0.01, tr)  # B != 0: the merge changes the weights
    d = str(tmp_path_factory.mktemp("art") / "a")
    meta = artifacts.save_artifact(d, method=m, params=params, trainable=tr, base_id="tiny-a")
    return d, meta


def _copy(d, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for name in (artifacts.WEIGHTS, artifacts.META):
        (out / name).write_bytes(open(os.path.join(d, name), "rb").read())
    return out


def test_the_backbone_identity_is_stored_and_checked(tiny, saved):
    _, params = tiny
    d, meta = saved
    assert meta["base_sha256"] == artifacts.backbone_hash(params) and meta["base_id"] == "tiny-a"
    merged, _ = artifacts.load_artifact(d, params, base_id="tiny-a")
    other = vit.init_params(vit.build_model("ViT-tiny/4", num_classes=3), jax.random.key(1), 16)
    assert jax.tree.structure(other) == jax.tree.structure(params)  # same shapes, other weights
    with pytest.raises(artifacts.ArtifactError) as e:
        artifacts.load_artifact(d, other)
    msg = str(e.value)
    assert msg.startswith(f"{d}/adapter.json: trained on backbone 'tiny-a' with weights sha256 ")
    assert meta["base_sha256"][:12] in msg and "check_base=False" in msg and "\n" not in msg
    record("artifacts", "adapter loaded onto another backbone of the same shapes", msg, None)
    with pytest.raises(artifacts.ArtifactError, match="trained on backbone 'tiny-a', not 'vit-b'"):
        artifacts.load_artifact(d, params, base_id="vit-b")
    moved, _ = artifacts.load_artifact(d, other, check_base=False)  # a transfer on purpose
    lora_delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), merged, params)
    moved_delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), moved, other)
    for a, b in zip(jax.tree.leaves(lora_delta), jax.tree.leaves(moved_delta), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_truncated_weights_and_garbled_metadata_name_the_file(tiny, saved, tmp_path):
    _, params = tiny
    d = _copy(saved[0], tmp_path)
    weights, meta = d / artifacts.WEIGHTS, d / artifacts.META
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(artifacts.ArtifactError) as e:
        artifacts.load_artifact(str(d), params)
    assert str(e.value).startswith(f"{weights}: unreadable safetensors file, truncated or corrupt")
    record("artifacts", "truncated adapter.safetensors", str(e.value), None)
    weights.write_bytes(raw)
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(artifacts.ArtifactError, match=f"^{meta}: unreadable artifact metadata"):
        artifacts.load_artifact(str(d), params)
    meta.write_text(json.dumps({"hparams": {}}))
    with pytest.raises(artifacts.ArtifactError, match="without a method name"):
        artifacts.load_artifact(str(d), params)
    weights.unlink()
    meta.write_text(text)
    with pytest.raises(artifacts.ArtifactError, match=f"^{weights}: file not found"):
        artifacts.load_artifact(str(d), params)


def test_a_mismatch_counts_missing_unexpected_and_misshaped_keys(tiny, saved, tmp_path):
    _, params = tiny
    d = _copy(saved[0], tmp_path)
    arrays = load_file(str(d / artifacts.WEIGHTS))
    keys = sorted(k for k in arrays if not k.startswith("head"))
    for k in keys[:2]:  # two missing
        arrays.pop(k)
    arrays["extra/kernel"] = np.zeros(3, np.float32)  # one unexpected
    arrays[keys[2]] = np.zeros((1, 1), np.float32)  # one mis-shaped
    save_file(arrays, str(d / artifacts.WEIGHTS))
    with pytest.raises(artifacts.ArtifactError) as e:
        artifacts.load_artifact(str(d), params)
    err, msg = e.value, str(e.value)
    assert msg.startswith(f"{d / artifacts.WEIGHTS}: does not match method lora")
    assert "2 missing, 1 unexpected, 1 mis-shaped (stored vs expected) keys" in msg
    shown = f"(missing: {keys[0]} (+1); unexpected: extra/kernel; mis-shaped: {keys[2]} (1, 1) vs ("
    assert shown in msg
    assert err.missing == keys[:2] and err.unexpected == ["extra/kernel"]
    assert len(err.misshaped) == 1 and "\n" not in msg
    record("artifacts", "2 missing, 1 unexpected, 1 mis-shaped arrays", msg, None)
    assert isinstance(err, ValueError)
