"""The CLI end to end: real data (scikit-learn's digits) and users' own data, tiny ViT; files,
resume, one-line errors, the workdir lock, the config fingerprint (faults: tests/test_faults.py)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fault_rows import record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every subprocess shares one compilation cache, so only the first run of a shape compiles.
CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"guft_jax_test_cli_cache_{os.getuid()}")
SMALL = ("--config.image_size=8", "--config.batch_size=8")


def _env(**extra):
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        **extra,
    )


def _run(workdir, *overrides, arg="digits,lora", env=None, prefix=("-m", "experiments.run")):
    cmd = [
        sys.executable,
        *prefix,
        f"--config=experiments/configs/tiny.py:{arg}",
        f"--workdir={workdir}",
        *overrides,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env=env or _env(), timeout=600
    )


def _error_line(p):
    """The CLI's error: exit code 2, stderr ends in one ``error: ...`` line, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    lines = [s for s in p.stderr.splitlines() if s.strip()]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1].startswith("error: "), p.stderr[-3000:]
    assert sum(s.startswith("error: ") for s in lines) == 1
    return lines[-1]


def _write_npz(path, n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = np.arange(1, k + 1, dtype=np.float64)  # imbalanced classes
    y = np.searchsorted(np.cumsum(w) / w.sum() * n, np.arange(n), side="right")
    x = rng.integers(0, 50, (n, 4, 4, 3)) + (200 // k) * y[:, None, None, None]
    np.savez(path, images=x.astype(np.uint8), labels=y)
    return y


def _write_folder(root, n, k, seed=0):
    from PIL import Image

    y = _write_npz(os.path.join(os.path.dirname(root), "tmp.npz"), n, k, seed)
    x = np.load(os.path.join(os.path.dirname(root), "tmp.npz"))["images"]
    for i, (im, lab) in enumerate(zip(x, y, strict=True)):
        os.makedirs(os.path.join(root, f"c{lab}"), exist_ok=True)
        Image.fromarray(im).save(os.path.join(root, f"c{lab}", f"{i}.png"))
    return y


def _leaves(workdir, step):
    """The saved train state of a step as {path: numpy array} (read without a target)."""
    from guft_jax import checkpoint as ckpt

    mgr = ckpt.manager(os.path.join(workdir, "checkpoints"))
    import orbax.checkpoint as ocp

    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    import jax

    flat = jax.tree_util.tree_flatten_with_path(out["state"])[0]
    mgr.close()
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(s) for s in f.read().splitlines()]


# ----------------------------------------------------------------------------- digits (real data)


def test_cli_writes_metrics_checkpoints_results_and_resumes(tmp_path):
    wd = tmp_path / "run"
    p = _run(wd, "--config.stop_after_epoch=1", "--config.image_size=8")
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(os.listdir(wd / "checkpoints")) == ["1"]
    assert not (wd / "results.json").exists()
    p = _run(wd, "--config.epochs=3", "--config.image_size=8")  # resumes; epochs may change
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed" in p.stdout + p.stderr
    assert [r["epoch"] for r in _metrics(wd)] == [1, 2, 3]
    res = json.loads((wd / "results.json").read_text())
    assert res["config"]["method"] == "lora" and res["config"]["dataset"] == "digits"
    assert res["trainable_params"] > 0 and res["epochs_changed_on_resume"] == [2, 3]
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["test_examples"] == 797
    assert res["data"]["split_sizes"] == {"train800": 800, "val200": 200, "test": 797}
    assert res["data"]["class_names"] == [str(i) for i in range(10)]
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
    line = _error_line(_run(tmp_path / "bad", override))
    assert field in line and ("allowed" in line.lower() or "matches no" in line)
    record("config", f"`{override}`", line)


# ----------------------------------------------------------------------------- users' data


@pytest.mark.parametrize(
    "n,form,sizes",
    [(30, "npz", [21, 3, 6]), (120, "folder", [84, 12, 24]), (300, "npz", [210, 30, 60]),
     (999, "folder", [699, 100, 200])],
)  # fmt: skip
def test_user_datasets_of_any_size_train_with_the_documented_split(tmp_path, n, form, sizes):
    k = 3 if n < 100 else 5
    extra = []
    if form == "npz":
        _write_npz(tmp_path / "d.npz", n, k)
        dataset = f"npz:{tmp_path / 'd.npz'}"
    else:
        root = tmp_path / "f"
        _write_folder(str(root), n, k)
        dataset = f"folder:{root}"
        if n == 120:  # an unreadable image skipped and a text file ignored, both counted
            (root / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
            (root / "c0" / "notes.txt").write_text("ignored")
            extra = ["--config.skip_bad=True"]
    wd = tmp_path / "run"
    p = _run(wd, f"--config.dataset={dataset}", "--config.epochs=1", *SMALL, *extra,
             arg="digits,linear")  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((wd / "results.json").read_text())
    d = res["data"]
    assert list(d["split_sizes"].values()) == sizes and "70/10/20" in d["split_rule"]
    assert res["test_examples"] == sizes[2] and d["num_classes"] == k
    assert len(d["class_names"]) == k and (form == "npz" or d["class_names"][0] == "c0")
    assert f"train {sizes[0]} / val {sizes[1]} / test {sizes[2]}" in p.stdout + p.stderr
    if extra:
        assert d["skipped_files"] == 1 and d["ignored_files"] == 1
        assert any("skipped 1 unreadable images" in s for s in d["notes"])


def _bad_inputs(tmp):
    """``{name: (dataset string, path the message must name, problem words)}``."""
    good = os.path.join(tmp, "good.npz")
    _write_npz(good, 20, 2)
    raw = open(good, "rb").read()
    out = {}

    def write(name, data):
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    p = write("half.npz", raw[: len(raw) // 2])
    out["npz cut in half"] = (f"npz:{p}", p, "truncated or corrupt")
    p = os.path.join(tmp, "arr.npy")
    np.save(p, np.zeros((3, 4, 4), np.uint8))
    out[".npy given as npz"] = (f"npz:{p}", p, "is a .npy file")
    p = write("labels.csv", b"image,label\n1,2\n")
    out["text file"] = (f"npz:{p}", p, "not an .npz archive (a text file)")
    p = os.path.join(tmp, "missing.npz")
    out["missing file"] = (f"npz:{p}", p, "not found")
    p = os.path.join(tmp, "nan.npz")
    np.savez(p, images=np.full((4, 4, 4), np.nan, np.float32), labels=np.arange(4) % 2)
    out["NaN pixels"] = (f"npz:{p}", p, "NaN/Inf")
    root = os.path.join(tmp, "pets")
    _write_folder(root, 12, 2)
    bad = os.path.join(root, "c1", "broken.png")
    write(os.path.join("pets", "c1", "broken.png"), b"\x89PNG\r\n\x1a\nnot really")
    out["corrupt png"] = (f"folder:{root}", bad, "unreadable image")
    empty = os.path.join(tmp, "empty")
    os.makedirs(os.path.join(empty, "cat"))
    os.makedirs(os.path.join(empty, "dog"))
    out["empty class folder"] = (f"folder:{empty}", os.path.join(empty, "cat"), "holds no images")
    return out


def test_bad_inputs_give_one_line_naming_the_path(tmp_path):
    report = []
    for name, (dataset, path, problem) in _bad_inputs(str(tmp_path)).items():
        p = _run(tmp_path / "w", f"--config.dataset={dataset}", arg="digits,linear")
        line = _error_line(p)
        assert path in line and problem in line, (name, line)
        record("data files", f"CLI: {name}", line)
        report.append(f"| {name} | `{line.replace(str(tmp_path) + '/', '')}` |")
    print("\n".join(report))
    p = _run(tmp_path / "w", f"--config.dataset={dataset}", "--debug", arg="digits,linear")
    assert p.returncode != 0 and "Traceback" in p.stderr  # --debug shows it


# ----------------------------------------------------------------------------- run directories

RUN = ("--config.epochs=3", *SMALL)


@pytest.fixture(scope="module")
def data30(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d30.npz"
    _write_npz(path, 30, 3)
    return f"--config.dataset=npz:{path}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data30):
    """An uninterrupted 3-epoch LoRA run on 30 images (3 steps per epoch)."""
    wd = tmp_path_factory.mktemp("baseline") / "run"
    p = _run(wd, data30, *RUN)
    assert p.returncode == 0, p.stderr[-2000:]
    return wd


def _copy(baseline, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(baseline, wd)
    return wd


def _same_run(wd, baseline):
    """Final params bitwise equal, each epoch logged once with the same losses, same results."""
    a, b = _leaves(str(wd), 3), _leaves(str(baseline), 3)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    strip = [{k: r[k] for k in ("epoch", "step", "train_loss")} for r in _metrics(wd)]
    assert strip == [{k: r[k] for k in ("epoch", "step", "train_loss")} for r in _metrics(baseline)]
    ra, rb = (json.loads((w / "results.json").read_text()) for w in (wd, baseline))
    assert ra["test_accuracy"] == rb["test_accuracy"] and ra["test_loss"] == rb["test_loss"]


def test_a_second_process_on_a_locked_workdir_fails_at_once(tmp_path, data30):
    from guft_jax import rundir

    wd = tmp_path / "run"
    lock = rundir.acquire_lock(str(wd))
    try:
        p = _run(wd, data30, *RUN)
        line = _error_line(p)
    finally:
        rundir.release_lock(lock)
    assert f"workdir {wd} is in use by process {os.getpid()}" in line
    record("run directory", "workdir in use by another process", line)
    # it fails before any data or model work: no data summary, no trainable report, no files
    out = p.stdout + p.stderr
    assert "trainable:" not in out and "split" not in out.replace(line, "")
    assert not (wd / "metrics.jsonl").exists() and not (wd / "checkpoints").exists()


def test_resume_with_another_config_is_refused_unless_fresh(tmp_path, baseline, data30):
    wd = _copy(baseline, tmp_path)
    before = (wd / "metrics.jsonl").read_text(), (wd / "results.json").read_text()
    line = _error_line(_run(wd, data30, *RUN, "--config.lr=0.5", "--config.seed=3"))
    assert "lr: 0.01 -> 0.5" in line and "seed: 0 -> 3" in line and "--fresh" in line
    record("run directory", "resume with another lr and seed", line)
    line = _error_line(_run(wd, data30, *RUN, arg="digits,bitfit"))
    record("run directory", "resume with another method", line)
    assert line == f"error: checkpoint {wd}/checkpoints/3 holds a lora run, not bitfit; use " \
        "another workdir or start over (--fresh)"  # fmt: skip
    assert ((wd / "metrics.jsonl").read_text(), (wd / "results.json").read_text()) == before
    p = _run(wd, data30, *RUN, "--config.lr=0.5", "--fresh")
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["epoch"] for r in _metrics(wd)] == [1, 2, 3]
    assert json.loads((wd / "results.json").read_text())["config"]["lr"] == 0.5


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, baseline, data30):
    wd = _copy(baseline, tmp_path)
    chunk = max(glob.glob(str(wd / "checkpoints" / "3" / "state" / "**" / "d" / "*"),
                          recursive=True), key=os.path.getsize)  # fmt: skip
    data = bytearray(open(chunk, "rb").read())
    data[100:300] = bytes(b ^ 0xFF for b in data[100:300])  # 200 bytes flipped
    open(chunk, "wb").write(bytes(data))
    p = _run(wd, data30, *RUN)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    rel = os.path.relpath(chunk, wd / "checkpoints" / "3")
    assert f"checkpoint {wd}/checkpoints/3 is damaged (file {rel} fails its SHA-256 check)" in out
    assert "resuming from the intact checkpoint" in out and "Traceback" not in out
    notice = next(s for s in p.stderr.splitlines() if "is damaged" in s)
    record("checkpoints", "flipped chunk in the newest step (the run goes on, exit 0)", notice, 0)
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "3", "3.damaged"]
    _same_run(wd, baseline)


# kill -9 at each state of a run, SIGTERM, Ctrl-C and the OS faults: tests/test_faults.py (the
# five kill points that were here run there too, in one workdir, with more).
