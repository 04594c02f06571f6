"""``lr="auto"`` (guft_jax.lr_auto): the grid trained packed on train, chosen on val only, the
divergence guard's line and its dropped candidates, the record in results.json, bad values."""

import json

import numpy as np
import pytest
from absl import flags
from conftest import make_source
from method_checks import tiny_config
from ml_collections import config_flags

from experiments.configs import common
from guft_jax import lr_auto, packing, train
from guft_jax.config import Hooks, TrainConfig
from guft_jax.data import ArraySource
from guft_jax.epochs import divergence
from guft_jax.methods import base as mbase
from guft_jax.methods import get_method

PROBE = "lr_auto_probe"


def _register(name: str, method: str, defaults: mbase.Defaults) -> None:
    """Registers ``method`` under ``name`` with its own grid (the method renamed to match)."""

    @mbase.register(name, defaults=defaults, replace=True)
    def factory():
        return get_method(method)._replace(name=name)


@pytest.fixture
def probe():
    yield PROBE
    mbase.unregister(PROBE)


def _permuted_test_source(seed=0):
    """The tiny task with the test labels shifted by one class: a model that learned the task
    scores ~1 on val and ~0 on test, one that learned nothing ~1/3 on both."""
    src = make_source(seed)
    x, y = src.raw("test")
    splits = {"train800": src.raw("train"), "val200": src.raw("val"), "test": (x, (y + 1) % 3)}
    return ArraySource("synthetic_permuted", 3, splits)


def _quiet(lines=None):
    return Hooks(log=lambda s: None, warn=(lines.append if lines is not None else lambda s: None))


def test_auto_follows_val_where_test_disagrees(tiny, probe, tmp_path):
    model, params = tiny
    # the head-only method's grid on the head lr: 0 (the zero head predicts class 0) and 1e-2
    _register(
        probe, "linear", mbase.Defaults(head_lr=1e-2, lr_grid=(0.0, 1.0), select_head_lr=True)
    )
    m, src = get_method(probe), _permuted_test_source()
    cfg = tiny_config(lr="auto", head_lr=None, epochs=3)
    logs = []
    hooks = Hooks(log=logs.append, warn=lambda s: None)
    r = train.fit(model, params, m, src, cfg, workdir=str(tmp_path / "run"), hooks=hooks)
    auto = r.results["lr_auto"]
    chosen = [s for s in logs if s.startswith("lr_auto: ") and s.endswith("<- chosen")]
    assert len(chosen) == 1 and chosen[0].split()[2] == "0.01", logs  # lr, head_lr, ...
    val = {c["head_lr"]: c["val_accuracy"] for c in auto["candidates"]}
    # the same candidates scored on test (what a selection on test would see)
    sel = cfg.replace(lr=1e-3, epochs=auto["epochs"], train_split="train", eval_split="test")
    _, on_test = packing.fit_packed(model, params, m, [src, src], sel, lrs=[1e-3, 1e-3],
                                    head_lrs=[0.0, 1e-2], seeds=[0, 0])  # fmt: skip
    test = {h: t["test_accuracy"] for h, t in zip((0.0, 1e-2), on_test, strict=True)}
    assert max(val, key=val.get) == 1e-2 and max(test, key=test.get) == 0.0  # they disagree
    assert auto["chosen_head_lr"] == 1e-2 and r.results["train_config"]["head_lr"] == 1e-2
    assert r.results["test_accuracy"] < 1 / 3  # the val choice, whatever test says
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())["lr_auto"]
    assert on_disk == auto and auto["val_split"] == "val" and auto["train_split"] == "train"
    assert {tuple(c) for c in map(dict.keys, auto["candidates"])} == {
        ("lr", "head_lr", "val_accuracy", "val_loss", "train_loss", "diverged")
    }


def test_divergence_line_for_a_diverging_lr_and_not_for_the_default(tiny):
    model, params = tiny
    seen = {}
    for lr in (1.0, tiny_config().lr):
        lines = []
        cfg = tiny_config(lr=lr, head_lr=lr, epochs=4, warmup_epochs=1)
        r = train.fit(model, params, get_method("full"), make_source(), cfg, hooks=_quiet(lines))
        seen[lr] = (lines, r.results["diverged_at_epoch"])
    lines, at = seen[1.0]
    assert len(lines) == 1 and at is not None, lines
    assert lines[0].startswith("diverging: lr 1 (head lr 1)") and f"(epoch {at})" in lines[0]
    assert f"at step {4 * at}" in lines[0]  # trainval: 48 + 16 images, 4 steps of 16 an epoch
    assert seen[tiny_config().lr] == ([], None)


def test_auto_drops_a_diverging_candidate(tiny, probe):
    model, params = tiny
    # full fine-tuning at lr 1e-2, the grid on the head's lr: 1e-2 learns, 3.0 diverges
    grid = mbase.Defaults(lr=1e-2, head_lr=1e-2, lr_grid=(1.0, 300.0), select_head_lr=True)
    _register(probe, "full", grid)
    lines = []
    cfg = tiny_config(lr="auto", head_lr=None, epochs=4, warmup_epochs=1)
    r = train.fit(model, params, get_method(probe), make_source(), cfg, hooks=_quiet(lines))
    cands = {c["head_lr"]: c for c in r.results["lr_auto"]["candidates"]}
    assert cands[3.0]["diverged"] and not cands[1e-2]["diverged"]
    assert r.results["lr_auto"]["chosen_head_lr"] == 1e-2
    drops = [s for s in lines if "drops" in s]
    assert len(drops) == 1 and drops[0].startswith("diverging: lr 0.01 (head lr 3)"), lines
    assert r.results["diverged_at_epoch"] is None


