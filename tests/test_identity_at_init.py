"""Identity at init, over every registered method with its registered defaults.

A method whose docs claim that the model at init is the pretrained one is checked to be (tokens
equal the base model's); a method that does not claim it is listed in ``NOT_IDENTITY`` with the
reason, and its tokens at init are checked to differ, so the list cannot go stale. One forward
per row on the tiny ViT.
"""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from guft_jax.methods import get_method, method_names, spec
from guft_jax.methods.base import forward, init_state, prepare_base

# registered methods that do not claim identity at init, with the reason their docs give
NOT_IDENTITY = {
    "fourierft": "default init 'normal' (the paper's): N(0, 1) coefficients, ΔW ≠ 0 at step 0",
    "vpt": "prompt tokens take part in attention at once",
    "prefix": "prefix keys/values take softmax mass at once",
    "unipelt": "its prefix branch takes softmax mass at once (prefix_tokens=0 restores identity)",
    "qlora": "the base is NF4-quantised: identity to the quantised model, not the float one",
}

# extra rows: (method, kwargs over the registered defaults, claims identity)
VARIANTS = [
    ("fourierft", dict(init="zeros"), True),
    ("fourierft", dict(init="paper"), False),
    ("unipelt", dict(prefix_tokens=0), True),
]

ROWS = [(n, {}, n not in NOT_IDENTITY) for n in method_names()] + VARIANTS


def _id(row):
    name, kw, _ = row
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


def _tokens(model, params, name, kw):
    """The method's tokens at init, and those of its merged params (plain ViT params)."""
    m = get_method(name, **{**(spec(name).defaults.kwargs or {}), **kw})
    base = prepare_base(m, params)
    tr = m.init(jax.random.key(0), base)
    st = init_state(m, base, tr)
    out = forward(model, m, base, tr, st, mc.images(), features=True)
    return out, lambda: model.apply({"params": m.merge(base, tr, st)}, mc.images(), features=True)


def test_not_identity_names_registered_methods():
    assert set(NOT_IDENTITY) <= set(method_names()), sorted(set(NOT_IDENTITY) - set(method_names()))


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_identity_at_init_exactly_where_claimed(row, tiny):
    model, params = tiny
    name, kw, claims = row
    out, merged = _tokens(model, params, name, kw)
    ref = model.apply({"params": params}, mc.images(), features=True)
    if claims:
        # the zero head would hide a backbone change in the logits: tokens are compared
        np.testing.assert_allclose(out, ref, atol=1e-5)
    else:
        gap = float(jnp.abs(out - ref).max())
        assert gap > 1e-3, f"{name} is identity at init: move it out of NOT_IDENTITY"
    if name == "qlora":  # identity to the dequantised base it trains on (ΔW = 0 at init)
        np.testing.assert_allclose(out, merged(), atol=1e-5)
