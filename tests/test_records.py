"""A run directory's records describe the model beside it (issue 25): results.json's history
across resumes, a rerun of a finished run as a no-op, fewer epochs refused, a refusal that
holds until --fresh, replaced data refused, notices on stderr, an honest NaN message, Ctrl-C."""

import dataclasses
import glob
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest
from conftest import make_source
from fault_rows import record

from guft_jax import rundir, train
from guft_jax.config import Hooks, TrainConfig
from guft_jax.data import ArraySource, data_identity
from guft_jax.errors import (
    CheckpointDamagedError,
    DataChangedError,
    EpochsLoweredError,
    Interrupted,
)
from guft_jax.methods import get_method

CFG = {"lr": 1e-2, "method": "lora", "epochs": 3}


def _fit(tiny, wd, *, epochs=3, source=None, method=None, hooks=lambda s: None, **kw):
    model, params = tiny
    args = dict(
        image_size=16,
        batch_size=16,
        epochs=epochs,
        lr=1e-2,
        warmup_epochs=1,
        progress=False,
        record={**CFG, "epochs": epochs},
        train_split="train800val200",
    )
    args.update(kw)
    return train.fit(
        model,
        params,
        method if method is not None else get_method("lora", rank=2, alpha=3.0),
        source if source is not None else make_source(),
        TrainConfig(**args),
        workdir=str(wd),
        hooks=hooks,
    )


