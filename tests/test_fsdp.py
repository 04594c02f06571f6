"""The 2-D ``("data", "fsdp")`` mesh: rules as data, no full copy of a large kernel or its
moments on one device (read from the compiled step), and data x fsdp = 2 x 4 trains like 8 x 1.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from guft_jax import sharding

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from conftest import make_source
    from guft_jax import guft, sharding, train, vit
    from guft_jax.config import TrainConfig
    from guft_jax.methods import get_method

    def methods():
        return {
            "full": get_method("full"),
            "lora": get_method("lora", rank=2, alpha=3.0),
            "guft": guft.guft(recompute_epochs=[1, 2], ratios=[0.02, 0.02]),
        }

    out = {"devices": len(jax.devices())}
    # 1. A wide one-block ViT (MLP kernels 256 x 4096 = 1,048,576 entries): compile the step on
    # a (2, 4) mesh with the default rules and read the shardings of every >= 1M-entry leaf.
    wide = vit.build_model("ViT-tiny/4", num_classes=3, hidden_size=256, num_heads=4,
                           mlp_dim=4096, num_layers=1)
    wparams = vit.init_params(wide, jax.random.key(0), 16)
    mesh = sharding.make_mesh(8, fsdp=4)
    big = {}
    for name, m in methods().items():
        tx, state = train.optimizer_for(m, wparams, steps_per_epoch=2, epochs=2, lr=1e-3)
        state, params, sh = train.place(state, wparams, mesh, sharding.FSDP_RULES,
                                         sharding.FSDP_RULES)
        step = train.make_train_step(wide, m, tx, total_steps=4, shardings=sh)
        x, y = sharding.put_batch((np.zeros((16, 16, 16, 3), np.float32),
                                   np.zeros(16, np.int32)), mesh)
        compiled = step.for_state(state).lower(state, params, x, y, ()).compile()
        ins, outs = compiled.input_shardings[0], compiled.output_shardings
        leaves = []
        for k, (tree, shs) in {"state_in": (state, ins[0]), "params_in": (params, ins[1]),
                               "state_out": (state, outs)}.items():
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            # None: an argument the program does not read (full FT's frozen copy)
            shl = jax.tree.leaves(shs if k != "state_out" else shs[0], is_leaf=lambda s: s is None)
            assert len(flat) == len(shl), (k, len(flat), len(shl))
            for (p, a), s in zip(flat, shl):
                if a.size >= 2**20 and s is not None:
                    leaves.append([k, jax.tree_util.keystr(p), list(a.shape),
                                   list(s.shard_shape(a.shape))])
        big[name] = leaves
    out["big"] = big
    # 2. The tiny ViT trained on (8, 1) without rules and on (2, 4) with every leaf that divides
    # sharded over fsdp.
    model = vit.build_model("ViT-tiny/4", num_classes=3)
    params = vit.init_params(model, jax.random.key(0), 16)
    for name in ("full", "lora", "guft"):
        for shape in ((8, 1), (2, 4)):
            rules = sharding.fsdp_rules(0) if shape[1] > 1 else ()
            cfg = TrainConfig(image_size=16, batch_size=16, epochs=2, lr=1e-2, progress=False,
                              warmup_epochs=0, param_rules=tuple(rules))
            r = train.fit(model, params, methods()[name], make_source(), cfg,
                          mesh=sharding.make_mesh(8, fsdp=shape[1]), hooks=lambda s: None)
            specs = sorted({str(a.sharding.spec) for a in jax.tree.leaves(r["state"])})
            out[f"{name}{shape}"] = dict(
                loss=[h["train_loss"] for h in r["history"]],
                acc=r["test_accuracy"], specs=specs,
                leaves={jax.tree_util.keystr(p): np.asarray(a).ravel().tolist()
                        for p, a in jax.tree_util.tree_flatten_with_path(r["state"])[0]})
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    script = tmp_path_factory.mktemp("fsdp") / "fsdp.py"
    script.write_text(SCRIPT)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, str(script), os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_device_holds_a_full_copy_of_a_large_kernel_or_its_moments(run8):
    assert run8["devices"] == 8
    big = run8["big"]
    # full FT: the frozen params (inputs), trainable kernels and both Adam moments, in and out
    assert {k for k, _, _, _ in big["full"]} == {"state_in", "state_out"}
    for name in ("lora", "guft"):  # the frozen backbone kernels, read by the step
        assert {k for k, _, _, _ in big[name]} == {"params_in"}, big[name]
    assert any("mu" in path for _, path, _, _ in big["full"])
    assert any("nu" in path for _, path, _, _ in big["full"])
    for name in ("full", "lora", "guft"):
        assert big[name], name
        for kind, path, shape, shard in big[name]:
            assert np.prod(shard) * 4 == np.prod(shape), (name, kind, path, shape, shard)


@pytest.mark.parametrize("name", ["full", "lora", "guft"])
def test_data_x_fsdp_2x4_trains_like_8x1(run8, name):
    a, b = run8[f"{name}(8, 1)"], run8[f"{name}(2, 4)"]
    assert a["specs"] == [str(P())]
    assert any("fsdp" in s for s in b["specs"]), b["specs"]  # the state really is sharded
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
    assert abs(a["acc"] - b["acc"]) < 1e-9
    assert a["leaves"].keys() == b["leaves"].keys()
    for path, x in a["leaves"].items():
        if "['key']['bias']" in path:
            # softmax is shift-invariant: the key bias's gradient is 0 up to rounding, which
            # Adam's normalisation turns into order-one updates (any reduction order differs)
            continue
        # full FT: Adam turns the rounding of near-zero gradient entries into lr-sized steps
        atol = 1e-4 if name == "full" else 1e-5
        np.testing.assert_allclose(b["leaves"][path], x, rtol=1e-5, atol=atol, err_msg=path)


def test_rules_per_method_family():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.AXES)
    # fits() on a fake 4-way fsdp axis: spec_for only reads mesh.shape
    fake = type("M", (), {"shape": {"data": 2, "fsdp": 4}, "axis_names": sharding.AXES})()
    spec = sharding.spec_for
    f = sharding.Fsdp()
    assert spec(f, (768, 3072), fake) == P(None, "fsdp")  # the largest dim that divides
    assert spec(f, (3072, 768), fake) == P("fsdp")
    assert spec(f, (768, 12, 64), fake) == P("fsdp")
    assert spec(f, (100, 3), fake) is None  # under min_size: replicated
    assert spec(sharding.Fsdp(min_size=0), (6, 3), fake) is None  # nothing divides
    assert spec(P(None, "data"), (5, 4), fake) == P(None, "data")
    assert spec(P(None, "data"), (5, 3), fake) is None

    def target(path):
        import re

        return next(t for rx, t in sharding.FSDP_RULES if re.search(rx, path))

    for path in (
        "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel",  # dense / frozen
        "opt_state/inner_states/method/inner_state/0/mu/Transformer/x/kernel",  # its moment
        "trainable/lora/Transformer.encoderblock_0.Attn.query.kernel/A",  # LoRA factors
        "opt_state/0/nu/lora/Transformer.encoderblock_0.Attn.query.kernel/B",
        "trainable/delta/Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel",  # GUFT values
        "method_state/selected/Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel",  # indices
    ):
        assert isinstance(target(path), sharding.Fsdp), path
    assert mesh.shape == {"data": 1, "fsdp": 1}
    m = sharding.make_mesh(1)
    assert m.axis_names == sharding.AXES
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    with pytest.raises(ValueError, match="fsdp"):
        sharding.make_mesh(1, fsdp=2)
