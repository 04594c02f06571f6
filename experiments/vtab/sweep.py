"""The VTAB-1K sweep: 19 tasks x methods x seeds, resumable, then the aggregated table.

Run everything in this process (one run after another; finished runs are skipped, an
interrupted run resumes from its last epoch checkpoint):

    python -m experiments.vtab.sweep --out runs/vtab --checkpoint /path/ViT-B_16.npz \
        --data_dir /path/tensorflow_datasets --methods full,linear,bitfit,lora,guft --seeds 0,1,2

or print one ``experiments.run`` command per missing run (for a cluster's job queue), then
gather their ``results.json`` files into the records:

    python -m experiments.vtab.sweep --out runs/vtab --checkpoint ... --print_only > jobs.sh
    python -m experiments.vtab.sweep --out runs/vtab --collect

Records (one JSON line per run, with the full config) go to ``OUT/records.jsonl``; the VTAB
table (``experiments.vtab.aggregate``) to ``OUT/vtab_table.md``. Expected cost on one A100-class
GPU: ViT-B/16 at 224 px does ~1,000 img/s fwd+bwd, so a 100-epoch run (100k images + test) is a
few minutes; 19 tasks x 5 methods x 3 seeds is a few GPU-days at most.

``--dry_run`` runs the whole pipeline in seconds without data or weights: tensorflow-datasets'
``mock_data`` (random images with each builder's real features), a tiny random ViT at 16 px,
1 epoch, three tasks (one per group) x two methods (``tests/test_vtab_dry_run.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import time

import numpy as np

from experiments.vtab import aggregate
from experiments.vtab.configs import get_config
from guft_jax.methods import method_names

DRY_TASKS = ("cifar100", "eurosat", "smallnorb_azi")
DRY_METHODS = ("lora", "guft")
DEFAULT_METHODS = ("full", "linear", "bitfit", "lora", "guft")


def parse_list(value: str, allowed, field: str) -> list[str]:
    """Comma-separated names, ``all``, or a VTAB group name (tasks); ValueError names the field."""
    from guft_jax.data.vtab import GROUPS

    if field == "tasks" and value == "all":
        return [t for g in GROUPS.values() for t in g]
    if field == "tasks" and value in GROUPS:
        return list(GROUPS[value])
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"--{field}: {bad or value!r} not allowed; allowed: {sorted(allowed)}")
    return items


def run_dir(out: str, task: str, method: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{task}_{method}_{seed}")


def make_config(task, method, seed, *, dry, checkpoint="", data_dir="", version=""):
    c = get_config(f"{task},{method}" + (",dry" if dry else ""))
    c.seed = int(seed)
    if checkpoint and not dry:
        c.checkpoint = checkpoint
    c.data_dir, c.version = data_dir, version
    return c


def train_one(c, workdir: str) -> dict:
    """One run of a VTAB config: ``experiments.run.run`` (it reads ``data_dir`` / ``version``)."""
    from experiments.configs.common import validate
    from experiments.run import run

    validate(c)
    if not c.checkpoint and c.model == "ViT-B/16":
        raise ValueError("config.checkpoint: the ViT-B/16 in21k .npz path is required")
    return run(c, workdir, log=print if c.progress else (lambda s: None))


def to_record(task: str, method: str, seed: int, res: dict, wall_s: float | None = None) -> dict:
    """A JSON-lines record from ``train.fit``'s results (also read back from results.json)."""
    from guft_jax.data.vtab import TASKS

    hist = res.get("history", [])
    steady = hist[1:] or hist
    bs = res.get("config", {}).get("batch_size", 0)
    rec = dict(
        task=task,
        group=TASKS[task].group,
        method=method,
        seed=int(seed),
        test_accuracy=float(res["test_accuracy"]),
        test_examples=res.get("test_examples"),
        trainable_params=int(res["trainable_params"]),
        backbone_params=int(res["backbone_params"]),
        step_s=float(np.mean([bs / h["images_per_s"] for h in steady])) if steady else None,
        wall_s=float(res.get("wall_seconds", 0.0) if wall_s is None else wall_s),
        config=res.get("config", {}),
    )
    rec["trained_per_tensor"] = res.get("trained_per_tensor", {})
    rec["tensor_sizes"] = res.get("tensor_sizes", {})
    return rec


