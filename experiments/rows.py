"""The offline benchmark's rows and jobs: what one table row trains, and the records of its runs.

A row is a registered method (:class:`EngineRow`), one of its registered variants (an
:class:`EngineRow` with the variant's hyperparameters, see ``register(variants=...)``), or the
pixel baseline (:class:`PixelRow`: logistic regression on raw pixels). A :class:`Job` is one run
of a row: a ``select`` run (train800 -> val200, seed 0) scoring a factor of the row's tuned
hyperparameter, or a ``final`` run (train800val200 -> test) at a seed and the chosen factor.
No method is named here: every row's learning rates, grid, step cost, variants and evaluation
extras come from its method's registration.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import NamedTuple

import numpy as np

from experiments import engine_runs
from experiments.configs.offline import get_config
from experiments.linear_probe import logistic_accuracy, raw_pixels
from experiments.presets import CLAIM_ROWS, DRY_CONFIG, TASKS, diagnosis_rows
from guft_jax.data import get_source
from guft_jax.methods import method_names, spec

KINDS = ("select", "final")
# VTAB-1K's splits: selection trains on train800 and scores val200; final runs train on both.
SPLITS = {"select": ("train800", "val200"), "final": ("train800val200", "test")}


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of a row.

    Attributes:
      kind: ``"select"`` (train800 -> val200, scores a factor) or ``"final"`` (train800val200 ->
        test, the reported run).
      task: the task name (a key of :data:`experiments.presets.TASKS`).
      row: the row name.
      seed: the run's seed (0 for selection runs).
      factor: the factor of the row's tuned hyperparameter over its default (the learning rate
        for engine rows, ``C`` for the pixel baseline).
      val_accuracy: a final run's val200 score of its chosen factor (``None``: not selected).
      extended: a selection run past the edge of the row's grid (:func:`extensions`).
    """

    kind: str
    task: str
    row: str
    seed: int = 0
    factor: float = 1.0
    val_accuracy: float | None = None
    extended: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Job.kind: {self.kind!r} is not allowed; allowed: {list(KINDS)}")

    @property
    def group(self) -> tuple[str, str, str]:
        """``(kind, task, row)``: jobs that may share one packed program."""
        return self.kind, self.task, self.row


def central(grid, max_grid: int) -> tuple[float, ...]:
    """The central ``max_grid`` values of ``grid`` (sorted); all of it when ``max_grid`` is 0."""
    grid = tuple(grid)
    if max_grid and len(grid) > max_grid:
        start = (len(grid) - max_grid) // 2
        return tuple(sorted(grid))[start : start + max_grid]
    return grid


def _source(task: str, seed: int):
    size = TASKS[task].test_size if task in TASKS else 0
    return get_source(task, seed=seed, **({"test_size": size} if size else {}))


@dataclasses.dataclass(frozen=True)
class PixelRow:
    """Logistic regression on raw pixels (grey images as one channel), ``C`` picked on val200.

    Attributes:
      name: the row's name in tables and records.
      grid: the candidate factors of ``C`` (its default is 1).
      key: the selection records' field holding the candidate.
      extend: a best candidate at the grid's edge extends the grid once.
    """

    name: str = "pixels"
    grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    key: str = "C"
    extend: bool = False
    listed: bool = True
    step_cost: float = 0.0  # no training steps
    has_sparse_path: bool = False

    def features(self, task: str, seed: int, split: str, image_size: int):
        """Standardisable raw-pixel features of ``split``: grey images (three equal channels)
        keep one channel, the same classifier after standardisation at a third of the cost."""
        return raw_pixels(_source(task, seed), split, image_size=image_size, normalization="0.5",
                          grey_as_one=True)  # fmt: skip

    def run(self, jobs: list[Job], epochs: int, image_size: int, guft_path: str) -> list[dict]:
        """The records of ``jobs`` (``epochs`` and ``guft_path`` do not apply)."""
        del epochs, guft_path
        return [self._record(j, image_size) for j in jobs]

    def _record(self, job: Job, image_size: int) -> dict:
        t0 = time.time()
        train, test = SPLITS[job.kind]
        xtr, ytr = self.features(job.task, job.seed, train, image_size)
        xte, yte = self.features(job.task, job.seed, test, image_size)
        acc = logistic_accuracy(xtr, ytr, xte, yte, c=job.factor)
        out = dict(task=job.task, method=self.name)
        if job.kind == "select":
            return dict(out, C=job.factor, val_accuracy=acc, wall_s=time.time() - t0)
        return dict(
            out,
            seed=job.seed,
            test_accuracy=acc,
            val_accuracy=job.val_accuracy,
            trainable_params=0,
            backbone_params=1,
            step_s=float("nan"),
            wall_s=time.time() - t0,
            config=dict(
                model="logistic regression on raw pixels", C=job.factor, image_size=image_size
            ),  # fmt: skip
        )


