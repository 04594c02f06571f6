"""Faults injected into real CLI runs (issue 25): kill -9 at each state of a run, SIGTERM and
Ctrl-C, repeated in one workdir, resume bitwise to the uninterrupted run with each epoch once in
metrics.jsonl, tb/ and results.json; and every operating-system fault (read-only, a folder for
the lock, an empty or too long workdir, no space during a checkpoint or results.json) as exit 2
with exactly one stderr line and no traceback.

Tiny sizes: 30 images, 8x8 pixels, batch 8, 3 epochs of 3 steps; each run is a few seconds.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fault_rows import record
from test_rundir import _read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"guft_jax_test_cli_cache_{os.getuid()}")
RUN = ("--config.epochs=3", "--config.image_size=8", "--config.batch_size=8")

CHILD = r"""
import errno, json, os, signal, sys

point, at = os.environ.get("GUFT_TEST_FAULT", "none:0").split(":")
at = int(at)


def die(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)


def fill_disk():  # fills the run's small file system; False: none mounted, inject instead
    small = os.environ.get("GUFT_TEST_SMALL_FS")
    if not small:
        return False
    fd = os.open(os.path.join(small, "ballast"), os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    os.close(fd)
    return True


if point in ("mid_epoch", "sigint", "sigterm"):  # during the second step of epoch `at`
    from guft_jax.data import pipeline

    sig = {"mid_epoch": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[point]
    real_batches = pipeline.ArraySource.batches

    def batches(self, split, **kw):
        it = real_batches(self, split, **kw)
        if not (kw.get("shuffle") and kw.get("epoch") == at):
            return it

        def signalled():
            for i, b in enumerate(it):
                if i == 1:
                    die(sig)
                yield b

        return signalled()

    pipeline.ArraySource.batches = batches
elif point == "metrics_line":  # half of epoch `at`'s metrics line written
    from guft_jax import rundir

    real_append = rundir.append_jsonl

    def append(path, record):
        if record.get("epoch") == at:
            with open(path, "a") as f:
                f.write(json.dumps(record)[:25])
            die()
        real_append(path, record)

    rundir.append_jsonl = append
elif point == "tb_rewrite":  # a resume killed with only part of the events rewritten
    from guft_jax import rundir

    real_rewrite = rundir.rewrite_tensorboard

    def rewrite(tb_dir, records, **kw):
        records = list(records)
        if records:
            real_rewrite(tb_dir, records[:1], **kw).flush()
            die()
        return real_rewrite(tb_dir, records, **kw)

    rundir.rewrite_tensorboard = rewrite
elif point in ("before_checkpoint", "checkpoint_write", "enospc_checkpoint"):
    from guft_jax import checkpoint

    real_save = checkpoint.save

    class Dying:  # orbax has started writing the step's temporary directory
        def __init__(self, mgr):
            self.mgr = mgr

        def __getattr__(self, name):
            return getattr(self.mgr, name)

        def wait_until_finished(self):
            die()

    class Full(Dying):  # orbax's writer threads report a full disk like this
        def save(self, step, *a, **k):
            raise ValueError(
                f'RESOURCE_EXHAUSTED: Error writing local file "{self.mgr.directory}/{step}'
                '.orbax-checkpoint-tmp/state/manifest.ocdbt": Failed to write 572 bytes: No '
                "space left on device [os_error_code='28']"
            )

    def save(mgr, step, state, meta):
        if step == at and point == "before_checkpoint":
            die()
        if step == at and point == "enospc_checkpoint":
            mgr = mgr if fill_disk() else Full(mgr)
        elif step == at:
            mgr = Dying(mgr)
        real_save(mgr, step, state, meta)

    checkpoint.save = save
elif point in ("results", "enospc_results"):  # results.json being written
    from guft_jax import rundir

    real_write = rundir.write_json_atomic

    def write(path, obj):
        if str(path).endswith("results.json"):
            if point == "results":
                os.replace = lambda *a, **k: die()  # written, not yet renamed
            elif not fill_disk():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_write(path, obj)

    rundir.write_json_atomic = write
elif point == "read_only":  # the workdir's file system is mounted read-only
    real_makedirs = os.makedirs

    def makedirs(path, *a, **k):
        if "read-only" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_makedirs(path, *a, **k)

    os.makedirs = makedirs

from absl import app

from experiments import run

app.run(run.main)
"""


def _env(**extra):
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        **extra,
    )


def _run(workdir, data, *extra, fault=None, small_fs=None):
    env = _env(GUFT_TEST_FAULT=fault or "none:0", GUFT_TEST_SMALL_FS=small_fs or "")
    cmd = [sys.executable, "-c", CHILD, "--config=experiments/configs/tiny.py:digits,lora",
           f"--workdir={workdir}", f"--config.dataset=npz:{data}", *RUN, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def _one_line(p, code=2):
    """Exactly one stderr line, no traceback, the given exit code; returns the line."""
    lines = [s for s in p.stderr.splitlines() if s.strip()]
    assert p.returncode == code and len(lines) == 1, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d30.npz"
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [5, 10, 15])
    x = rng.integers(0, 50, (30, 4, 4, 3)) + 60 * y[:, None, None, None]
    np.savez(path, images=x.astype(np.uint8), labels=y)
    return str(path)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data):
    wd = tmp_path_factory.mktemp("baseline") / "run"
    p = _run(wd, data)
    assert p.returncode == 0, p.stderr[-2000:]
    return wd


def _leaves(workdir, step):
    import jax
    import orbax.checkpoint as ocp

    from guft_jax import checkpoint as ckpt

    mgr = ckpt.manager(os.path.join(workdir, "checkpoints"))
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mgr.close()
    flat = jax.tree_util.tree_flatten_with_path(out["state"])[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(s) for s in f.read().splitlines()]


def _same_run(wd, baseline):
    """Final params bitwise equal; each epoch once in metrics, events and results' history."""
    a, b = _leaves(str(wd), 3), _leaves(str(baseline), 3)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    keys = ("epoch", "step", "train_loss")
    got = [{k: r[k] for k in keys} for r in _metrics(wd)]
    assert got == [{k: r[k] for k in keys} for r in _metrics(baseline)]
    assert [r["epoch"] for r in got] == [1, 2, 3]
    loss_events = sorted(e[1:] for e in _read_events(str(wd / "tb")) if e[0] == "train_loss")
    assert loss_events == [(r["step"], pytest.approx(r["train_loss"])) for r in got]
    ra, rb = (json.loads((w / "results.json").read_text()) for w in (wd, baseline))
    assert [{k: r[k] for k in keys} for r in ra["history"]] == got
    assert ra["test_accuracy"] == rb["test_accuracy"] and ra["test_loss"] == rb["test_loss"]
    assert ra["epochs"] == 3


# ----------------------------------------------------------------------------- kills


def test_kills_sigterm_and_ctrl_c_in_one_workdir_resume_to_the_uninterrupted_run(
    tmp_path, baseline, data
):
    wd = tmp_path / "run"
    faults = [  # (fault, expected exit code): each later run resumes what the earlier left
        ("mid_epoch:1", -9), ("metrics_line:1", -9), ("before_checkpoint:2", -9),
        ("tb_rewrite:0", -9), ("checkpoint_write:2", -9), ("sigterm:2", -15),
        ("sigint:3", 130), ("results:0", -9),
    ]  # fmt: skip
    for fault, code in faults:
        p = _run(wd, data, fault=fault)
        assert p.returncode == code, (fault, p.returncode, p.stderr[-2000:])
        if fault.startswith("checkpoint_write"):
            assert any("orbax-checkpoint-tmp" in d for d in os.listdir(wd / "checkpoints"))
        if fault.startswith("tb_rewrite"):
            assert len(_read_events(str(wd / "tb"))) < 7  # killed with part of the events
        if fault.startswith("sigint"):
            line = _one_line(p, 130)
            assert line == "interrupted at epoch 3 step 2; rerun the same command to resume"
            record("interrupts", "Ctrl-C (SIGINT) during epoch 3", line, 130)
            assert [r["epoch"] for r in _metrics(wd)] == [1, 2]  # nothing of epoch 3 kept
            assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2"]
    assert not (wd / "results.json").exists()
    p = _run(wd, data)
    assert p.returncode == 0, p.stderr[-2000:]
    _same_run(wd, baseline)
    assert not [d for d in os.listdir(wd / "checkpoints") if "tmp" in d]
    again = _run(wd, data)  # a rerun of the finished run changes nothing
    assert again.returncode == 0 and "nothing to do" in again.stdout
    _same_run(wd, baseline)


def test_a_flipped_chunk_without_a_manifest_falls_back_quietly(tmp_path, baseline, data):
    wd = tmp_path / "run"
    shutil.copytree(baseline, wd)
    (wd / "results.json").unlink()
    os.remove(wd / "checkpoints" / "3" / "files.sha256.json")  # killed before the manifest
    chunk = max(glob.glob(str(wd / "checkpoints" / "3" / "state" / "**" / "d" / "*"),
                          recursive=True), key=os.path.getsize)  # fmt: skip
    raw = bytearray(open(chunk, "rb").read())
    raw[100:300] = bytes(b ^ 0xFF for b in raw[100:300])
    open(chunk, "wb").write(bytes(raw))
    p = _run(wd, data)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [s for s in p.stderr.splitlines() if s.strip()]
    assert len(lines) == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith(f"checkpoint {wd}/checkpoints/3 is damaged (")
    assert lines[1].startswith("resuming from the intact checkpoint")
    assert "damaged" not in p.stdout  # notices go to stderr only
    record("checkpoints", "flipped chunk, manifest missing (the run goes on, exit 0)", lines[0], 0)
    _same_run(wd, baseline)


# ----------------------------------------------------------------------------- OS faults


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs to fill during a run (root only); ``None`` where mounting is not allowed:
    the tests then inject ENOSPC the way the writers report it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                        capture_output=True).returncode == 0  # fmt: skip
    yield str(mnt) if ok else None
    if ok:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("where", ["checkpoint", "results"])
def test_no_space_is_one_line_and_the_rerun_resumes(tmp_path, small_fs, baseline, data, where):
    wd = os.path.join(small_fs or str(tmp_path), "run")
    fault = "enospc_checkpoint:2" if where == "checkpoint" else "enospc_results:0"
    line = _one_line(_run(wd, data, fault=fault, small_fs=small_fs))
    target = f"{wd}/checkpoints/2" if where == "checkpoint" else f"{wd}/results.json"
    assert line.startswith(f"error: {target}") and "no space left on device (ENOSPC)" in line
    assert line.endswith("free space or use another --workdir")
    record("operating system", f"disk full while writing {where}", line)
    if small_fs:
        os.remove(os.path.join(small_fs, "ballast"))
    p = _run(wd, data)
    assert p.returncode == 0, p.stderr[-2000:]
    _same_run(type(tmp_path)(wd), baseline)


def test_os_faults_at_the_workdir_are_one_line(tmp_path, data):
    lock_dir = tmp_path / "lockdir"
    (lock_dir / ".lock").mkdir(parents=True)
    deep = str(tmp_path / "/".join(["x" * 200] * 20))  # 4,000+ characters
    cases = {
        "read-only file system": (str(tmp_path / "read-only" / "run"), "read_only:0",
                                  "read-only file system (EROFS); use another --workdir"),
        "`.lock` is a folder": (str(lock_dir), None,
                                "is a directory (EISDIR); a folder stands where a file is"),
        "`--workdir \"\"`": ("", None, "--workdir is empty"),
        "4,000-character workdir": (deep, None, "characters long; the run's files add up to"),
    }  # fmt: skip
    for case, (wd, fault, words) in cases.items():
        p = _run(wd, data, fault=fault)
        line = _one_line(p)
        assert line.startswith("error: ") and words in line, (case, line)
        assert len(line) < 420 and line.rstrip().endswith(("workdir", "it", "records")), line
        record("operating system", case, line)
    assert not os.path.exists(deep)