def read_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def command(c, task, method, seed, out) -> str:
    """The ``experiments.run`` command of one run (data_dir via TFDS_DATA_DIR)."""
    args = [
        "python",
        "-m",
        "experiments.run",
        f"--config=experiments/vtab/configs.py:{task},{method}",
        f"--config.seed={seed}",
        f"--config.checkpoint={c.checkpoint}",
        f"--workdir={run_dir(out, task, method, seed)}",
    ]
    env = f"TFDS_DATA_DIR={shlex.quote(c.data_dir)} " if c.data_dir else ""
    return env + " ".join(shlex.quote(a) for a in args)


@contextlib.contextmanager
def mocked_tfds(num_examples: int = 64):
    """tensorflow-datasets' ``mock_data``: random examples with each builder's real features,
    ``num_examples`` per split; nothing is downloaded or read from disk."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def sweep(
    *,
    out: str,
    tasks,
    methods,
    seeds,
    dry: bool = False,
    checkpoint: str = "",
    data_dir: str = "",
    version: str = "",
    print_only: bool = False,
    collect: bool = False,
    log=print,
) -> list[dict]:
    """Runs (or prints, or collects) the missing runs; returns all records of ``out``."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "records.jsonl")
    done = {(r["task"], r["method"], r["seed"]) for r in read_records(path)}
    jobs = [(t, m, s) for m in methods for t in tasks for s in seeds if (t, m, s) not in done]
    if collect:
        for t, m, s in jobs:
            res_path = os.path.join(run_dir(out, t, m, s), "results.json")
            if os.path.exists(res_path):
                with open(res_path) as f:
                    _append(path, to_record(t, m, s, json.load(f)))
        return read_records(path)
    if print_only:
        for t, m, s in jobs:
            c = make_config(t, m, s, dry=dry, checkpoint=checkpoint, data_dir=data_dir)
            log(command(c, t, m, s, out))
        log(f"python -m experiments.vtab.sweep --out {shlex.quote(out)} --collect")
        return read_records(path)
    log(f"VTAB-1K sweep{' (dry run)' if dry else ''}: {len(jobs)} runs to do in {out}")
    ctx = mocked_tfds() if dry else contextlib.nullcontext()
    with ctx:
        for i, (t, m, s) in enumerate(jobs):
            c = make_config(
                t, m, s, dry=dry, checkpoint=checkpoint, data_dir=data_dir, version=version
            )
            t0 = time.time()
            res = train_one(c, run_dir(out, t, m, s))
            rec = to_record(t, m, s, res, wall_s=time.time() - t0)
            _append(path, rec)
            log(f"[{i + 1}/{len(jobs)}] {t} {m} seed {s}: test {100 * rec['test_accuracy']:.2f}%")
    return read_records(path)


def main(argv=None):
    from guft_jax.data.vtab import TASKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/vtab")
    ap.add_argument("--tasks", default="all", help="all | natural | specialized | structured | a,b")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--checkpoint", default="", help="ViT-B_16.npz (ImageNet-21k, vit_jax)")
    ap.add_argument("--data_dir", default="", help="tfds data_dir with the prepared datasets")
    ap.add_argument("--version", default="", help="tfds version override (one task at a time)")
    ap.add_argument("--print_only", action="store_true", help="print experiments.run commands")
    ap.add_argument("--collect", action="store_true", help="gather runs/*/results.json")
    ap.add_argument("--dry_run", action="store_true", help="mock tfds data, tiny ViT, 1 epoch")
    a = ap.parse_args(argv)
    dry = a.dry_run
    tasks = list(DRY_TASKS) if dry and a.tasks == "all" else parse_list(a.tasks, TASKS, "tasks")
    default_methods = ",".join(DEFAULT_METHODS)
    methods = (
        list(DRY_METHODS)
        if dry and a.methods == default_methods
        else parse_list(a.methods, method_names(), "methods")
    )
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds: {a.seeds!r}; expected comma-separated integers") from None
    if not (dry or a.collect or a.checkpoint):
        raise ValueError("--checkpoint: the ViT-B/16 ImageNet-21k .npz path is required")
    records = sweep(
        out=a.out,
        tasks=tasks,
        methods=methods,
        seeds=seeds,
        dry=dry,
        checkpoint=a.checkpoint,
        data_dir=a.data_dir,
        version=a.version,
        print_only=a.print_only,
        collect=a.collect,
    )
    if a.print_only:
        return
    table = aggregate.markdown(aggregate.vtab_table(records, method_order=methods))
    with open(os.path.join(a.out, "vtab_table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
