"""Run directories: the lock, the config fingerprint, metrics/TensorBoard cut back on resume,
atomic JSON, and checkpoints that restore the newest intact step."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import numpy as np
import pytest

from guft_jax import checkpoint as ckpt
from guft_jax import rundir
from guft_jax.errors import (
    CheckpointDamagedError,
    ConfigChangedError,
    DataChangedError,
    InputError,
    WorkdirLockedError,
)

# ----------------------------------------------------------------------------- lock


def test_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    wd = str(tmp_path / "run")
    with rundir.locked(wd):
        with pytest.raises(WorkdirLockedError, match=f"in use by process {os.getpid()}"):
            rundir.acquire_lock(wd)  # a second open file description conflicts too
    rundir.release_lock(rundir.acquire_lock(wd))  # released: free again
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from guft_jax import rundir; "
         "rundir.acquire_lock(sys.argv[1]); print('held', flush=True); time.sleep(60)", wd],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        with pytest.raises(WorkdirLockedError) as e:
            rundir.acquire_lock(wd)
        assert time.time() - t0 < 1.0
        assert f"process {holder.pid}" in str(e.value) and wd in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.release_lock(rundir.acquire_lock(wd))  # the kernel dropped the dead holder's lock
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        rundir.acquire_lock(str(tmp_path / "file"))


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_refuses_changes_but_epochs_naming_fields():
    cfg = {"lr": 0.01, "seed": 0, "method": "lora", "epochs": 2, "progress": False,
           "method_kwargs": {"rank": 8, "targets": ("q", "v")}}  # fmt: skip
    fp = rundir.fingerprint(cfg)
    assert "epochs" not in fp and fp["method_kwargs.targets"] == ["q", "v"]
    assert json.loads(json.dumps(fp)) == fp
    rundir.check_resume_config(fp, {**cfg, "epochs": 4, "progress": True}, workdir="W")
    rundir.check_resume_config(None, {**cfg, "lr": 9}, workdir="W")  # old checkpoint: no print
    changed = {**cfg, "lr": 0.5, "seed": 3, "method": "bitfit",
               "method_kwargs": {"rank": 4, "targets": ("q", "v")}}  # fmt: skip
    with pytest.raises(ConfigChangedError) as e:
        rundir.check_resume_config(fp, changed, workdir="/runs/a")
    msg = str(e.value)
    for part in ("lr: 0.01 -> 0.5", "seed: 0 -> 3", 'method: "lora" -> "bitfit"',
                 "method_kwargs.rank: 8 -> 4", "/runs/a", "--fresh"):  # fmt: skip
        assert part in msg, msg
    assert "\n" not in msg and "targets" not in msg
    with pytest.raises(ConfigChangedError, match=r'dataset: \(absent\) -> "digits"'):
        rundir.check_resume_config(fp, {**cfg, "dataset": "digits"}, workdir="W")


# ----------------------------------------------------------------------------- metrics, TB


def _read_events(tb_dir):
    """Scalars ``[(tag, step, value)]`` of every TensorBoard event file under ``tb_dir``."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, ev.step, v.simple_value) for v in ev.summary.value]
    return out