@dataclasses.dataclass(frozen=True)
class EngineRow:
    """A registered method, or one of its registered variants, trained through the engine.

    Attributes:
      name: the row's name (the method's, or the variant's).
      method: the registered method.
      kwargs: the variant's hyperparameters over the method's defaults.
      listed: shown by presets that list every row.
      overrides: ``experiments.run`` config fields set over the offline config (the diagnosis
        dry rows' tiny random ViT).
      dry: the method's registered ``dry_kwargs`` apply under ``kwargs`` (tiny models).
      lr: the variant's registered lr (``None``: the method's); the job's factor applies to it.
    """

    name: str
    method: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    listed: bool = True
    overrides: dict = dataclasses.field(default_factory=dict)
    dry: bool = False
    key: str = "lr_factor"
    extend: bool = True
    lr: float | None = None

    @property
    def grid(self) -> tuple[float, ...]:
        """The candidate lr factors (of the head's lr when the method trains only the head)."""
        return tuple(spec(self.method).defaults.lr_grid)

    @property
    def step_cost(self) -> float:
        """A step's cost relative to full fine-tuning's (the method's registered estimate)."""
        return spec(self.method).defaults.step_cost

    @property
    def has_sparse_path(self) -> bool:
        """The method has a ``sparse`` option (GUFT, the one-shot masks)."""
        return "sparse" in inspect.signature(spec(self.method).factory).parameters

    def config(self, job: Job, *, epochs: int, image_size: int, guft_path: str = "sparse"):
        """The ``experiments.run`` config of ``job``: the method's registered defaults, the
        variant's hyperparameters, the job's seed and splits, its factor on the tuned lr."""
        c = get_config(f"{job.task},{self.method}")
        for k, v in self.overrides.items():
            setattr(c, k, v)
        if self.dry:
            c.method_kwargs.update(spec(self.method).defaults.dry_kwargs or {})
        c.method_kwargs.update(self.kwargs)
        c.seed, c.epochs, c.image_size, c.progress = job.seed, epochs, image_size, False
        if self.lr is not None:
            c.lr = float(self.lr)
        if spec(self.method).defaults.select_head_lr:  # no backbone-side parameters
            c.head_lr = float(c.head_lr * job.factor)
        else:
            c.lr = float(c.lr * job.factor)
        if guft_path == "dense" and self.has_sparse_path:
            c.method_kwargs.sparse = False
        c.test_size = float(TASKS[job.task].test_size if job.task in TASKS else 0)
        c.train_split, c.eval_split = SPLITS[job.kind]
        return c

    def tuned_lr(self, c) -> float:
        """The learning rate the selection tunes in config ``c``."""
        return c.head_lr if spec(self.method).defaults.select_head_lr else c.lr

    def run(self, jobs: list[Job], epochs: int, image_size: int, guft_path: str) -> list[dict]:
        """The records of ``jobs`` (one packed program when there are several)."""
        return engine_runs.run(self, jobs, epochs=epochs, image_size=image_size,
                               guft_path=guft_path)  # fmt: skip


PIXELS = PixelRow()


