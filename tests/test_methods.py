"""One table of methods drives the property tests."""

import jax
import jax.numpy as jnp
import method_checks as mc
import numpy as np
import optax
import pytest
from conftest import make_source

from guft_jax import artifacts, train, vit
from guft_jax.methods import METHODS, get_method
from guft_jax.methods.base import flat_arrays
from guft_jax.methods.base import init_state as method_state
from guft_jax.methods.report import count_trainable

# name -> (hyperparameters for the tiny ViT, promises identity at init)
TABLE = {
    "full": ({}, True),
    "linear": ({}, True),
    "bitfit": ({}, True),
    "lora": (dict(rank=4, alpha=12.0), True),
    "dora": (dict(rank=4, alpha=12.0), True),
    "vera": (dict(rank=16), True),
    "fourierft": (dict(n=64, alpha=30.0, init="zeros"), True),
    "fourierft_normal": (dict(n=64, alpha=30.0), False),
    "guft": (dict(recompute_epochs=[1, 2], ratios=[0.02, 0.02]), True),
    "guft_dense": (dict(recompute_epochs=[1, 2], ratios=[0.02, 0.02], sparse=False), True),
    "magnitude": (dict(ratio=0.03), True),
    "snip": (dict(ratio=0.03), True),
    "salun": (dict(ratio=0.03), True),
    "fisher": (dict(ratio=0.03), True),
}


BASE = {"fourierft_normal": "fourierft", "guft_dense": "guft"}  # TABLE rows of another method


def build(name):
    hp, _ = TABLE[name]
    return get_method(BASE.get(name, name), **hp)


def _untested() -> tuple[set, list]:
    """``(TABLE's methods, registered methods with no tests)``: a method is tested when it is a
    TABLE row or is named (as ``"name"``) in its own module's test file
    ``tests/test_<module>.py`` (the file mirroring the module it is registered in)."""
    import pathlib

    from guft_jax.methods import method_names, spec

    registered = set(method_names())  # live (``METHODS`` here is the import-time tuple)
    in_table = {BASE.get(n, n) for n in TABLE}
    own_file = set()
    for m in registered:
        module = spec(m).factory.__module__.rsplit(".", 1)[-1]
        f = pathlib.Path(__file__).parent / f"test_{module}.py"
        if f.exists() and f'"{m}"' in f.read_text():
            own_file.add(m)
    return in_table, sorted(registered - in_table - own_file)


def test_every_registered_method_is_tested():
    """The registered methods are exactly TABLE's plus those with their own test file."""
    in_table, untested = _untested()
    stale = in_table - set(METHODS)
    assert not stale, f"TABLE rows of unregistered methods: {sorted(stale)}"
    assert not untested, f"registered methods with no tests: {untested}"


def test_a_method_registered_without_tests_is_named():
    from guft_jax.methods import Defaults, register, unregister

    register("untested_probe", defaults=Defaults(lr=1e-3))(lambda: get_method("full"))
    try:
        assert _untested()[1] == ["untested_probe"]
    finally:
        unregister("untested_probe")


def _x():
    return jax.random.normal(jax.random.key(7), (2, 16, 16, 3))


def _perturb(tree, seed=1):
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tdef.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _state(method, params, tr):
    return method_state(method, params, tr)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_identity_at_init_where_promised(name, tiny):
    model, params = tiny
    m = build(name)
    tr = m.init(jax.random.key(0), params)
    # compare tokens: the zero-initialised head would hide any backbone change in the logits
    out = model.apply(m.apply(params, tr, _state(m, params, tr)), _x(), features=True)
    base = model.apply({"params": params}, _x(), features=True)
    if TABLE[name][1]:
        np.testing.assert_allclose(out, base, atol=1e-5)
    else:
        assert float(jnp.abs(out - base).max()) > 0  # FourierFT N(0,1) init: ΔW != 0


def test_trainable_counts_equal_closed_forms_on_vit_b16():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)

    def count(name, **hp):
        m = get_method(name, **hp)
        tr = jax.eval_shape(lambda q: m.init(jax.random.PRNGKey(0), q), p)
        return count_trainable(m, p, tr)[0]

    L, d, mlp, r = 12, 768, 3072, 8
    assert count("fourierft", n=3000) == 3000 * 2 * L == 72_000
    assert count("lora", rank=r) == 2 * L * r * (d + d) == 294_912
    assert count("dora", rank=r) == 294_912 + 2 * L * d
    assert count("vera", rank=256) == 2 * L * (256 + d)
    assert count("bitfit") == d + L * (7 * d + mlp) + d == 102_912
    assert count("linear") == 0
    assert count("full") == 85_798_656