def test_metrics_truncated_to_the_restored_step_and_tensorboard_rewritten(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    for e in (1, 2, 3):
        rundir.append_jsonl(path, {"epoch": e, "step": 10 * e, "train_loss": 1.0 / e})
    with open(path, "a") as f:
        f.write('{"epoch": 4, "step": 40, "train_lo')  # a kill in the middle of a line
    assert [r["epoch"] for r in rundir.read_jsonl(path)] == [1, 2, 3]
    kept, dropped = rundir.truncate_metrics(path, 20)
    assert [r["epoch"] for r in kept] == [1, 2] and dropped == 2
    assert [json.loads(s)["epoch"] for s in open(path).read().splitlines()] == [1, 2]
    assert rundir.truncate_metrics(path, 20) == (kept, 0)
    with open(path, "a") as f:
        f.write('{"epoch": 3, "step": 30}')  # whole, but killed before its newline
    assert rundir.truncate_metrics(path, 30) == ([*kept, {"epoch": 3, "step": 30}], 0)
    rundir.append_jsonl(path, {"epoch": 4, "step": 40})
    assert [r["epoch"] for r in rundir.read_jsonl(path)] == [1, 2, 3, 4]
    rundir.truncate_metrics(path, 20)
    assert rundir.truncate_metrics(str(tmp_path / "none.jsonl"), 5) == ([], 0)
    tb = str(tmp_path / "tb")
    w = rundir.rewrite_tensorboard(tb, [{"epoch": 1, "step": 10, "train_loss": 0.5}] * 2)
    w.close()
    w = rundir.rewrite_tensorboard(tb, kept)  # the resume: old events gone, kept ones again
    rundir.write_scalars(w, {"epoch": 3, "step": 30, "train_loss": 0.25, "flag": True})
    w.close()
    assert sorted(_read_events(tb)) == [("train_loss", 10, 1.0), ("train_loss", 20, 0.5),
                                        ("train_loss", 30, 0.25)]  # fmt: skip


def test_write_json_atomic_keeps_the_old_file_when_killed_before_the_rename(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    rundir.write_json_atomic(path, {"a": 1})
    assert json.load(open(path)) == {"a": 1}

    def killed(*a):
        raise KeyboardInterrupt  # stands for the process dying between write and rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.write_json_atomic(path, {"a": 2, "big": list(range(1000))})
    monkeypatch.undo()
    assert json.load(open(path)) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # the temporary file removed on the way out
    (tmp_path / f".results.json.{os.getpid() + 1}.tmp").write_text("{")  # a SIGKILL's leftover
    assert rundir.remove_stale_tmp(str(tmp_path)) == [f".results.json.{os.getpid() + 1}.tmp"]
    assert os.listdir(tmp_path) == ["results.json"]


def test_clear_run_removes_run_files_only(tmp_path):
    wd = tmp_path / "w"
    for d in ("checkpoints/1", "tb"):
        (wd / d).mkdir(parents=True)
    for f in ("metrics.jsonl", "results.json", "notes.txt"):
        (wd / f).write_text("x")
    with rundir.locked(str(wd)):
        assert sorted(rundir.clear_run(str(wd))) == sorted(
            ["checkpoints", "tb", "metrics.jsonl", "results.json"])  # fmt: skip
    assert sorted(os.listdir(wd)) == [".lock", "notes.txt"]


# ----------------------------------------------------------------------------- checkpoints


def _state(v):
    return {"a": jnp.arange(600.0) + v, "b": {"c": jnp.full((20, 20), v, jnp.float32)}}


def _two_steps(tmp_path):
    mgr = ckpt.manager(str(tmp_path / "ck"))
    for s in (1, 2):
        ckpt.save(mgr, s, _state(s), {"epoch": s, "method": "lora"})
    return mgr


def _largest_chunk(mgr, step):
    files = glob.glob(os.path.join(str(mgr.directory), str(step), "state", "**", "d", "*"),
                      recursive=True)  # fmt: skip
    return max(files, key=os.path.getsize)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    mgr = _two_steps(tmp_path)
    chunk = _largest_chunk(mgr, 2)
    data = bytearray(open(chunk, "rb").read())
    data[100:300] = bytes(b ^ 0xFF for b in data[100:300])  # 200 bytes flipped
    open(chunk, "wb").write(bytes(data))
    rel = os.path.relpath(chunk, os.path.join(str(mgr.directory), "2"))
    with pytest.raises(CheckpointDamagedError) as e:
        ckpt.restore(ckpt.manager(str(tmp_path / "ck")), _state(0))
    assert str(e.value) == (f"checkpoint {mgr.directory}/2 is damaged: file {rel} fails its "
                            "SHA-256 check")  # fmt: skip
    logs = []
    mgr = ckpt.manager(str(tmp_path / "ck"))
    state, meta, step = ckpt.restore_intact(mgr, _state(0), method="lora", log=logs.append)
    assert step == 1 and meta["epoch"] == 1
    assert np.array_equal(state["a"], np.arange(600.0) + 1)
    assert len(logs) == 2 and all("\n" not in s for s in logs)
    assert f"{mgr.directory}/2 is damaged (file {rel} fails its SHA-256 check)" in logs[0]
    assert "trying step 1" in logs[0] and "resuming from the intact checkpoint" in logs[1]
    assert sorted(os.listdir(mgr.directory)) == ["1", "2.damaged"]
    ckpt.save(mgr, 2, _state(5), {"epoch": 2})  # the run goes on past the moved-aside step
    ckpt.save(mgr, 3, _state(6), {"epoch": 3})
    assert mgr.all_steps() == [2, 3] and ckpt.restore(mgr, _state(0))[1] == {"epoch": 3}


# With the file manifest the damage is found before tensorstore reads anything; without it (a
# kill between orbax's commit and the manifest, or an older checkpoint) by tensorstore's own
# checks or the leaves' SHA-256.
DAMAGE = {
    ("truncate", True): ("bytes, ",),
    ("index", True): ("fails its SHA-256 check",),
    ("meta", True): ("file meta/metadata has 4 bytes, 30 were written",),
    # tensorstore's words vary with the byte hit (OUT_OF_RANGE, DATA_LOSS: CRC-32C, ZSTD...)
    ("truncate", False): ("is damaged (",),
    ("index", False): ("is damaged (",),
    ("meta", False): ("'meta' item cannot be read",),
}


@pytest.mark.parametrize("damage,manifest", sorted(DAMAGE))
def test_other_damage_is_named_in_one_line(tmp_path, capfd, damage, manifest):
    mgr = _two_steps(tmp_path)
    step2 = os.path.join(str(mgr.directory), "2")
    if not manifest:
        os.remove(os.path.join(step2, ckpt.MANIFEST))
    if damage == "truncate":
        chunk = _largest_chunk(mgr, 2)
        data = open(chunk, "rb").read()
        open(chunk, "wb").write(data[: len(data) // 2])
    elif damage == "index":  # a byte of every file of the array store
        for f in glob.glob(os.path.join(step2, "state", "**", "d", "*"), recursive=True):
            data = bytearray(open(f, "rb").read())
            data[len(data) // 2] ^= 0xFF
            open(f, "wb").write(bytes(data))
    else:
        open(os.path.join(step2, "meta", "metadata"), "w").write("{bad")
    logs = []
    _, _, step = ckpt.restore_intact(ckpt.manager(step2[:-2]), _state(0), log=logs.append)
    assert step == 1 and any(w in logs[0] for w in DAMAGE[damage, manifest]), logs[0]
    assert "\n" not in logs[0] and len(logs[0]) < 400, logs[0]
    if manifest:  # tensorstore never saw the damaged files: no background-thread tracebacks
        assert "Traceback" not in capfd.readouterr().err


def test_no_intact_checkpoint_and_structure_errors_are_one_line(tmp_path):
    mgr = _two_steps(tmp_path)
    with pytest.raises(ckpt.CheckpointStructureError) as e:
        ckpt.restore_intact(mgr, _state(0), method="guft")
    assert str(e.value) == (f"checkpoint {mgr.directory}/2 holds a lora run, not guft; use "
                            "another workdir or start over (--fresh)")  # fmt: skip
    other = {"a": jnp.zeros(5), "z": jnp.zeros(3)}
    with pytest.raises(ckpt.CheckpointStructureError) as e:
        ckpt.restore(mgr, other)
    msg = str(e.value)
    assert "\n" not in msg and "1 missing (z)" in msg and "1 unexpected (b/c)" in msg
    assert "1 mismatched (a (checkpoint [[600], 'float32'] vs state [[5], 'float32']))" in msg
    assert e.value.missing == ["z"]
    assert sorted(os.listdir(mgr.directory)) == ["1", "2"]  # structure errors move nothing
    for s in (1, 2):
        open(os.path.join(str(mgr.directory), str(s), "meta", "metadata"), "w").write("[")
    with pytest.raises(CheckpointDamagedError) as e:
        ckpt.restore_intact(mgr, _state(0), log=lambda s: None)
    msg = str(e.value)
    assert msg.startswith(f"no intact checkpoint in {mgr.directory}: step 2: file meta/metadata")
    assert "step 1:" in msg and "--fresh" in msg and "\n" not in msg
    assert ckpt.restore_intact(ckpt.manager(str(tmp_path / "empty")), _state(0)) is None


def test_check_meta_and_target_function_see_the_stored_step(tmp_path):
    mgr = _two_steps(tmp_path)
    seen = []

    def target(structure):
        seen.append(structure["a"])
        return _state(0)

    def check(meta):
        if meta["epoch"] == 2:
            raise ConfigChangedError("changed")

    with pytest.raises(ConfigChangedError):
        ckpt.restore_intact(mgr, target, check_meta=check)
    assert seen == []  # refused before reading any array
    _, meta, _ = ckpt.restore_intact(mgr, target)
    assert seen == [[[600], "float32"]] and meta["epoch"] == 2


def test_interrupted_save_leaves_the_previous_step_and_no_tmp_dirs(tmp_path):
    mgr = _two_steps(tmp_path)
    tmp = os.path.join(str(mgr.directory), "3.orbax-checkpoint-tmp-123")
    os.makedirs(os.path.join(tmp, "state"))  # what a kill -9 during a save leaves
    mgr = ckpt.manager(str(tmp_path / "ck"))  # removes it (in the background, until a save)
    assert mgr.latest_step() == 2
    assert ckpt.restore_intact(mgr, _state(0), log=lambda s: None)[2] == 2
    ckpt.save(mgr, 3, _state(3), {"epoch": 3})
    assert sorted(os.listdir(mgr.directory)) == ["2", "3"]


# ----------------------------------------------------------------------------- issue 25


def test_workdir_faults_are_one_line_naming_the_path(tmp_path):
    (tmp_path / "w" / ".lock").mkdir(parents=True)
    with pytest.raises(InputError) as e:
        rundir.acquire_lock(str(tmp_path / "w"))
    assert str(e.value) == (
        f"workdir lock cannot be opened: {tmp_path}/w/.lock: is a directory (EISDIR); a folder "
        "stands where a file is expected; remove or rename it"
    )
    with pytest.raises(InputError, match="^--workdir is empty"):
        rundir.acquire_lock("")
    deep = str(tmp_path / "/".join(["d" * 200] * 20))
    with pytest.raises(InputError) as e:
        rundir.acquire_lock(deep)
    msg = str(e.value)
    assert f"is {len(deep)} characters long" in msg and msg.endswith("use a shorter --workdir")
    assert len(msg) < 400 and "…" in msg and not os.path.exists(deep)


def test_os_errors_become_one_line_and_orbax_reports_find_their_errno():
    import errno

    from guft_jax.errors import os_error_line, short_path

    long = "/r/" + "x" * 500 + "/results.json"
    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", long))
    assert line.endswith(": no space left on device (ENOSPC); free space or use another --workdir")
    assert line.startswith("/r/xxx") and "…" in line and "results.json" in line
    assert short_path("/a/b") == "/a/b" and len(short_path(long, 50)) == 50
    wrapped = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/3/x": No space left '
                         "on device [os_error_code='28']")  # fmt: skip
    err = ckpt.os_error_of(wrapped)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.filename is None
    chained = RuntimeError("outer")
    chained.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/w/f")
    assert ckpt.os_error_of(chained).filename == "/w/f"
    assert ckpt.os_error_of(ValueError("not an OS problem")) is None


def test_check_resume_data_names_each_changed_split():
    saved = {"train800val200": {"count": 210, "sha256": "a" * 64},
             "test": {"count": 60, "sha256": "b" * 64}}  # fmt: skip
    rundir.check_resume_data(saved, saved, workdir="W")
    rundir.check_resume_data(None, saved, workdir="W")  # an older checkpoint: accepted
    now = {**saved, "train800val200": {"count": 630, "sha256": "c" * 64}}
    with pytest.raises(DataChangedError) as e:
        rundir.check_resume_data(saved, now, workdir="/runs/a")
    assert str(e.value) == (
        "workdir /runs/a was trained on other data: the data changed (split train800val200: "
        "210 images (sha256 aaaaaaaaaaaa) -> 630 images (sha256 cccccccccccc)); resume on the "
        "original data, use another --workdir, or pass --fresh to start over"
    )