def test_divergence_rule():
    assert divergence([2.0, 3.1, 3.2]) == 3  # two epochs above 1.5x the first
    assert divergence([2.0, 3.1, 2.9, 3.1]) is None  # not consecutive
    assert divergence([2.0, 1.0, float("nan")]) == 3  # a non-finite loss
    assert divergence([2.0]) is None and divergence([]) is None


def test_pick_prefers_val_accuracy_then_val_loss_and_skips_diverged():
    C = lr_auto.Candidate
    cands = [C(1e-3, 1e-2, 0.9, 0.5, 1.0, False), C(3e-3, 1e-2, 0.95, 0.4, 1.0, True),
             C(1e-4, 1e-2, 0.9, 0.3, 1.0, False)]  # fmt: skip
    assert lr_auto.pick(cands).lr == 1e-4
    assert lr_auto.pick([c._replace(diverged=True) for c in cands]) is None


def test_no_val_split_is_an_error_naming_lr(tiny):
    model, params = tiny
    src = make_source()
    no_val = ArraySource("no_val", 3, {"train": src.raw("train"), "test": src.raw("test")})
    cfg = tiny_config(lr="auto", train_split="train")
    with pytest.raises(ValueError, match=r"lr: 'auto' chooses on the val split"):
        train.fit(model, params, get_method("linear"), no_val, cfg, hooks=_quiet())


@pytest.mark.parametrize("value", ["fast", -1.0, True, None])
def test_bad_lr_names_the_field_and_the_allowed(value):
    with pytest.raises(ValueError, match=r"TrainConfig\.lr: .* allowed: a number >= 0 or 'auto'"):
        TrainConfig(lr=value)


def test_cli_parses_lr_auto_and_numbers():
    for arg, want in (("auto", "auto"), ("3e-4", 3e-4)):
        argv = ["prog", "--config=experiments/configs/tiny.py:digits,lora", f"--config.lr={arg}"]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
        fv(argv)
        assert fv.config.lr == want
        common.validate(fv.config)
        assert common.train_config(fv.config).lr == want
    assert common.default_lr("npz:a.npz", 1e-3) == common.default_lr("folder:d", 1e-3) == "auto"
    assert common.default_lr("animal_mnist", 1e-3) == common.default_lr("vtab/dtd", 1e-3) == 1e-3
    fv.config.lr = "fast"
    with pytest.raises(ValueError, match=r"config\.lr: 'fast' is not allowed"):
        common.validate(fv.config)


def test_grid_of_registered_methods():
    lrs, heads = lr_auto.grid(get_method("lora"), TrainConfig(lr="auto"))
    d = mbase.spec("lora").defaults
    assert lrs == pytest.approx([d.lr * f for f in d.lr_grid], rel=1e-9)
    assert heads == [d.head_lr] * len(d.lr_grid) and str(lrs[0]) == f"{lrs[0]:.6g}"
    lrs, heads = lr_auto.grid(get_method("linear"), TrainConfig(lr="auto", head_lr=0.1))
    g = mbase.spec("linear").defaults.lr_grid
    assert heads == pytest.approx([0.1 * f for f in g], rel=1e-9)
    assert np.all(np.asarray(lrs) == mbase.spec("linear").defaults.lr)


def test_sizes_preset_runs_and_its_table_flags_rising_loss_and_runs_below_the_probe():
    from experiments import rows
    from experiments.presets import SIZE_PRESETS

    p = SIZE_PRESETS["sizes"]
    runs = rows.size_runs(p)
    assert len(runs) == len(set(runs)) == 2 * 5 * 5 * 2  # datasets x sizes x methods x lr modes
    assert {r.lr_mode for r in runs} == {"default", "auto"} and p.reference in p.methods
    q = p.replace(datasets=("d",), sizes=(100, 300), methods=("linear", "full"))

    def rec(n, m, mode, acc, first=2.3, last=1.0, seed=0):
        name = f"d_{n}_{m}_{mode}_s{seed}"
        return dict(name=name, dataset="d", size=n, method=m, lr_mode=mode, test_accuracy=acc,
                    first_loss=first, last_loss=last, wall_s=60.0)  # fmt: skip

    records = [rec(100, "linear", "default", 0.5), rec(100, "full", "default", 0.2),
               rec(300, "linear", "default", 0.8), rec(300, "full", "default", 0.3, last=4.0),
               rec(300, "linear", "auto", 0.8), rec(300, "full", "auto", 0.9)]  # fmt: skip
    table = rows.sizes_table(records, q)
    assert "| d | 300 | 80.0 / 80.0 | 30.0! / 90.0 |" in table
    assert "| d | 100 | 50.0 / - | 20.0 / - |" in table
    assert "above their first's: d_300_full_default_s0." in table
    assert "at >= 300 images: d_300_full_default." in table  # 100 images: not checked
    assert "6 runs, 6.0 min" in table
    # a second seed: the cell is the mean over both, checked against the probe's mean
    table = rows.sizes_table(records + [rec(300, "full", "auto", 0.5, seed=1)], q)
    assert "| d | 300 | 80.0 / 80.0 | 30.0! / 70.0 (2) |" in table
    assert "at >= 300 images: d_300_full_default, d_300_full_auto." in table
