"""Shared fixtures: a tiny ViT and a small learnable in-memory dataset."""

import os

import jax
import numpy as np
import pytest

from guft_jax import vit
from guft_jax.data import ArraySource

# JAX's persistent compilation cache stays off in tests (the CLI turns it on; tests run it too)
os.environ.setdefault("GUFT_JAX_CACHE_DIR", "")


def make_source(seed: int = 0, n_train: int = 48, n_val: int = 16, n_test: int = 32, size=16):
    """Class-dependent brightness + noise: learnable in a few steps by a tiny ViT."""
    rng = np.random.default_rng(seed)

    def mk(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 50, (n, size, size, 3)) + 60 * y[:, None, None, None]
        return x.astype(np.uint8), y

    return ArraySource(
        "synthetic", 3, {"train800": mk(n_train), "val200": mk(n_val), "test": mk(n_test)}
    )


@pytest.fixture(scope="session")
def tiny():
    model = vit.build_model("ViT-tiny/4", num_classes=3)
    params = vit.init_params(model, jax.random.key(0), 16)
    return model, params


@pytest.fixture(scope="session")
def source():
    return make_source()
