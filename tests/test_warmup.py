"""The warm-up's floor in steps (guft_jax.config.warmup_steps): a tiny dataset's run warms up for
the floor, read from the optimizer fit builds; epoch-counted warm-ups of larger runs unchanged."""

import math

import numpy as np
import pytest

from guft_jax import optim
from guft_jax.config import TrainConfig, warmup_steps
from guft_jax.methods import get_method
from guft_jax.step import optimizer_from


def _lrs_of(config: TrainConfig, tiny, steps_per_epoch: int, n: int) -> np.ndarray:
    """The head's lr at steps 0..n-1, read through the optimizer ``optimizer_from`` builds.

    With weight decay 0 and a constant gradient of ones, every bias-corrected AdamW direction is
    exactly ``1 / (1 + eps)``, so each update is ``-lr(step) / (1 + eps)``."""
    _, params = tiny
    m = get_method("linear")
    tx, state = optimizer_from(m, params, config, steps_per_epoch)
    grads = {"head": {k: np.ones_like(v) for k, v in state.trainable["head"].items()}}
    opt, out = state.opt_state, []
    for _ in range(n):
        updates, opt = tx.update(grads, opt, state.trainable)
        out.append(-float(np.asarray(updates["head"]["bias"])[0]) * (1 + 1e-8))
    return np.asarray(out)


def _closed_form(lr: float, warmup: int, total: int, n: int) -> np.ndarray:
    """Linear 0 -> lr over ``warmup`` steps, then cosine to 0 at ``total``."""
    t = np.arange(n, dtype=np.float64)
    cos = 0.5 * lr * (1 + np.cos(np.pi * np.clip(t - warmup, 0, None) / (total - warmup)))
    return np.where(t < warmup, lr * t / warmup, cos)


def test_a_tiny_dataset_warms_up_for_the_floor_not_one_epoch(tiny):
    # 5 steps per epoch, 10 epochs: one epoch's warm-up would be 5 steps; the floor gives
    # min(100, 50 // 4) = 12.
    cfg = TrainConfig(epochs=10, lr=0.5, head_lr=0.5, weight_decay=0.0, warmup_epochs=1.0)
    want = _closed_form(0.5, 12, 50, 50)
    got = _lrs_of(cfg, tiny, steps_per_epoch=5, n=50)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got[5] < 0.5 * 0.5 and got[12] == pytest.approx(
        0.5, rel=1e-5
    )  # not at the peak after 5 steps


def test_the_floor_is_a_config_field(tiny):
    cfg = TrainConfig(epochs=10, lr=0.5, head_lr=0.5, weight_decay=0.0, warmup_floor=8)
    np.testing.assert_allclose(
        _lrs_of(cfg, tiny, steps_per_epoch=5, n=50), _closed_form(0.5, 8, 50, 50), rtol=1e-5,
        atol=1e-7,
    )  # fmt: skip


@pytest.mark.parametrize(
    "epochs_w, spe, total, floor, want",
    [
        (1.0, 5, 50, 100, 12),  # tiny: the floor, capped at a quarter of the run
        (1.0, 4, 40, 100, 10),  # 210 images at batch 50, 10 epochs
        (1.0, 16, 160, 100, 40),  # 800 images at batch 50, 10 epochs
        (10.0, 12, 1200, 100, 120),  # the VTAB-1K protocol: its 10 epochs, unchanged
        (1.0, 200, 2000, 100, 200),  # large data: the epoch count is above the floor
        (0.0, 5, 50, 100, 0),  # no warm-up asked: none
        (1.0, 5, 50, 0, 5),  # floor 0: epochs only
        (1.0, 1, 3, 100, 1),  # a 3-step run: the epoch's step
    ],
)
def test_warmup_steps_rule(epochs_w, spe, total, floor, want):
    got = warmup_steps(warmup_epochs=epochs_w, steps_per_epoch=spe, total_steps=total, floor=floor)
    assert got == want == max(round(epochs_w * spe), min(floor, total // 4)) * (epochs_w > 0)


def test_schedule_after_the_warmup_is_the_cosine():
    sched = optim.schedule(lr=2.0, warmup_steps=12, total_steps=50)
    for t in (0, 6, 12, 30, 49):
        want = 2.0 * t / 12 if t < 12 else math.cos(math.pi * (t - 12) / 38) + 1.0
        assert float(sched(t)) == pytest.approx(want, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("value", [-1, 2.5, True, "10"])
def test_bad_floor_names_the_field(value):
    with pytest.raises(ValueError, match=r"TrainConfig\.warmup_floor: .* allowed: an integer >= 0"):
        TrainConfig(warmup_floor=value)