def table_rows() -> dict[str, PixelRow | EngineRow]:
    """``{name: row}``: the pixel baseline, every registered method, every registered variant
    (live: a method registered after import is included), then the diagnosis presets' rows
    (:func:`experiments.presets.diagnosis_rows`; not listed)."""
    out: dict = {PIXELS.name: PIXELS}
    for m in method_names():
        out[m] = EngineRow(m, m)
    for m in method_names():
        for v, var in spec(m).variants.items():
            out[v] = EngineRow(v, m, dict(var.kwargs), listed=var.listed, lr=var.lr)
    for name, (base, kwargs, dry) in diagnosis_rows().items():
        b = out[base]
        out[name] = EngineRow(name, b.method, {**b.kwargs, **kwargs}, listed=False, lr=b.lr,
                              overrides=dict(DRY_CONFIG) if dry else {}, dry=dry)  # fmt: skip
    return out


def row(name: str) -> PixelRow | EngineRow:
    """The row called ``name``; ValueError listing the rows otherwise."""
    rows = table_rows()
    if name not in rows:
        raise ValueError(f"row: unknown row {name!r}; allowed: {sorted(rows)}")
    return rows[name]


def every_row() -> list[str]:
    """The rows of presets that list every row: :data:`experiments.presets.CLAIM_ROWS` first,
    then every registered method and every listed variant."""
    rows = table_rows()
    claim = [r for r in CLAIM_ROWS if r in rows]
    return claim + [n for n, r in rows.items() if r.listed and n not in claim]


def extensions(selection: list[dict], tasks, rows) -> list[Job]:
    """Selection jobs extending a grid once past the edge its best candidate lies on: the row's
    next grid factor, else the next at the tried grid's own spacing. Rows already extended, and
    rows whose grid is fixed (the pixel baseline's), are left."""
    from experiments import report

    jobs = []
    for t in tasks:
        for name in rows:
            r = row(name)
            rs = [x for x in selection if x["task"] == t and x["method"] == name and r.key in x]
            if not r.extend or len(rs) < 2 or any(x.get("extended") for x in rs):
                continue
            tried, grid = sorted(x[r.key] for x in rs), sorted(r.grid)
            best = report.best_choice(rs)[r.key]
            if best == tried[-1]:
                up = [f for f in grid if f > best]
                nxt = up[0] if up else best * best / tried[-2]
            elif best == tried[0]:
                down = [f for f in grid if f < best]
                nxt = down[-1] if down else best * best / tried[1]
            else:
                continue
            jobs.append(Job("select", t, name, 0, nxt, extended=True))
    return jobs


# ------------------------------------------------------------------------------ sizes preset


class SizeRun(NamedTuple):
    """One run of the sizes preset: a method on a subsample, at its shipped lr or ``"auto"``."""

    dataset: str
    size: int
    method: str
    lr_mode: str
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.size}_{self.method}_{self.lr_mode}_s{self.seed}"


def _pool(dataset: str):
    """``(images, labels)`` of a packaged dataset's training pool."""
    from guft_jax.data import offline

    if dataset == "animal_mnist":
        x, y, _ = offline.animal_mnist_deduped()
        return x, y
    if dataset == "fashion_mnist":
        return offline.read_fashion_mnist()[0]
    raise ValueError(f"dataset: {dataset!r} is not allowed; allowed: animal_mnist, fashion_mnist")


def subsample(dataset: str, size: int, seed: int):
    """A stratified subsample of ``size`` images of the dataset's training pool (the whole pool
    when it is smaller), drawn with ``seed``: ``(images, labels)``."""
    from guft_jax.data.splits import stratified_split

    x, y = _pool(dataset)
    if size >= len(y):
        return x, y
    idx, _ = stratified_split(y, {"train": size, "val": 0}, seed=seed, splits=("train", "val"))
    keep = np.sort(idx["train"])
    return x[keep], y[keep]


def size_runs(p) -> list[SizeRun]:
    """The preset's runs, smallest sizes first (their results come first)."""
    for mode in p.lr_modes:
        if mode not in ("default", "auto"):
            raise ValueError(f"lr_modes: {mode!r} is not allowed; allowed: ['default', 'auto']")
    return [
        SizeRun(d, n, m, mode, s)
        for n in p.sizes
        for d in p.datasets
        for s in p.seeds
        for m in p.methods
        for mode in p.lr_modes
    ]


