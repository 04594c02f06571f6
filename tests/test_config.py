"""The training config: one typed source of defaults, every option settable from the command
line (GUFT's schedule included), kernel choices recorded in results.json and fingerprinted."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import make_source

from experiments.configs import common, tiny
from guft_jax import kernels, rundir, train
from guft_jax.config import Hooks, TrainConfig, defaults, field_names
from guft_jax.errors import ConfigChangedError
from guft_jax.methods import get_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("batch_size", 1.5), ("lr", -1.0), ("head_lr", "x"), ("precision", "fp16"),
     ("input", "gpu"), ("clip_norm", -2.0), ("stop_after_epoch", 0)],
)  # fmt: skip
def test_bad_values_name_the_field_and_the_allowed(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}: .* allowed: "):
        TrainConfig(**{field: value})


def test_config_is_frozen_and_replace_validates():
    c = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0  # type: ignore[misc]
    assert c.replace(lr=0.5).lr == 0.5 and c.lr == defaults()["lr"]
    with pytest.raises(ValueError, match="TrainConfig.epochs"):
        c.replace(epochs=-1)
    assert c.head_lr is None and c.head_lr_or_lr == c.lr


def test_cli_config_takes_every_training_default_from_train_config():
    c, t = common.base_config(), TrainConfig()
    for name in field_names():
        if name in c:
            want = getattr(t, name)
            if name == "head_lr":
                want = t.head_lr_or_lr
            elif name in ("clip_norm", "stop_after_epoch"):
                want = want or 0  # "none" is 0 on the command line
            assert c[name] == want, name
    # and back: the TrainConfig the CLI builds from it equals the defaults (head_lr = lr)
    built = common.train_config(c)
    assert built.replace(record=None, head_lr=None) == t


def test_list_valued_method_options_are_tuples_the_cli_can_set():
    c = tiny.get_config("digits,guft")
    assert isinstance(c.method_kwargs.recompute_epochs, tuple)
    assert isinstance(c.method_kwargs.ratios, tuple)


def test_guft_schedule_set_from_the_command_line(tmp_path):
    wd = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "experiments.run",
        "--config=experiments/configs/tiny.py:digits,guft", f"--workdir={wd}",
        "--config.epochs=2", "--config.image_size=8", "--config.batch_size=8",
        "--config.method_kwargs.recompute_epochs=(1, 2)",
        "--config.method_kwargs.ratios=(0.01, 0.02)",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["config"]["method_kwargs"]["recompute_epochs"] == [1, 2]
    assert res["config"]["method_kwargs"]["ratios"] == [0.01, 0.02]
    assert res["hparams"]["recompute_epochs"] == [1, 2]
    assert res["train_config"]["batch_size"] == 8


def _fit(tiny, method, wd, record, epochs=2, stop_after=None):
    model, params = tiny
    cfg = TrainConfig(image_size=16, batch_size=16, epochs=epochs, lr=1e-2, warmup_epochs=0,
                      progress=False, record=record, stop_after_epoch=stop_after)  # fmt: skip
    return train.fit(model, params, method, make_source(), cfg, workdir=str(wd),
                     hooks=Hooks(log=lambda s: None, warn=lambda s: None))  # fmt: skip


def test_kernel_choices_are_recorded_and_fingerprinted(tiny, tmp_path):
    m = get_method("guft", recompute_epochs=[1], ratios=[0.02], kernels={"sddmm": "dense"})
    r = _fit(tiny, m, tmp_path / "a", {"method": "guft"})
    got = r.results["kernels"]
    assert got["sddmm"] == "dense" and "auto" not in got.values()
    assert got["attention"] == kernels.resolve({"attention": tiny[0].attention_impl}).attention
    assert json.loads((tmp_path / "a" / "results.json").read_text())["kernels"] == got
    # a resume traced with another SDDMM is refused, naming the kernel field
    _fit(tiny, m, tmp_path / "b", {"method": "guft"}, epochs=3, stop_after=1)
    other = get_method("guft", recompute_epochs=[1], ratios=[0.02], kernels={"sddmm": "gather"})
    with pytest.raises(Exception, match=r"kernels\.sddmm: \"dense\" -> \"gather\""):
        _fit(tiny, other, tmp_path / "b", {"method": "guft"}, epochs=3)


def test_a_fingerprint_from_before_kernel_choices_were_recorded_still_resumes():
    """A checkpoint whose stored fingerprint has no ``kernels`` (written before they were
    recorded) resumes: the choice then was the only one there was, the backend's default. One
    that has them is compared field by field."""
    record = {"method": "guft", "lr": 0.01}
    old = rundir.fingerprint(record)
    now = dict(record, kernels={"sddmm": "gather", "attention": "einsum"})
    rundir.check_resume_config(old, now, workdir="W")  # accepted
    saved = rundir.fingerprint(now)
    rundir.check_resume_config(saved, now, workdir="W")
    changed = dict(record, kernels={"sddmm": "dense", "attention": "einsum"})
    with pytest.raises(ConfigChangedError, match=r'kernels\.sddmm: "gather" -> "dense"'):
        rundir.check_resume_config(saved, changed, workdir="W")
    with pytest.raises(ConfigChangedError, match=r"lr: 0.01 -> 0.1"):
        rundir.check_resume_config(old, dict(now, lr=0.1), workdir="W")


PROBE = """
import inspect, json
from benchmarks import fit_bench, step_bench
from experiments import rows
from experiments.configs.common import base_config, train_config
from guft_jax import config, packing
c = base_config()
job = rows.Job("final", "digits", "lora", 0, 1.0)
row = rows.row("lora").config(job, epochs=1, image_size=28)
fit_params = set(inspect.signature(packing.fit_packed).parameters)
print(json.dumps(dict(
    train_config=config.TrainConfig().batch_size,
    cli=c.batch_size, cli_warmup=c.warmup_epochs, cli_built=train_config(c).batch_size,
    offline=row.batch_size, offline_warmup=row.warmup_epochs,
    step_bench=int(step_bench.parse(["--group", "guft_real"]).batch),
    fit_bench=fit_bench.parse([]).batch,
    packing_own_defaults=sorted(fit_params & set(config.field_names())),
)))
"""


def test_a_default_changed_in_one_place_is_seen_everywhere(tmp_path):
    """Change TrainConfig's defaults in guft_jax/config.py (a copy of the repository) and the
    command line, the offline benchmark, packing and the benchmarks all follow."""
    import shutil

    for d in ("guft_jax", "experiments", "benchmarks"):
        shutil.copytree(
            os.path.join(ROOT, d), tmp_path / d, ignore=shutil.ignore_patterns("results")
        )
    cfg = tmp_path / "guft_jax" / "config.py"
    text = cfg.read_text()
    for old, new in (("batch_size: int = 50", "batch_size: int = 37"),
                     ("warmup_epochs: float = 1.0", "warmup_epochs: float = 0.25")):  # fmt: skip
        assert old in text
        text = text.replace(old, new)
    cfg.write_text(text)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert seen.pop("packing_own_defaults") == []  # fit_packed takes a TrainConfig, no defaults
    assert seen.pop("cli_warmup") == seen.pop("offline_warmup") == 0.25
    assert set(seen.values()) == {37}, seen
