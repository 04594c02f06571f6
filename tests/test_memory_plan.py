"""The memory plan: shapes only, and the bytes agree with real arrays and their shardings."""

import jax
import numpy as np
import pytest

from guft_jax import memory_plan, sharding, train, vit
from guft_jax.methods import get_method


def _nbytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_one_chip_plan_equals_the_real_state(tiny):
    model, params = tiny
    m = get_method("lora", rank=2, alpha=3.0)
    _, state = train.optimizer_for(m, params, steps_per_epoch=1, epochs=1, lr=1e-3)
    p = memory_plan.plan("ViT-tiny/4", m, 1, image_size=16, num_classes=3)
    assert p.params == _nbytes(params)
    assert p.trainable == _nbytes(state.trainable)
    assert p.optimizer == _nbytes(state.opt_state)
    assert p.guft_state == _nbytes(state.method_state)


def test_fsdp_divides_every_large_leaf():
    full = get_method("full")
    one = memory_plan.plan("ViT-B/16", full, 1)
    eight = memory_plan.plan("ViT-B/16", full, 8)
    n = sum(
        np.prod(x.shape)
        for x in jax.tree.leaves(
            memory_plan.abstract_state("ViT-B/16", full, image_size=224, num_classes=1000)[0]
        )
    )
    assert one.params == 4 * n and 86_000_000 < n < 87_000_000  # ViT-B/16 + a 1000-class head
    assert 0.124 < eight.params / one.params < 0.13  # small leaves stay replicated
    assert eight.optimizer < one.optimizer / 7.5
    mesh = memory_plan.abstract_mesh(8)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8}
    # the same spec as the device mesh would give
    spec = sharding.spec_for(sharding.Fsdp(), (768, 3072), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_activation_formula():
    cfg = vit.vit_config("ViT-B/16")
    s, h, a, layers = 197, 768, 12, 12
    want = layers * (34 * s * h + 5 * a * s * s)  # Korthikanti et al. eq. 1, 16-bit
    assert memory_plan.activations_per_image(cfg, 224, bytes_per_value=2) == want
    assert memory_plan.activations_per_image(cfg, 224) == 2 * want


@pytest.mark.parametrize("name", ["ViT-L/16", "ViT-H/14"])
def test_large_backbones_trace_through_the_train_step(name):
    """ViT-L/16 and ViT-H/14 (random weights) through the engine's own init, optimizer and step
    body, under ``jax.eval_shape`` (traced, nothing allocated or run)."""
    from guft_jax import guft
    from guft_jax.methods import base as mbase

    model = vit.build_model(name, num_classes=10)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
    y = jax.ShapeDtypeStruct((2,), np.int32)
    for m in (get_method("lora", rank=8, alpha=16.0), guft.guft()):

        def run(key, x, y, m=m):
            params = mbase.prepare_base(m, vit.init_params(model, key, 224))
            tx, state = train.optimizer_for(m, params, steps_per_epoch=1, epochs=1, lr=1e-3)
            new, loss = train.make_step_body(model, m, tx, total_steps=1)(state, params, x, y)
            return state, new, loss

        state, new, loss = jax.eval_shape(run, jax.random.key(0), x, y)
        assert jax.tree.structure(new) == jax.tree.structure(state)
        assert loss.shape == () and loss.dtype == np.float32
