"""Property checks shared by the per-method test files (a method is any registered ``Method``).

Each check takes the tiny ViT (``tiny`` fixture), a built method and what it needs, and asserts
one property of the method interface: identity at init, merged == unmerged forward, gradients
only where trained, the engine trains it in one trace with the frozen base bitwise unchanged,
and the artifact round trip. A method's own test file calls the ones that apply to it.
"""

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import artifacts, train, vit
from guft_jax.config import TrainConfig
from guft_jax.methods import Method, get_method
from guft_jax.methods.base import forward, init_state, prepare_base
from guft_jax.methods.report import count_trainable


def images(seed: int = 7, size: int = 16) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (2, size, size, 3))


def perturb(tree, seed: int = 1, scale: float = 0.05):
    """Every float leaf moved by N(0, scale²) noise (integer leaves, e.g. indices, kept)."""
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
        else x
        for k, x in zip(keys, leaves, strict=True)
    ]
    return tdef.unflatten(out)


def _setup(m: Method, params):
    base = prepare_base(m, params)
    tr = m.init(jax.random.key(0), base)
    return base, tr, init_state(m, base, tr)


def identity_at_init(model, params, m: Method, atol: float = 1e-5) -> None:
    """The backbone's tokens are unchanged at init (the zero head would hide a change in the
    logits, so the features are compared)."""
    base, tr, st = _setup(m, params)
    x = images()
    out = forward(model, m, base, tr, st, x, features=True)
    np.testing.assert_allclose(out, model.apply({"params": params}, x, features=True), atol=atol)


def merge_equals_apply(model, params, m: Method, atol: float = 1e-6) -> None:
    """After perturbing the trainable tree, ``merge`` gives plain params with the same logits as
    ``apply`` (and the perturbation changed them: the check cannot pass vacuously)."""
    base, tr, st = _setup(m, params)
    tr = perturb(tr)
    x = images()
    a = forward(model, m, base, tr, st, x)  # the method's interceptor included
    merged = m.merge(base, tr, st)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    b = model.apply({"params": merged}, x)
    assert float(jnp.abs(a - model.apply({"params": params}, x)).max()) > 1e-4
    np.testing.assert_allclose(a, b, rtol=atol, atol=atol)


def gradients_reach_every_trained_leaf(model, params, m: Method) -> dict:
    """``jax.grad`` w.r.t. the trainable tree is nonzero on every leaf; returns the gradients."""
    base, tr, st = _setup(m, params)
    tr = perturb(tr)
    x = images()
    g = jax.grad(lambda t: jnp.sum(forward(model, m, base, t, st, x) ** 2))(tr)
    for path, v in jax.tree_util.tree_flatten_with_path(g)[0]:
        assert float(jnp.abs(v).max()) > 0, jax.tree_util.keystr(path)
    return g


def print_nothing(line: str) -> None:
    """A run's ``log`` that drops every line."""


TINY = dict(
    image_size=16,
    batch_size=16,
    epochs=3,
    lr=1e-2,
    head_lr=1e-2,
    progress=False,
    warmup_epochs=0,
)


def tiny_config(**changes) -> TrainConfig:
    """The tests' :class:`~guft_jax.config.TrainConfig` for the tiny ViT at 16 px: 3 epochs of
    batch 16, lr and head lr 1e-2, no warm-up, no progress bars; ``changes`` override."""
    return TrainConfig(**{**TINY, **changes})


def trains_in_one_trace(model, params, m: Method, source, *, lr: float = 1e-2, epochs: int = 3):
    """``train.fit`` (AdamW) on the tiny task: one trace, the loss falls, the frozen base params
    are bitwise unchanged (the engine never writes them). Returns the ``FitResult``."""
    before = jax.tree.map(np.array, params)
    r = train.fit(model, params, m, source, tiny_config(epochs=epochs, lr=lr), hooks=print_nothing)
    assert r.results["traces"] == 1
    losses = [h["train_loss"] for h in r.results["history"]]
    assert losses[-1] < losses[0], losses
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    return r


def artifact_round_trip(params, m: Method, tmp_path) -> None:
    """Saving the (perturbed) trainable tree and loading it back gives ``merge``'s params
    bitwise, and the artifact's count is the method's trainable count."""
    base, tr, st = _setup(m, params)
    tr = perturb(tr)
    meta = artifacts.save_artifact(
        str(tmp_path / "a"), method=m, params=base, trainable=tr, state=st, base_id="tiny"
    )
    assert meta["numbers"] == count_trainable(m, base, tr, st)[0]
    merged, meta2 = artifacts.load_artifact(str(tmp_path / "a"), base)
    assert meta2["method"] == meta["method"]
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m.merge(base, tr, st)), strict=True):
        np.testing.assert_array_equal(a, b)


def vit_b16_count(name: str, **hparams) -> int:
    """Trainable backbone numbers of a registered method on an abstract ViT-B/16 (no memory)."""
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    m = get_method(name, **hparams)
    base = jax.eval_shape(lambda q: prepare_base(m, q), p)
    tr = jax.eval_shape(lambda q: m.init(jax.random.PRNGKey(0), q), base)
    return count_trainable(m, base, tr)[0]