def size_config(p, run: SizeRun, data_path: str):
    """The ``experiments.run`` config of ``run``: the method's registered defaults on the
    subsample as users' ``npz:`` data; batch size at most the training split (a 30-image set of
    10 classes trains on 17); ``lr="auto"`` for the auto runs."""
    c = get_config(f"npz:{data_path},{run.method}")
    c.model, c.image_size, c.epochs, c.seed, c.progress = (
        p.model, p.image_size, p.epochs, run.seed, False
    )  # fmt: skip
    # the stratified rule moves images to test and val for small classes: ask the split itself
    n_train = get_source(f"npz:{data_path}", seed=run.seed).size("train")
    c.batch_size = min(c.batch_size, n_train)
    c.lr = "auto" if run.lr_mode == "auto" else spec(run.method).defaults.lr
    return c


def size_record(run: SizeRun, n_images: int, res: dict, wall_s: float) -> dict:
    """The record of one sizes run (``records.jsonl``)."""
    hist = res["history"]
    auto = res.get("lr_auto")
    return dict(
        run._asdict(),
        n_images=n_images,
        test_examples=res.get("test_examples"),
        lr=res["train_config"]["lr"],
        head_lr=res["train_config"]["head_lr"],
        lr_auto=auto,
        test_accuracy=res.get("test_accuracy"),
        first_loss=hist[0]["train_loss"],
        last_loss=hist[-1]["train_loss"],
        diverged_at_epoch=res.get("diverged_at_epoch"),
        steps=hist[-1]["step"],
        wall_s=wall_s,
    )


def run_sizes(p, out: str, *, log=print) -> list[dict]:
    """Runs the preset's runs not yet in ``out/records.jsonl`` (one workdir each under
    ``out/runs``, resumable) and appends their records; every record in ``out`` (those of a
    process running the preset's other datasets too)."""
    import json
    import os

    import jax

    from experiments.run import fit_config

    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    path = os.path.join(out, "records.jsonl")
    records = _read_records(path)
    done = {r["name"] for r in records}
    for run in size_runs(p):
        if run.name in done:
            continue
        data = os.path.join(out, "data", f"{run.dataset}_{run.size}_s{run.seed}.npz")
        if not os.path.exists(data):
            x, y = subsample(run.dataset, run.size, run.seed)
            np.savez(data, images=x, labels=y)
        n = len(np.load(data)["labels"])
        t0 = time.time()
        res = fit_config(size_config(p, run, data), os.path.join(out, "runs", run.name),
                         log=lambda s: None).results  # fmt: skip
        # each run compiles its own programs; dropped here they stop piling up in memory over
        # the preset's runs (one process held 9 GB by its 40th run; the disk cache serves reuse)
        jax.clear_caches()
        rec = dict(size_record(run, n, res, time.time() - t0), name=run.name)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
        log(f"{run.name}: test {rec['test_accuracy']:.4f}, loss {rec['first_loss']:.3f} -> "
            f"{rec['last_loss']:.3f}, lr {rec['lr']:g}, {rec['wall_s']:.0f} s")  # fmt: skip
    return _read_records(path)  # with those of a process running the preset's other datasets


def _read_records(path: str) -> list[dict]:
    import json
    import os

    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip()]


