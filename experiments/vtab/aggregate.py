"""The VTAB-1K table from sweep records, laid out like the GUFT paper's, references beside ours.

    python -m experiments.vtab.aggregate runs/vtab/records.jsonl [--out runs/vtab/vtab_table.md]

Columns: the 19 tasks (registry order: natural, specialized, structured; test accuracy %, mean
over seeds), the three group means, **19-task mean** (the plain mean of the 19 task numbers) and
**mean of group means** (the mean of the natural / specialized / structured means, the number
most PEFT papers call "mean"), backbone parameters trained, seeds, and the rank-1 count (tasks
on which the row is the best of *our* rows; ties count for each tied row; reference rows have no
per-task numbers to rank). A mean over a group that lacks tasks is shown with ``(k/n)``, the
number of tasks it averages. Reference rows are published VTAB-1K numbers for ViT-B/16
(ImageNet-21k) as the PEFT literature tabulates them (VPT arXiv:2203.12119, SSF arXiv:2210.08823,
GPS arXiv:2312.10136; the GUFT paper reports its natural group only); they are labelled ``[ref]``
and never enter the ranks.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

GROUP_NAMES = ("natural", "specialized", "structured")

# Published rows: (natural, specialized, structured, 19-task mean, mean of group means, params).
REFERENCE = {
    "Full FT": (75.9, 83.4, 47.6, 65.57, 68.97, "85.8M"),
    "Linear": (68.9, 77.2, 26.8, 52.94, 57.64, "0"),
    "BitFit": (73.3, 78.2, 44.1, 62.05, 65.22, "0.10M"),
    "VPT-Deep": (78.5, 82.4, 55.0, 69.43, 71.97, "0.56M"),
    "Adapter": (79.0, 84.1, 58.5, 71.44, 73.86, "0.16M"),
    "LoRA": (79.5, 84.6, 59.8, 72.25, 74.60, "0.29M"),
    "SSF": (81.6, 86.6, 59.0, 73.10, 75.69, "0.21M"),
    "GPS (gradient-selected sparse)": (83.7, 86.8, 61.9, 75.18, 77.47, "0.22M"),
    "GUFT (paper, natural only)": (81.0, None, None, None, None, "~0.29M"),
}
# The GUFT paper's natural-group per-task numbers.
GUFT_PAPER_NATURAL = {
    "cifar100": 72.8,
    "caltech101": 89.6,
    "dtd": 70.9,
    "oxford_flowers102": 99.2,
    "oxford_iiit_pet": 88.7,
    "svhn": 88.5,
    "sun397": 57.0,
}


def task_means(records) -> dict:
    """``{method: {task: (mean %, std %, n seeds)}}``; std with ddof=1 (0 for one seed)."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in records:
        acc[r["method"]][r["task"]].append(100.0 * float(r["test_accuracy"]))
    return {
        m: {
            t: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
            for t, v in ts.items()
        }
        for m, ts in acc.items()
    }


def vtab_table(records, *, method_order=None, with_reference: bool = True) -> dict:
    """The table as data: ``{"tasks", "columns", "rows"}``.

    Each row is a dict: ``method``, ``reference`` (bool), ``tasks`` ({task: mean %}),
    ``natural`` / ``specialized`` / ``structured`` and ``group_counts`` ({group: tasks averaged}),
    ``mean19`` (mean over the tasks present) and ``n_tasks``, ``mean_of_groups`` (over the groups
    present), ``params``, ``seeds`` and ``rank1``.
    """
    from guft_jax.data.vtab import GROUPS

    all_tasks = [t for g in GROUP_NAMES for t in GROUPS[g]]
    means = task_means(records)
    methods = [m for m in (method_order or sorted(means)) if m in means]
    params = {}
    seeds = {}
    for r in records:
        params.setdefault(r["method"], int(r.get("trainable_params", 0)))
        seeds.setdefault(r["method"], set()).add(r["seed"])

    best = {}
    for t in all_tasks:
        vals = [means[m][t][0] for m in methods if t in means[m]]
        if vals:
            best[t] = max(vals)
    rows = []
    for m in methods:
        tasks = {t: means[m][t][0] for t in all_tasks if t in means[m]}
        row = dict(method=m, reference=False, tasks=tasks, group_counts={})
        for g in GROUP_NAMES:
            vals = [tasks[t] for t in GROUPS[g] if t in tasks]
            row[g] = float(np.mean(vals)) if vals else None
            row["group_counts"][g] = len(vals)
        row["mean19"] = float(np.mean(list(tasks.values()))) if tasks else None
        row["n_tasks"] = len(tasks)
        groups = [row[g] for g in GROUP_NAMES if row[g] is not None]
        row["mean_of_groups"] = float(np.mean(groups)) if groups else None
        row["params"] = f"{params[m]:,}"
        row["seeds"] = len(seeds[m])
        row["rank1"] = sum(1 for t, v in tasks.items() if v == best[t])
        rows.append(row)
    if with_reference:
        for name, (nat, spe, stru, m19, mg, p) in REFERENCE.items():
            tasks = GUFT_PAPER_NATURAL if name.startswith("GUFT") else {}
            counts = {g: len(GROUPS[g]) if v is not None else 0
                      for g, v in zip(GROUP_NAMES, (nat, spe, stru), strict=True)}  # fmt: skip
            rows.append(
                dict(
                    method=f"[ref] {name}",
                    reference=True,
                    tasks=dict(tasks),
                    natural=nat,
                    specialized=spe,
                    structured=stru,
                    group_counts=counts,
                    mean19=m19,
                    n_tasks=19 if m19 is not None else len(tasks),
                    mean_of_groups=mg,
                    params=p,
                    seeds=None,
                    rank1=None,
                )
            )
    columns = [
        "method",
        *all_tasks,
        "Natural",
        "Specialized",
        "Structured",
        "19-task mean",
        "mean of group means",
        "params",
        "seeds",
        "rank-1 (of our rows)",
    ]
    return {"tasks": all_tasks, "columns": columns, "rows": rows}


def _fmt(v, count=None, full=None) -> str:
    if v is None:
        return "—"
    s = f"{v:.2f}"
    return s if count is None or count == full else f"{s} ({count}/{full})"


def markdown(table: dict) -> str:
    """Markdown of :func:`vtab_table` (header, separator, one line per row)."""
    from guft_jax.data.vtab import GROUPS

    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    for r in table["rows"]:
        cells = [r["method"]] + [_fmt(r["tasks"].get(t)) for t in table["tasks"]]
        cells += [_fmt(r[g], r["group_counts"][g], len(GROUPS[g])) for g in GROUP_NAMES]
        cells.append(_fmt(r["mean19"], r["n_tasks"], 19))
        n_groups = sum(1 for g in GROUP_NAMES if r[g] is not None)
        cells.append(_fmt(r["mean_of_groups"], n_groups, 3))
        cells += [str(r["params"]), "—" if r["seeds"] is None else str(r["seeds"])]
        cells.append("—" if r["rank1"] is None else str(r["rank1"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", help="records.jsonl written by experiments.vtab.sweep")
    ap.add_argument("--out", default="", help="also write the markdown table here")
    a = ap.parse_args(argv)
    with open(a.records) as f:
        records = [json.loads(line) for line in f if line.strip()]
    text = markdown(vtab_table(records))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
