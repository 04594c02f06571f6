"""The Method interface end to end with a method defined only here (issue 11): registered through
the public mechanism, it trains through the engine (interceptor, per-step hook, extra loss, rng,
prepare_base), and reports, artifacts, configs and the offline benchmark's config path use it
without any package file naming it. Also ``combine``."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import pytest

from experiments import rows
from experiments.configs import tiny as tiny_cfg
from experiments.configs.common import validate
from experiments.run import fit_config
from guft_jax import artifacts, paths, train
from guft_jax.methods import (
    Defaults,
    Method,
    MethodHooks,
    combine,
    get_method,
    method_names,
    register,
    unregister,
)
from guft_jax.methods.report import trainable_report

TARGET = ("Transformer", "encoderblock_0", "MlpBlock_3", "Dense_1")
PREPARED = []


def outscale(*, init: float = 1.0, penalty: float = 1e-3) -> Method:
    """Toy: the output of block 0's fc2 is scaled by a trainable vector ``g`` (init 1), added
    through an interceptor of ``Linear.__call__``; mergeable into the kernel and bias."""

    def init_fn(rng, params):
        d = paths.get(params, "/".join(TARGET) + "/bias").shape[0]
        return {"head": params["head"], "g": jnp.full((d,), init, jnp.float32)}

    def intercept(trainable, state, rng=None):
        g = trainable["g"]

        def icpt(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and tuple(context.module.path) == TARGET:
                out = out * g
            return out

        return icpt

    def merge(params, trainable, state=None):
        base = "/".join(TARGET)
        k, b = paths.get(params, base + "/kernel"), paths.get(params, base + "/bias")
        upd = {base + "/kernel": k * trainable["g"], base + "/bias": b * trainable["g"]}
        return {**paths.replaced(params, upd), "head": trainable["head"]}

    def step(info):
        n = info.state["steps"] + 1
        return info.trainable, info.opt_state, {"steps": n, "last_total": info.total_steps}

    def prepare(params):
        PREPARED.append(1)
        return params

    return Method(
        name="outscale",
        init=init_fn,
        apply=lambda p, t, s=None, rng=None: {"params": {**p, "head": t["head"]}},
        hparams=dict(init=init, penalty=penalty),
        merge=merge,
        hooks=MethodHooks(
            init_state=lambda p, t: {"steps": jnp.zeros((), jnp.int32), "last_total": 0},
            step=step,
            loss=lambda p, t, s, rng: penalty * jnp.sum((t["g"] - 1.0) ** 2),
            intercept=intercept,
            prepare_base=prepare,
        ),
    )


@pytest.fixture()
def registered():
    register("outscale", defaults=Defaults(lr=1e-2, head_lr=1e-2, kwargs=dict(init=1.0)))(outscale)
    yield
    unregister("outscale")


def test_toy_method_trains_reports_saves_and_configures(registered, tiny, source, tmp_path):
    model, params = tiny
    assert "outscale" in method_names()
    m = get_method("outscale")
    PREPARED.clear()
    r = train.fit(
        model,
        params,
        m,
        source,
        mc.tiny_config(epochs=2, head_lr=None),
        hooks=mc.print_nothing,
    )
    steps = r.results["history"][-1]["step"]
    assert r.results["traces"] == 1 and PREPARED == [1]
    assert int(r.state.method_state["steps"]) == steps == 8  # the step hook ran every step
    assert int(r.state.method_state["last_total"]) == 8  # static total_steps
    g = np.asarray(r.state.trainable["g"])
    assert np.any(g != 1.0)  # the interceptor carried a gradient to g
    assert r.results["trainable_params"] == g.size == r.results["trained_per_tensor"]["g"]
    assert "outscale" in trainable_report(m, params, r.state.trainable, r.state.method_state)
    # merged == intercepted forward, and the artifact round trip through the registry
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    from guft_jax.methods import forward

    a = forward(model, m, params, r.state.trainable, r.state.method_state, x)
    b = model.apply({"params": m.merge(params, r.state.trainable)}, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    artifacts.save_artifact(
        str(tmp_path / "a"), method=m, params=params, trainable=r.state.trainable
    )
    merged, meta = artifacts.load_artifact(str(tmp_path / "a"), params)
    assert meta["method"] == "outscale"
    for u, v in zip(
        jax.tree.leaves(merged), jax.tree.leaves(m.merge(params, r.state.trainable)), strict=True
    ):
        np.testing.assert_array_equal(u, v)
    # the configs and the offline benchmark's config path know it from its registration
    job = rows.Job("final", "digits", "outscale", 0, 3.0)
    c = rows.row("outscale").config(job, epochs=2, image_size=28)
    assert (
        c.method == "outscale" and c.lr == pytest.approx(3e-2) and c.method_kwargs.penalty == 1e-3
    )
    assert rows.row("outscale").grid == Defaults().lr_grid
    assert "outscale" in rows.every_row()
    tc = tiny_cfg.get_config("digits,outscale")
    tc.epochs = 1
    validate(tc)
    res = fit_config(tc, str(tmp_path / "run"), log=lambda s: None).results
    assert res["method"] == "outscale" and 0.0 <= res["test_accuracy"] <= 1.0


def test_unknown_method_fails_loudly_everywhere():
    with pytest.raises(ValueError, match="allowed"):
        get_method("nope")
    with pytest.raises(ValueError, match="allowed"):
        tiny_cfg.get_config("digits,nope")
    with pytest.raises(ValueError, match="allowed"):
        rows.row("nope")


def test_combine_composes_weight_space_parts(tiny):
    model, params = tiny
    lora, bitfit = get_method("lora", rank=2, alpha=6.0), get_method("bitfit")
    m = combine(lora, bitfit)
    tr = m.init(jax.random.key(0), params)
    tr = jax.tree.map(lambda v: v + 0.03, tr)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    out = model.apply(m.apply(params, tr), x)
    ref_params = bitfit.merge(
        lora.merge(params, {**tr["parts"]["lora"], "head": tr["head"]}),
        {**tr["parts"]["bitfit"], "head": tr["head"]},
    )
    np.testing.assert_allclose(out, model.apply({"params": ref_params}, x), rtol=1e-6)
    np.testing.assert_allclose(out, model.apply({"params": m.merge(params, tr)}, x), rtol=1e-6)
    n_lora = sum(train.trained_counts(lora, params, {**tr["parts"]["lora"], "head": {}}).values())
    n_bit = sum(
        train.trained_counts(bitfit, params, {**tr["parts"]["bitfit"], "head": {}}).values()
    )
    assert sum(train.trained_counts(m, params, tr).values()) == n_lora + n_bit
    with pytest.raises(ValueError, match="distinct"):
        combine(lora, lora)