def _records(wd):
    """Every file of the run directory but the lock, as bytes (the records a rerun must keep)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(str(wd), "**", "*"), recursive=True)):
        if os.path.isfile(path) and not path.endswith(".lock"):
            out[os.path.relpath(path, wd)] = open(path, "rb").read()
    return out


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.trainable)]


def test_rerun_of_a_finished_run_is_a_no_op_and_fewer_epochs_are_refused(tiny, tmp_path):
    logs = []
    first = _fit(tiny, tmp_path, hooks=logs.append)
    before = _records(tmp_path)
    res = json.loads(before["results.json"])
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3] and res["epochs"] == 3
    assert res["traces"] == 1 and res["wall_seconds"] > 0
    logs.clear()
    again = _fit(tiny, tmp_path, hooks=logs.append)
    assert _records(tmp_path) == before  # results, metrics, events, checkpoints: byte for byte
    assert again.results == res and any("nothing to do" in s for s in logs)
    for a, b in zip(_leaves(first.state), _leaves(again.state), strict=True):
        np.testing.assert_array_equal(a, b)
    for epochs in (2, 1):
        with pytest.raises(EpochsLoweredError) as e:
            _fit(tiny, tmp_path, epochs=epochs)
        assert str(e.value).startswith(f"epochs={epochs} is fewer than the 3 epochs the model in")
        assert "\n" not in str(e.value)
    record("run directory", "fewer epochs than trained (3 -> 1)", f"error: {e.value}")
    assert _records(tmp_path) == before


def test_history_is_complete_across_resumes_and_lowering_a_partial_run_is_refused(tiny, tmp_path):
    full = _fit(tiny, tmp_path / "full", epochs=4)
    wd = tmp_path / "part"
    _fit(tiny, wd, epochs=4, stop_after_epoch=1)
    _fit(tiny, wd, epochs=4, stop_after_epoch=3)  # resumed once, stopped after epoch 3
    with pytest.raises(EpochsLoweredError, match="epochs=2 is fewer than the 3 epochs"):
        _fit(tiny, wd, epochs=2)
    rest = _fit(tiny, wd, epochs=4)
    assert [h["epoch"] for h in rest["history"]] == [1, 2, 3, 4]
    assert rest["history"] == rundir.read_jsonl(str(wd / "metrics.jsonl"))
    assert [h["train_loss"] for h in rest["history"]] == [h["train_loss"] for h in full["history"]]
    assert rest["resumed_from_epoch"] == 3 and rest["epochs"] == 4
    # three processes' time, up to each one's last checkpoint, plus this one's
    assert rest["wall_seconds"] > sum(h["epoch_seconds"] for h in rest["history"][:3])
    saved = json.loads((wd / "results.json").read_text())
    assert saved["history"] == rest["history"] and saved["test_accuracy"] == full["test_accuracy"]


def _damage_every_step(wd):
    for meta in glob.glob(os.path.join(str(wd), "checkpoints", "*", "meta", "metadata")):
        open(meta, "w").write("[")


def test_a_refusal_for_damaged_checkpoints_holds_until_fresh(tiny, tmp_path, capsys):
    _fit(tiny, tmp_path, epochs=2)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    _damage_every_step(tmp_path)
    (tmp_path / "results.json").unlink()
    messages = []
    for _ in range(3):  # the first time moves the steps aside; the later ones remember
        with pytest.raises(CheckpointDamagedError) as e:
            _fit(tiny, tmp_path, epochs=2)
        messages.append(str(e.value))
        assert (tmp_path / "metrics.jsonl").read_text() == metrics  # records kept
    assert "step 2:" in messages[0] and "--fresh" in messages[0]
    record("checkpoints", "every step damaged", f"error: {messages[0]}")
    record("checkpoints", "every step damaged, the same command again", f"error: {messages[1]}")
    for m in messages[1:]:
        assert "every step was found damaged earlier" in m and "2.damaged" in m
        assert "1.damaged" in m and "--fresh" in m and "\n" not in m
    out = capsys.readouterr()
    assert "is damaged" in out.err and "is damaged" not in out.out  # notices go to stderr
    r = _fit(tiny, tmp_path, epochs=2, fresh=True)
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def _other_images(src: ArraySource, seed: int) -> ArraySource:
    """The same split sizes and classes, other pixels (a replaced data file)."""
    rng = np.random.default_rng(seed)
    splits = {
        s: (rng.integers(0, 256, x.shape).astype(np.uint8), y) for s, (x, y) in src.splits.items()
    }
    return ArraySource(src.name, src.num_classes, splits)


def test_replaced_data_is_refused_naming_the_split(tiny, tmp_path):
    src = make_source()
    _fit(tiny, tmp_path, epochs=3, source=src, stop_after_epoch=1)
    ident = data_identity(src, ["train800val200", "test"])
    assert ident["test"]["count"] == 32 and len(ident["test"]["sha256"]) == 64
    assert data_identity(make_source(), ["test"]) == {"test": ident["test"]}  # same data, same id
    with pytest.raises(DataChangedError) as e:
        _fit(tiny, tmp_path, epochs=3, source=_other_images(src, 1))
    msg = str(e.value)
    assert "the data changed" in msg and "split train800val200: 64 images" in msg
    assert "split test: 32 images" in msg and "--fresh" in msg
    record("run directory", "resume on replaced data (same classes)", f"error: {msg}")
    bigger = make_source(n_train=96)  # more images of the same classes
    with pytest.raises(DataChangedError, match=r"split train800val200: 64 images \(sha256 \w+\) "
                       r"-> 112 images"):  # fmt: skip
        _fit(tiny, tmp_path, epochs=3, source=bigger)
    more_classes = dataclasses.replace(_other_images(src, 2), num_classes=4)
    with pytest.raises(DataChangedError, match="the data changed"):  # not a structure error
        _fit(tiny, tmp_path, epochs=3, source=more_classes)
    r = _fit(tiny, tmp_path, epochs=3, source=src)  # the original data resumes
    assert r["resumed_from_epoch"] == 1 and r["data_identity"] == ident


def test_nan_loss_in_the_first_epoch_says_no_checkpoint_was_saved(tiny, tmp_path):
    with pytest.raises(FloatingPointError) as e:
        _fit(tiny, tmp_path, method=get_method("full"), lr=1e30, epochs=2)
    assert "no checkpoint was saved" in str(e.value) and "epoch 0" not in str(e.value)
    record("run directory", "NaN loss in the first epoch", f"error: {e.value}")


def test_a_stop_request_ends_after_the_step_and_the_rerun_resumes_bitwise(tiny, tmp_path):
    full = _fit(tiny, tmp_path / "full")
    wd = tmp_path / "run"
    asked = []

    def stop():  # Ctrl-C arrives during the second step of epoch 2
        asked.append(1)
        return len(asked) >= 1 + 4 + 1 + 2  # asked before each epoch and after each of 4 steps

    with pytest.raises(Interrupted) as e:
        _fit(tiny, wd, hooks=Hooks(log=lambda s: None, stop=stop))
    assert isinstance(e.value, KeyboardInterrupt)
    assert str(e.value) == "interrupted at epoch 2 step 2; rerun the same command to resume"
    assert [r["epoch"] for r in rundir.read_jsonl(str(wd / "metrics.jsonl"))] == [1]
    assert sorted(os.listdir(wd / "checkpoints")) == ["1"]  # nothing of epoch 2 was saved
    rest = _fit(tiny, wd)
    assert [h["epoch"] for h in rest["history"]] == [1, 2, 3]
    for a, b in zip(_leaves(full.state), _leaves(rest.state), strict=True):
        np.testing.assert_array_equal(a, b)