@pytest.mark.parametrize("name", ["lora", "dora", "vera", "fourierft_normal", "full", "bitfit"])
def test_merged_forward_equals_unmerged(name, tiny):
    model, params = tiny
    m = build(name)
    tr = _perturb(m.init(jax.random.key(0), params))
    a = model.apply(m.apply(params, tr), _x())
    b = model.apply({"params": m.merge(params, tr)}, _x())
    assert float(jnp.abs(a - model.apply({"params": params}, _x())).max()) > 1e-4
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # merged params are plain ViT params with the same structure as the base
    assert jax.tree_util.tree_structure(m.merge(params, tr)) == jax.tree_util.tree_structure(params)


@pytest.mark.parametrize("name", ["linear", "bitfit", "lora", "dora", "vera", "fourierft"])
def test_gradients_only_reach_what_trains(name, tiny):
    model, params = tiny
    m = build(name)
    tr = _perturb(m.init(jax.random.key(0), params))

    def loss(p, t):
        return jnp.sum(model.apply(m.apply(p, t), _x()) ** 2)

    g_frozen, g_tr = jax.grad(loss, argnums=(0, 1))(params, tr)
    # trained leaves get gradients; the frozen base is not part of the trainable tree
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g_tr))
    trained_paths = {"/".join(k.split("/")[:-1]) for k in flat_arrays(tr)}
    if name in ("linear", "bitfit"):
        frozen = [
            (k, v)
            for k, v in flat_arrays(g_frozen).items()
            if k not in flat_arrays(tr) and not k.startswith("head/")
        ]
        assert frozen  # the backbone still back-propagates, but none of it is in `tr`
    assert "head" in {k.split("/")[0] for k in trained_paths | {"head/x"}}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_method_trains_through_the_engine_and_the_loss_falls(name, tiny, source):
    model, params = tiny
    m = build(name)
    lr = 0.2 if name.startswith("fourierft") else 1e-2
    r = train.fit(
        model,
        params,
        m,
        source,
        mc.tiny_config(lr=lr),
        hooks=mc.print_nothing,
    )
    losses = [h["train_loss"] for h in r["history"]]
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", sorted(TABLE))
def test_artifact_round_trip_is_exact(name, tiny, tmp_path):
    model, params = tiny
    m = build(name)
    tr = m.init(jax.random.key(0), params)
    st = _state(m, params, tr)
    if m.hooks.epoch_start is not None:  # select a mask so GUFT's artifact holds entries
        from guft_jax.methods.base import EpochContext

        src = make_source()
        loss = jax.jit(
            lambda v, x, y: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y)
        )
        ctx = EpochContext(
            params,
            tr,
            (),
            st,
            loss,
            lambda: src.batches("train800val200", batch_size=16, image_size=16),
            lambda s: None,
        )
        tr, _, st = m.hooks.epoch_start(1, ctx)
    tr = _perturb(tr)
    if m.hooks.epoch_start is not None and m.hparams.get("sparse", True):
        # padding slots of the sparse path stay zero
        tr = dict(
            tr,
            delta={
                k: jnp.where(jnp.arange(v.shape[0]) < st.count[k], v, 0.0)
                for k, v in tr["delta"].items()
            },
        )
    meta = artifacts.save_artifact(
        str(tmp_path / "a"), method=m, params=params, trainable=tr, state=st, base_id="tiny"
    )
    merged, meta2 = artifacts.load_artifact(str(tmp_path / "a"), params)
    ref = m.merge(params, tr, st)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert meta2["method"] == meta["method"] and meta2["base_id"] == "tiny"


def test_artifact_sizes():
    p = vit.abstract_params(vit.build_model("ViT-B/16", num_classes=10), 224)
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), p)
    for name, hp, expect in (
        ("fourierft", dict(n=3000), 3000 * (2 + 24)),
        ("lora", dict(rank=8), 24 * 8 * (768 + 768)),
    ):
        m = get_method(name, **hp)
        tr = m.init(jax.random.PRNGKey(0), params)
        arrays = artifacts.arrays_of(m, params, tr)
        assert sum(v.size for k, v in arrays.items() if not k.startswith("head/")) == expect


def test_registry_errors():
    with pytest.raises(ValueError, match="allowed"):
        get_method("lorax")
    with pytest.raises(ValueError, match="rank"):
        get_method("lora", rnak=4)
    with pytest.raises(ValueError, match="lora.rank"):
        get_method("lora", rank=0)
