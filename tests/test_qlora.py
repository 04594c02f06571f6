"""QLoRA: NF4 code values against the paper's quantile construction (scipy) and bitsandbytes'
published table, quantisation against a numpy reference, the measured memory of the prepared
base, logits vs the unquantised model, identity to the dequantised base, closed-form counts,
merge into the dequantised base, gradients, artifacts, the engine."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest
from scipy.stats import norm

from guft_jax import artifacts, paths, vit
from guft_jax.methods import forward, get_method, nf4
from guft_jax.methods import qlora as ql
from guft_jax.methods.report import count_trainable

# bitsandbytes' NF4 table (functional.py, ``create_normal_map(offset=0.9677083)``), float32.
BNB_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

# Stated tolerances, relative L2 errors of the quantised model at init vs the unquantised one,
# measured on the randomly initialised ViT-tiny/4 (16 px, these 8 images, a N(0, 1/d) head):
# kernels 0.089-0.094 (NF4's own error on Gaussian blocks of 64 is 0.092), final tokens 0.140,
# logits 0.281 (errors compound over 6 quantised matrices per block and the final LayerNorm of an
# untrained net; a trained, near-Gaussian checkpoint quantises no worse per matrix).
TOKENS_RTOL, LOGITS_RTOL, KERNEL_RTOL = 0.2, 0.4, 0.1


def test_nf4_values_are_the_papers_normal_quantiles():
    # QLoRA §3: 2^(k-1) + 1 = 9 positive levels and 2^(k-1) = 8 negative ones, evenly spaced in
    # probability from δ = ½(1 − 1/30 + 1 − 1/32) down to ½ (which is the shared zero), mapped
    # through Φ⁻¹, one zero dropped, normalised to [−1, 1].
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = norm.ppf(delta - np.arange(8) * (delta - 0.5) / 8)
    neg = -norm.ppf(delta - np.arange(7) * (delta - 0.5) / 7)
    ref = np.sort(np.concatenate([neg, [0.0], pos])) / pos.max()
    v = nf4.nf4_values()
    assert v.shape == (16,) and v.dtype == np.float32 and np.all(np.diff(v) > 0)
    np.testing.assert_allclose(v, ref, rtol=0, atol=1e-7)
    np.testing.assert_allclose(v, BNB_NF4, rtol=0, atol=5e-7)
    assert v[7] == 0.0 and v[0] == -1.0 and v[-1] == 1.0
    d = nf4.dynamic_map()
    assert d.shape == (256,) and len(np.unique(d)) == 256 and 0.0 in d and d.max() == 1.0


def _numpy_nf4(w, block=64, block2=256):
    """An independent numpy reference: nearest code by argmin, high nibble first, double
    quantisation with the dynamic map."""
    flat = np.asarray(w, np.float64).reshape(-1)
    n = flat.size
    nb = -(-n // block)
    blocks = np.pad(flat, (0, nb * block - n)).reshape(nb, block)
    absmax = np.abs(blocks).max(1).astype(np.float32)
    scaled = (blocks.astype(np.float32) / absmax[:, None]).astype(np.float64)
    q = nf4.nf4_values().astype(np.float64)
    codes = np.abs(scaled[..., None] - q).argmin(-1).reshape(-1)[:n].astype(np.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    mean = absmax.astype(np.float64).mean()
    c = np.pad(absmax - mean, (0, -(-nb // block2) * block2 - nb)).reshape(-1, block2)
    s = np.abs(c).max(1)
    dm = nf4.dynamic_map().astype(np.float64)
    acodes = np.abs((c / s[:, None])[..., None] - dm).argmin(-1).reshape(-1)[:nb]
    deq_absmax = dm[acodes] * np.repeat(s, block2)[:nb] + mean
    deq = np.pad(q[codes], (0, nb * block - n)).reshape(nb, block) * deq_absmax[:, None]
    return packed, acodes, deq.reshape(-1)[:n].reshape(np.shape(w))


@pytest.mark.parametrize("shape", [(32, 2, 16), (64, 30), (7, 3, 10)])
def test_quantize_matches_a_numpy_reference(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    q = nf4.quantize(jnp.asarray(w))
    packed, acodes, deq = _numpy_nf4(w)
    assert q["codes"].shape == shape[:-1] + (shape[-1] // 2,) and q["codes"].dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(q["codes"]).reshape(-1), packed)
    np.testing.assert_array_equal(np.asarray(q["absmax"]), acodes)
    np.testing.assert_allclose(nf4.dequantize(q), deq, rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(deq - w) / np.linalg.norm(w) < KERNEL_RTOL
    with pytest.raises(ValueError, match="even"):
        nf4.quantize(jnp.zeros((4, 3)))


def test_memory_of_the_prepared_base_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    m = get_method("qlora")
    prepared = jax.eval_shape(m.hooks.prepare_base, p)
    held, orig = ql.quantized_bytes(prepared)
    L, d, mlp = 12, 768, 3072
    assert orig == 4 * L * (4 * d * d + 2 * d * mlp)  # every Dense kernel of the blocks
    ratio = held / orig
    assert ratio <= 0.3 and abs(ratio - 0.12897) < 1e-4, ratio  # 4.127 bits per entry
    # the quantised kernels are gone from their places (no fp32 copy is kept)
    assert not any(
        p_.startswith("Transformer/encoderblock_") and p_.endswith("/kernel")
        for p_ in paths.leaf_paths({k: v for k, v in prepared.items() if k != ql.QUANT_KEY})
    )


def test_closed_form_trainable_counts_on_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    m = get_method("qlora", rank=8)
    L, d, mlp, r = 12, 768, 3072, 8
    # LoRA on q, k, v, out (d -> d) and fc1 (d -> mlp), fc2 (mlp -> d): r·(in + out) each
    expect = L * r * (4 * (d + d) + 2 * (d + mlp))
    assert expect == 1_327_104
    for base in (p, jax.eval_shape(m.hooks.prepare_base, p)):  # raw or prepared base
        tr = jax.eval_shape(lambda q, m=m: m.init(jax.random.PRNGKey(0), q), base)
        assert count_trainable(m, base, tr) == (expect, 10 * d + 10)
    qv = get_method("qlora", rank=8, targets=(r"(query|value)/kernel$",))
    tr = jax.eval_shape(lambda q: qv.init(jax.random.PRNGKey(0), q), p)
    assert count_trainable(qv, p, tr)[0] == 2 * L * r * (d + d) == 294_912  # = lora's default


def _random_head(params, seed=5):
    k = params["head"]["kernel"]
    w = jax.random.normal(jax.random.key(seed), k.shape) / np.sqrt(k.shape[0])
    return {**params["head"], "kernel": w}


def test_init_equals_dequantised_base_and_is_close_to_the_original(tiny):
    model, params = tiny
    m = get_method("qlora", rank=4, alpha=12.0)
    prepared = m.hooks.prepare_base(params)
    assert m.hooks.prepare_base(prepared) is prepared  # idempotent
    held, orig = ql.quantized_bytes(prepared)
    assert held / orig <= 0.3
    tr = m.init(jax.random.key(0), prepared)
    tr = {**tr, "head": _random_head(params)}
    x = jax.random.normal(jax.random.key(7), (8, 16, 16, 3))

    @jax.jit
    def run(prepared, tr, plain, deq):
        f = lambda p: model.apply({"params": p}, x, features=True)  # noqa: E731
        q = forward(model, m, prepared, tr, None, x, features=True)
        ql_ = forward(model, m, prepared, tr, None, x)
        return (
            q,
            ql_,
            f(deq),
            model.apply({"params": deq}, x),
            f(plain),
            model.apply({"params": plain}, x),
        )

    deq = {**ql.dequantize_base(prepared), "head": tr["head"]}
    plain = {**params, "head": tr["head"]}
    q_tok, q_log, d_tok, d_log, p_tok, p_log = run(prepared, tr, plain, deq)
    # B = 0: exactly the dequantised base
    np.testing.assert_allclose(q_tok, d_tok, rtol=0, atol=1e-6)
    np.testing.assert_allclose(q_log, d_log, rtol=0, atol=1e-6)
    # and within the stated tolerance of the unquantised model
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    assert rel(q_tok, p_tok) < TOKENS_RTOL, rel(q_tok, p_tok)
    assert rel(q_log, p_log) < LOGITS_RTOL, rel(q_log, p_log)
    for k in prepared[ql.QUANT_KEY]:
        w, w_deq = paths.get(params, paths.path_of(k)), paths.get(deq, paths.path_of(k))
        assert rel(w_deq, w) < KERNEL_RTOL


def test_merge_gradients_and_artifact(tiny, tmp_path):
    model, params = tiny
    m = get_method("qlora", rank=4, alpha=12.0)  # α ≠ r: a scaling error would show
    prepared = m.hooks.prepare_base(params)
    tr = m.init(jax.random.key(0), prepared)
    rng = np.random.default_rng(1)
    tr = jax.tree.map(lambda v: v + 0.1 * rng.standard_normal(v.shape, np.float32), tr)
    x = jax.random.normal(jax.random.key(7), (4, 16, 16, 3))

    @jax.jit
    def run(tr, merged):
        def loss(t):
            return jnp.sum(forward(model, m, prepared, t, None, x) ** 2)

        return (
            forward(model, m, prepared, tr, None, x),
            model.apply({"params": merged}, x),
            (jax.grad(loss)(tr)),
        )

    merged = m.merge(prepared, tr)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    a, b, g = run(tr, merged)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # LoRA merged into deq(W)
    # gradients reach every LoRA factor and the head; the base is uint8 codes, never differentiated
    assert set(g) == {"head", "qlora"} and len(g["qlora"]) == 12
    assert all(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(g))
    assert all(
        q["codes"].dtype == q["absmax"].dtype == jnp.uint8 for q in prepared[ql.QUANT_KEY].values()
    )
    # artifact: the LoRA factors and the head; loads bitwise onto the prepared or the fp32 base
    meta = artifacts.save_artifact(str(tmp_path / "a"), method=m, params=prepared, trainable=tr)
    assert meta["numbers"] == count_trainable(m, prepared, tr)[0]
    for base in (prepared, params):
        loaded, _ = artifacts.load_artifact(str(tmp_path / "a"), base)
        for u, v in zip(jax.tree.leaves(loaded), jax.tree.leaves(merged), strict=True):
            np.testing.assert_array_equal(u, v)


def test_trains_through_the_engine_in_one_trace(tiny, source):
    model, params = tiny
    m = get_method("qlora", rank=2, alpha=4.0)
    r = mc.trains_in_one_trace(model, params, m, source)
    losses = [h["train_loss"] for h in r["history"]]
    assert r.results["traces"] == 1 and losses[-1] < losses[0], losses
    assert any(np.any(f["B"] != 0) for f in jax.device_get(r.state.trainable["qlora"]).values())