def sizes_table(records: list[dict], p) -> str:
    """The sizes table (test accuracy %, default / auto per method, the mean over the seeds run,
    their number in brackets when more than one; ``!`` marks a cell with a run whose last epoch's
    loss is above its first's), the acceptance checks (on the means) and the total wall time."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["dataset"], r["size"], r["method"], r["lr_mode"]), []).append(r)
    by = {
        k: dict(rs[0], test_accuracy=float(np.mean([r["test_accuracy"] for r in rs])),
                n_seeds=len(rs), rising=[r["name"] for r in rs if r["last_loss"] > r["first_loss"]],
                name=rs[0]["name"].rsplit("_s", 1)[0])
        for k, rs in groups.items()
    }  # fmt: skip
    modes = [m for m in ("default", "auto") if m in p.lr_modes]
    head = "| dataset | images | " + " | ".join(f"{m} ({'/'.join(modes)})" for m in p.methods)
    lines = [head + " |", "|" + "---|" * (2 + len(p.methods))]
    rising, below = [], []
    for d in p.datasets:
        for n in p.sizes:
            cells = []
            for m in p.methods:
                parts = []
                for mode in modes:
                    r = by.get((d, n, m, mode))
                    if r is None:
                        parts.append("-")
                        continue
                    rising += r["rising"]
                    seeds = f" ({r['n_seeds']})" if r["n_seeds"] > 1 else ""
                    parts.append(
                        f"{100 * r['test_accuracy']:.1f}{seeds}{'!' if r['rising'] else ''}"
                    )
                    ref = by.get((d, n, p.reference, mode))
                    if n >= 300 and ref and r["test_accuracy"] < ref["test_accuracy"]:
                        below.append(r["name"])
                cells.append(" / ".join(parts))
            lines.append(f"| {d} | {n} | " + " | ".join(cells) + " |")
    wall = sum(r["wall_s"] for r in records)
    lines += [
        "",
        f"Runs whose last epoch's loss is above their first's: {', '.join(rising) or 'none'}.",
        f"Cells below the linear probe ({p.reference}, same lr mode, cell means) "
        f"at >= 300 images: "
        f"{', '.join(below) or 'none'}.",
        f"{len(records)} runs, {wall / 60:.1f} min of training and evaluation wall time.",
    ]
    return "\n".join(lines)


DIAGNOSIS_PRESETS = ("diagnosis", "diagnosis_cpu", "diagnosis_dry")


def main(argv=None) -> None:
    """``python -m experiments.rows --preset sizes|diagnosis [--out DIR]``: the sizes preset, or
    a diagnosis preset (run by ``experiments.offline_benchmark``: val200 lr selection, table)."""
    import argparse
    import os

    from experiments.presets import SIZE_PRESETS

    ap = argparse.ArgumentParser(prog="python -m experiments.rows")
    ap.add_argument("--preset", choices=sorted(SIZE_PRESETS) + list(DIAGNOSIS_PRESETS),
                    default="sizes")  # fmt: skip
    ap.add_argument("--out", default="")
    ap.add_argument("--datasets", default="",
                    help="sizes presets: a subset of the preset's datasets (comma-separated), e.g. "
                         "one process per dataset on one OUT")  # fmt: skip
    ap.add_argument("--sizes", default="", help="sizes presets: a subset of the preset's sizes")
    ap.add_argument("--seeds", default="",
                    help="sizes presets: the seeds to run (default: the preset's); a cell of the "
                         "table is the mean over the seeds run")  # fmt: skip
    a = ap.parse_args(argv)
    if a.preset in DIAGNOSIS_PRESETS:
        from experiments import offline_benchmark

        t0 = time.time()
        offline_benchmark.main(["--preset", a.preset] + (["--out", a.out] if a.out else []))
        print(f"wall time of this call: {(time.time() - t0) / 60:.1f} min")
        return
    from guft_jax import compile_cache

    # the runs of a method share their programs' shapes from 100 images up (batch 50): compiled
    # once, read back by the later sizes and by a process running the other dataset
    compile_cache.enable()
    p = SIZE_PRESETS[a.preset]
    out = a.out or p.out
    for field, cast in (("datasets", str), ("sizes", int)):  # subsets of the preset's
        given, allowed = getattr(a, field), getattr(p, field)
        if given:
            subset = tuple(cast(v) for v in given.split(","))
            bad = [v for v in subset if v not in allowed]
            if bad:
                raise SystemExit(f"--{field}: {bad} not allowed; allowed: {list(allowed)}")
            p = p.replace(**{field: subset})
    if a.seeds:
        p = p.replace(seeds=tuple(int(s) for s in a.seeds.split(",")))
    t0 = time.time()
    records = run_sizes(p, out)
    table = sizes_table(records, SIZE_PRESETS[a.preset])  # every dataset of the preset
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wall time of this call: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
