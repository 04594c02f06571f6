"""Mixed precision (bf16 compute, fp32 master weights) and rematerialisation (issue 16)."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest
from conftest import make_source

from guft_jax import guft, paths, train, vit
from guft_jax.methods import get_method


def _model(**kw):
    return vit.build_model("ViT-tiny/4", num_classes=3, **kw)


def _fit(model, params, method, epochs=3, precision=None):
    return train.fit(
        model,
        params,
        method,
        make_source(),
        mc.tiny_config(precision=precision, epochs=epochs, weight_decay=1e-2, head_lr=None),
        hooks=mc.print_nothing,
    )


def test_bf16_forward_is_bf16_inside_and_close_to_fp32(tiny):
    _, params = tiny
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    f32 = _model().apply({"params": params}, x, features=True)
    b16 = _model(dtype=jnp.bfloat16).apply({"params": params}, x, features=True)
    assert b16.dtype == jnp.bfloat16 and f32.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: tokens after the final LayerNorm agree to ~1e-2 of their scale
    np.testing.assert_allclose(np.asarray(b16, np.float32), f32, atol=0.08, rtol=0.05)


@pytest.mark.parametrize("name", ["lora", "full"])
def test_bf16_training_tracks_the_fp32_loss_curve(name, tiny):
    _, params = tiny
    m = get_method(name, rank=2, alpha=4.0) if name == "lora" else get_method(name)
    a = _fit(_model(), params, m, precision="fp32")
    b = _fit(_model(), params, m, precision="bf16")
    la = [h["train_loss"] for h in a.results["history"]]
    lb = [h["train_loss"] for h in b.results["history"]]
    # stated tolerance: per-epoch mean loss within 3% (relative) of fp32's, and falling alike
    np.testing.assert_allclose(lb, la, rtol=0.03)
    assert lb[-1] < lb[0]
    # master weights and optimizer state stay float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(b.state.trainable))


def test_frozen_entries_stay_bitwise_under_bf16(tiny):
    _, params = tiny
    m = guft.guft(recompute_epochs=[1, 2], ratios=[0.02, 0.02], sparse=False)
    r = _fit(_model(), params, m, epochs=2, precision="bf16")
    assert r.results["precision"] == "bfloat16"
    eff = m.merge(params, r.state.trainable, r.state.method_state)
    for key, mask in r.state.method_state.selected.items():
        p = paths.path_of(key)
        w0, w = np.asarray(paths.get(params, p)), np.asarray(paths.get(eff, p))
        mask = np.asarray(mask)
        assert np.array_equal(w[~mask].view(np.uint32), w0[~mask].view(np.uint32)), p


def test_remat_gives_the_same_gradients(tiny):
    _, params = tiny
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    params = dict(params, head=jax.tree.map(lambda v: v + 0.1, params["head"]))

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)

    for a, b in zip(jax.tree.leaves(grads(_model())), jax.tree.leaves(grads(_model(remat=True))),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_policy_resolution_and_errors(tiny):
    from guft_jax import precision as pl

    assert (
        pl.resolve_precision("auto", backend="gpu")
        == "bf16"
        == pl.resolve_precision("auto", backend="tpu")
    )
    assert pl.resolve_precision("auto", backend="cpu") == pl.CPU_DEFAULT
    assert pl.resolve_precision("fp32", backend="gpu") == "fp32"
    with pytest.raises(ValueError, match="precision: must be one of fp32, bf16, auto"):
        pl.resolve_precision("fp16")
    model, _ = tiny
    b16 = pl.with_precision(model, "bf16")
    assert b16.dtype == jnp.bfloat16 and model.dtype is None
    assert pl.with_precision(model, "bf16") is b16  # one clone: jit caches keep hitting
    assert pl.with_precision(model, "fp32") is model and pl.with_precision(model, None) is model
    with pytest.raises(ValueError, match="precision='bf16' needs a model with a `dtype` field"):
        pl.with_precision(object(), "bf16")


def test_clone_cache_is_keyed_on_the_model_value_and_bounded():
    """Equal models share one clone; past the cache size the oldest clone is let go (a weakref
    to it dies), so a process that builds many models does not keep them all."""
    import gc
    import weakref

    from guft_jax import precision as pl

    a, b = _model(drop_path_rate=0.0), _model(drop_path_rate=0.0)
    assert pl.with_precision(a, "bf16") is pl.with_precision(b, "bf16")
    first = weakref.ref(pl.with_precision(_model(mlp_dim=1000), "bf16"))
    for i in range(pl.CLONE_CACHE_SIZE):
        pl.with_precision(_model(mlp_dim=1001 + i), "bf16")
    gc.collect()
    assert first() is None
