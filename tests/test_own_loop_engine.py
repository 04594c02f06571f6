"""For every registered method, a user's own loop over ``guft_jax.peft.adapt`` and the engine's
step (``train.make_train_step`` + ``train.epoch_start``: what ``train.fit`` jits and calls) train
the same params within 1e-6 after 3 epochs on the same data, optimizer and keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_source

from guft_jax import methods, paths, peft, train
from guft_jax.methods import base as mbase

EPOCHS, BATCH, SEED = 3, 16, 0

# Hyperparameters for the tiny ViT (hidden 32, 2 blocks) where the registry's dry-run ones do
# not fit it, and schedules that act within 9 steps.
TINY = {
    "fourierft": dict(n=64, alpha=10.0),
    "guft": dict(recompute_epochs=(1, 2, 3), ratios=(0.01,) * 3, eligible="all"),
    "adalora": dict(init_rank=4, target_rank=2, delta_t=1, t_init=1, t_final=2),
    "oft": dict(oft_block_size=8),
    "losia": dict(period=2),
    "losia_pro": dict(period=2),
    "qlora": dict(rank=2, block_size=32),
    "vera": dict(rank=16),
}


def _kwargs(name):
    kw = dict(methods.spec(name).defaults.dry_kwargs or {})
    kw.update(TINY.get(name, {}))
    return kw


def _warm(params):
    """A head with small nonzero weights (a zero head gives zero saliency)."""
    k = jax.random.key(3)
    head = jax.tree.map(lambda v: 0.1 * jax.random.normal(k, v.shape, v.dtype), params["head"])
    return {**params, "head": head}


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


def _engine(model, m, params, batches, spe):
    base = mbase.prepare_base(m, params)
    tx, st = train.optimizer_for(
        m, base, steps_per_epoch=spe, epochs=EPOCHS, lr=1e-2, head_lr=1e-2, weight_decay=0.1,
        seed=SEED,
    )  # fmt: skip
    step = train.make_train_step(model, m, tx, total_steps=spe * EPOCHS)
    for e in range(1, EPOCHS + 1):
        st = train.epoch_start(model, m, base, st, e, batches=batches, epochs=EPOCHS, log=len)
        for x, y in batches():
            st, _ = step(st, base, x, y, train.mask_of(m, st))
    return base, tx, st


def _own_loop(model, ad, params, tx, batches, spe):
    """What a user writes: keys as the engine derives them, the engine's optimizer object."""
    rng, init_rng = jax.random.split(jax.random.PRNGKey(SEED))
    tr = ad.init(init_rng, params)
    opt, state = tx.init(tr), ad.init_state(params, tr)
    total = spe * EPOCHS

    def step_fn(tr, opt, state, rng, i, params, x, y):  # params: an argument, not a constant
        rng, drop = jax.random.split(rng)

        def loss(t):
            fwd = lambda p: model.apply(  # noqa: E731
                {"params": p}, x, deterministic=False, rngs={"dropout": jax.random.fold_in(drop, 1)}
            )
            return jnp.mean(_ce(ad.call(fwd, params, t, state, drop), y)) + ad.loss(
                params, t, state, drop
            )

        g = jax.grad(loss)(tr)
        tr, opt, state = ad.update(tx, g, opt, tr, state, params, step=i, total_steps=total)
        return tr, opt, state, rng, i + 1

    step = jax.jit(step_fn, donate_argnums=(0, 1, 2))
    per_example = lambda p, x, y: _ce(model.apply({"params": p}, x, deterministic=True), y)  # noqa: E731
    i = jnp.zeros((), jnp.int32)
    for e in range(1, EPOCHS + 1):
        tr, opt, state = ad.epoch_start(
            e, params, tr, opt, state, loss_fn=per_example, batches=batches, epochs=EPOCHS, log=len
        )
        for x, y in batches():
            tr, opt, state, rng, i = step(tr, opt, state, rng, i, params, x, y)
    return tr, state


@pytest.mark.parametrize("name", methods.method_names())
def test_own_loop_equals_the_engine_for_every_method(tiny, name):
    model, params = tiny
    params = _warm(params)
    src = make_source()
    batches = lambda: src.batches("train800", batch_size=BATCH, image_size=16)  # noqa: E731
    spe = len(list(batches()))
    kw = _kwargs(name)
    m = methods.get_method(name, **kw)
    base, tx, st = _engine(model, m, params, batches, spe)
    ad = peft.adapt(name, head=r"^head/", layout=peft.VIT_LAYOUT, **kw)
    tr, state = _own_loop(model, ad, params, tx, batches, spe)

    x = next(iter(batches()))[0]
    want = mbase.forward(model, m, base, st.trainable, st.method_state, x)
    got = ad.call(lambda p: model.apply({"params": p}, x), params, tr, state)
    assert float(jnp.max(jnp.abs(want - model.apply({"params": params}, x)))) > 1e-3  # it trained
    if m.merge is not None:
        engine = m.merge(base, st.trainable, st.method_state)
        user = ad.merge(params, tr, state)
        pairs = zip(
            paths.leaf_paths(engine), jax.tree.leaves(engine), jax.tree.leaves(user), strict=True
        )
    else:  # activation-space: the trainable trees themselves
        pairs = zip(
            paths.leaf_paths(st.trainable),
            jax.tree.leaves(st.trainable),
            jax.tree.leaves(tr),
            strict=True,
        )
    worst = 0.0
    for p, a, b in pairs:
        a, b = np.asarray(a), np.asarray(b).reshape(np.shape(a))
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
        assert worst <= 1e-6, (name, p, worst)
    print(f"{name}: max |engine - own loop| = {worst:.3g}")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
