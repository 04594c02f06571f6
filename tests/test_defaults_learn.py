"""Every listed method's registered defaults learn: trained through the engine for the demo's
length (4 epochs) on the tiny offline task (digits at 16 px, the tiny random ViT, the method's
registered dry-run hyperparameters), each beats an untrained head by a wide margin.

A cheap guard against a default that destroys the backbone or never moves the head (issue 30):
an untrained head scores at most the test split's majority-class share (a zero head predicts
class 0; a random one is at chance), so the bound is twice that share. Measured when written:
the 36 rows 0.404 (linear, LoSiA) to 0.547 (FourierFT) against a
majority share of 0.109 (bound 0.218).
"""

import dataclasses

import numpy as np
import pytest

from experiments import rows
from experiments.presets import DRY_CONFIG
from experiments.run import fit_config

EPOCHS = 4  # the demo preset's length
ENGINE_ROWS = [n for n in rows.every_row() if isinstance(rows.row(n), rows.EngineRow)]


@pytest.fixture(scope="module")
def majority_share() -> float:
    """The digits test split's largest class share (what ``final`` runs score on)."""
    src = rows._source("digits", 0)
    y = np.concatenate([b[1] for b in src.batches("test", batch_size=512, image_size=16)])
    return float(np.bincount(y).max() / len(y))


@pytest.mark.parametrize("name", ENGINE_ROWS)
def test_registered_defaults_beat_an_untrained_head(name, tmp_path, majority_share):
    row = dataclasses.replace(rows.row(name), overrides=dict(DRY_CONFIG), dry=True)
    c = row.config(rows.Job("final", "digits", name), epochs=EPOCHS, image_size=16)
    res = fit_config(c, str(tmp_path), log=lambda s: None).results
    hist = res["history"]
    print(f"{name}: test {res['test_accuracy']:.4f} (majority share {majority_share:.4f})")
    assert np.isfinite(hist[-1]["train_loss"]), name
    assert hist[-1]["train_loss"] < hist[0]["train_loss"], (name, hist[0], hist[-1])
    assert res["test_accuracy"] >= 2 * majority_share, (name, res["test_accuracy"])
