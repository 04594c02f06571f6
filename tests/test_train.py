"""The engine: one trace per run, determinism, NaN stop, bitwise resume, strict restore,
8 fake CPU devices == 1 device."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import make_source

from guft_jax import checkpoint, guft, train
from guft_jax.config import TrainConfig
from guft_jax.methods import get_method


def _fit(tiny, method, *, workdir=None, log=lambda s: None, config=None, **kw):
    model, params = tiny
    args = dict(image_size=16, batch_size=16, epochs=3, lr=1e-2, warmup_epochs=1, progress=False)
    args.update(kw)
    cfg = TrainConfig(**args, record=config)
    return train.fit(model, params, method, make_source(), cfg, workdir=workdir, hooks=log)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.trainable)]


def test_one_trace_per_run_and_deterministic_for_a_seed(tiny):
    a = _fit(tiny, get_method("lora", rank=2, alpha=3.0))
    b = _fit(tiny, get_method("lora", rank=2, alpha=3.0))
    assert a["traces"] == 1
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    for x, y in zip(_leaves(a["state"]), _leaves(b["state"]), strict=True):
        np.testing.assert_array_equal(x, y)
    c = _fit(tiny, get_method("lora", rank=2, alpha=3.0), seed=1)
    assert [h["train_loss"] for h in c["history"]] != [h["train_loss"] for h in a["history"]]


def test_frozen_params_get_no_optimizer_state(tiny):
    r = _fit(tiny, get_method("bitfit"), epochs=1)
    n_opt = sum(x.size for x in jax.tree.leaves(r["state"].opt_state) if np.ndim(x) > 0)
    n_tr = sum(x.size for x in jax.tree.leaves(r["state"].trainable))
    assert n_opt == 2 * n_tr  # Adam's two moments, of the trainable leaves only


@pytest.mark.parametrize("name", ["lora", "guft"])
def test_resume_after_stop_is_bitwise_identical(tiny, tmp_path, name):
    def method():
        if name == "guft":
            return guft.guft(recompute_epochs=[1, 2, 3], ratios=[0.01] * 3)
        return get_method("lora", rank=2, alpha=3.0)

    full = _fit(tiny, method(), epochs=4, workdir=str(tmp_path / "a"))
    part = _fit(tiny, method(), epochs=4, workdir=str(tmp_path / "b"), stop_after_epoch=2)
    assert part["stopped_after_epoch"] == 2
    rest = _fit(tiny, method(), epochs=4, workdir=str(tmp_path / "b"))
    assert [h["epoch"] for h in rest["history"]] == [1, 2, 3, 4]  # the whole run's history
    assert rest["resumed_from_epoch"] == 2 and rest["epochs"] == 4
    for x, y in zip(_leaves(full["state"]), _leaves(rest["state"]), strict=True):
        np.testing.assert_array_equal(x, y)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3, 4]
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["test_accuracy"] == full["test_accuracy"]
    assert os.path.isdir(tmp_path / "b" / "tb")


def test_restore_into_a_different_structure_fails_loudly(tiny, tmp_path):
    _fit(tiny, get_method("lora", rank=2, alpha=3.0), epochs=1, workdir=str(tmp_path))
    with pytest.raises(checkpoint.CheckpointStructureError, match="lora"):
        _fit(tiny, get_method("lora", rank=3, alpha=3.0), epochs=2, workdir=str(tmp_path))


def test_fit_locks_its_workdir_refuses_a_changed_config_and_logs_each_epoch_once(tiny, tmp_path):
    from guft_jax import rundir
    from guft_jax.errors import ConfigChangedError, WorkdirLockedError

    wd = str(tmp_path)
    tried = []

    def log(line):  # called while fit runs: the workdir is locked
        if not tried:
            with pytest.raises(WorkdirLockedError, match=f"process {os.getpid()}"):
                rundir.acquire_lock(wd)
            tried.append(line)

    cfg = {"lr": 1e-2, "epochs": 2, "method": "linear"}
    _fit(tiny, get_method("linear"), epochs=2, workdir=wd, config=cfg, log=log)
    assert tried
    rundir.release_lock(rundir.acquire_lock(wd))  # released when fit returned
    with pytest.raises(ConfigChangedError, match=r"\(lr: 0.01 -> 0.02\)"):
        _fit(tiny, get_method("linear"), epochs=3, workdir=wd, config={**cfg, "lr": 2e-2})
    with pytest.raises(checkpoint.CheckpointStructureError, match="holds a linear run, not bitfit"):
        _fit(tiny, get_method("bitfit"), epochs=3, workdir=wd)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # as if killed after logging epoch 3
        f.write(json.dumps({"epoch": 3, "step": 9, "train_loss": 0.0}) + "\n")
    r = _fit(tiny, get_method("linear"), epochs=3, workdir=wd, config={**cfg, "epochs": 3})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]
    assert r["epochs_changed_on_resume"] == [2, 3] and r["resumed_from_epoch"] == 2
    assert r["data"]["split_sizes"] == {"train800": 48, "val200": 16, "test": 32}


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny, tmp_path):
    with pytest.raises(FloatingPointError, match="epoch 1"):
        _fit(tiny, get_method("full"), lr=1e30, epochs=2, workdir=str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_bad_arguments_name_the_field(tiny):
    with pytest.raises(ValueError, match="epochs"):
        _fit(tiny, get_method("linear"), epochs=0)
    with pytest.raises(ValueError, match="lr"):
        _fit(tiny, get_method("linear"), lr=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        _fit(tiny, get_method("linear"), batch_size=10_000)


SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from conftest import make_source
    from guft_jax import sharding, train, vit, guft
    from guft_jax.config import TrainConfig
    from guft_jax.methods import get_method
    from jax.sharding import PartitionSpec as P
    model = vit.build_model("ViT-tiny/4", num_classes=3)
    params = vit.init_params(model, jax.random.key(0), 16)
    out = {}
    for name in ("lora", "guft"):
        for n in (1, 8):
            m = (get_method("lora", rank=2, alpha=3.0) if name == "lora"
                 else guft.guft(recompute_epochs=[1, 2], ratios=[0.02, 0.02]))
            mesh = sharding.make_mesh(n)
            cfg = TrainConfig(image_size=16, batch_size=16, epochs=3, lr=1e-2, progress=False,
                              warmup_epochs=0,
                              param_rules=((r"MlpBlock_3/Dense_0/kernel$", P(None, "data")),))
            r = train.fit(model, params, m, make_source(), cfg, mesh=mesh, hooks=lambda s: None)
            out[f"{name}{n}"] = dict(
                loss=[h["train_loss"] for h in r["history"]],
                leaves=[np.asarray(x).ravel().tolist()
                        for x in jax.tree.leaves(r["state"].trainable)],
                devices=len(jax.devices()))
    print(json.dumps(out))
    """
)


def test_eight_fake_cpu_devices_equal_one_device(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    tests_dir = os.path.dirname(__file__)
    proc = subprocess.run(
        [sys.executable, str(script), tests_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("lora", "guft"):
        one, eight = out[f"{name}1"], out[f"{name}8"]
        assert eight["devices"] == 8
        np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5, atol=1e-6)
        for a, b in zip(one["leaves"], eight["leaves"], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
