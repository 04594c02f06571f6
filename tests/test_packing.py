"""Packed runs (a vmapped run axis; lrs and seeds as data) equal the same runs trained alone."""

import jax
import numpy as np
import pytest
from conftest import make_source

from guft_jax import packing, paths, train
from guft_jax.config import TrainConfig
from guft_jax.methods import get_method

RUNS = [(1e-2, 0), (3e-3, 0), (1e-2, 1), (3e-3, 1)]  # (lr, seed): 2 lrs x 2 seeds
KW = dict(image_size=16, batch_size=16, epochs=2, weight_decay=1e-2, warmup_epochs=0.5)


@pytest.mark.parametrize(
    "name, hp, lr_scale",
    [
        ("lora", dict(rank=2, alpha=6.0), 1.0),
        ("full", {}, 0.1),  # full fine-tuning's usual lr is 10x below the adapters'
        ("guft", dict(recompute_epochs=[1, 2], ratios=[0.02, 0.02], sparse=False), 1.0),
    ],
)
def test_packed_runs_equal_runs_alone(name, hp, lr_scale, tiny):
    model, params = tiny
    m = get_method(name, **hp)
    runs = [(lr * lr_scale, seed) for lr, seed in RUNS]
    sources = [make_source(seed=s) for _, s in runs]
    states, packed = packing.fit_packed(
        model,
        params,
        m,
        sources,
        TrainConfig(progress=False, **KW),
        lrs=[lr for lr, _ in runs],
        head_lrs=[2 * lr for lr, _ in runs],
        seeds=[s for _, s in runs],
    )
    assert packed[0]["traces"] == 1
    for r, ((lr, seed), src) in enumerate(zip(runs, sources, strict=True)):
        cfg = TrainConfig(lr=lr, head_lr=2 * lr, seed=seed, progress=False, **KW)
        alone = train.fit(model, params, m, src, cfg, hooks=lambda s: None)
        np.testing.assert_allclose(
            [h["train_loss"] for h in packed[r]["history"]],
            [h["train_loss"] for h in alone.results["history"]],
            rtol=1e-5,
            atol=1e-6,
        )
        mine = jax.tree.map(lambda x, r=r: x[r], states.trainable)
        flat = jax.tree_util.tree_flatten_with_path(mine)[0]
        for (path, a), b in zip(flat, jax.tree.leaves(alone.state.trainable), strict=True):
            if "key/bias" in paths.key_to_str(path):
                # Its exact gradient is zero (softmax is shift-invariant per query), so Adam
                # turns the rounding noise of a different summation order into whole steps.
                continue
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert packed[r]["test_accuracy"] == pytest.approx(alone.results["test_accuracy"])
        assert packed[r]["trainable_params"] == alone.results["trainable_params"]


def test_mismatched_lists_are_refused(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="one entry per run"):
        packing.fit_packed(
            model,
            params,
            get_method("linear"),
            [make_source()],
            TrainConfig(**KW),
            lrs=[1e-2, 1e-3],
            head_lrs=[1e-2],
            seeds=[0],
        )
