"""Tables and plots from JSON-lines run records (one record per run).

A record holds at least ``task``, ``method``, ``seed``, ``test_accuracy``, ``trainable_params``,
``backbone_params`` and ``step_s``; GUFT-family records may hold ``trained_per_tensor``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable

import numpy as np


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def aggregate(records: Iterable[dict]) -> dict:
    """``{(method, task): {"mean", "std", "n", "params", "pct", "step_s"}}`` over seeds."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[(r["method"], r["task"])].append(r)
    out = {}
    for key, rs in groups.items():
        acc = np.array([r["test_accuracy"] for r in rs], float)
        out[key] = dict(
            mean=float(acc.mean()),
            std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            n=len(acc),
            params=int(rs[0].get("trainable_params", 0)),
            pct=100 * rs[0].get("trainable_params", 0) / max(rs[0].get("backbone_params", 1), 1),
            step_s=float(np.mean([r.get("step_s", np.nan) for r in rs])),
        )
    return out


def markdown_table(records: list[dict], *, method_order: list[str] | None = None) -> str:
    """Accuracy mean ± std per task, mean over tasks, #trainable params, % of backbone, step."""
    agg = aggregate(records)
    tasks = sorted({t for _, t in agg})
    methods = method_order or sorted({m for m, _ in agg})
    methods = [m for m in methods if any((m, t) in agg for t in tasks)]
    head = ["method", *tasks, "mean", "trainable params", "% of backbone", "step s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells, means = [m], []
        for t in tasks:
            a = agg.get((m, t))
            if a is None:
                cells.append("—")
                continue
            means.append(a["mean"])
            cells.append(f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}")
        any_a = next(agg[(m, t)] for t in tasks if (m, t) in agg)
        cells.append(f"{100 * np.mean(means):.2f}" if len(means) == len(tasks) else "—")
        cells.append(f"{any_a['params']:,}")
        cells.append(f"{any_a['pct']:.3f}")
        cells.append("—" if np.isnan(any_a["step_s"]) else f"{any_a['step_s']:.3f}")
        cells.append(str(any_a["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_params(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(records)
    tasks = sorted({t for _, t in agg})
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({m for m, _ in agg}):
        vals = [agg[(m, t)]["mean"] for t in tasks if (m, t) in agg]
        if len(vals) != len(tasks):
            continue
        p = max(next(agg[(m, t)]["params"] for t in tasks), 1)
        ax.scatter([p], [100 * np.mean(vals)], label=m)
        ax.annotate(m, (p, 100 * np.mean(vals)), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (backbone, log scale; linear probe plotted at 1)")
    ax.set_ylabel("mean test accuracy over tasks (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_guft_density(records: list[dict], path: str, method: str = "guft") -> None:
    """Selected-entry density per layer and per module type (mean over GUFT runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guft_jax.masks import module_type

    rs = [r for r in records if r["method"] == method and r.get("trained_per_tensor")]
    if not rs:
        return
    sizes = rs[0].get("tensor_sizes", {})
    by_layer, by_type = defaultdict(float), defaultdict(float)
    size_layer, size_type = defaultdict(float), defaultdict(float)
    for r in rs:
        for key, c in r["trained_per_tensor"].items():
            layer = next((p for p in key.split(".") if p.startswith("encoderblock_")), "other")
            layer = layer.replace("encoderblock_", "block ")
            by_layer[layer] += c
            by_type[module_type(key)] += c
            size_layer[layer] += sizes.get(key, 0)
            size_type[module_type(key)] += sizes.get(key, 0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, num, den, title in (
        (axes[0], by_layer, size_layer, "per layer"),
        (axes[1], by_type, size_type, "per module type"),
    ):
        keys = sorted(num, key=lambda k: (len(k), k))
        dens = [100 * num[k] / den[k] if den.get(k) else 0.0 for k in keys]
        ax.bar(range(len(keys)), dens)
        ax.set_xticks(range(len(keys)), keys, rotation=75, fontsize=7)
        ax.set_ylabel("selected entries (% of the group)")
        ax.set_title(f"GUFT selected-entry density {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
