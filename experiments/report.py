"""Tables and plots from JSON-lines run records (one record per run).

A record holds at least ``task``, ``method``, ``seed``, ``test_accuracy``, ``trainable_params``,
``backbone_params`` and ``step_s``; optionally ``val_accuracy`` (the val200 score of the chosen
hyperparameters), ``peak_bytes`` (XLA's peak-memory estimate of the compiled train step), for
GUFT-family runs ``trained_per_tensor`` / ``tensor_sizes`` (selected entries and sizes per
``.``-joined param path), and for DyLoRA runs ``rank_accuracy`` / ``rank_params`` (the one run
evaluated at lower ranks by truncation, keyed by the rank as a string), shown as rows
``dylora@r{b}``.

    python -m experiments.report results/offline   # rewrites table.md and the PNGs from records

Every record also carries ``preset`` (the benchmark preset that ran it), which orders the rows.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from experiments import cli
from experiments.presets import QUESTIONS, REFERENCE_ROW


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rank_rows(records: Iterable[dict]) -> list[dict]:
    """Derived records ``{method}@r{b}`` of runs that carry ``rank_accuracy``: the same run
    scored at rank ``b`` by truncation (its trainable count is the truncated adapter's; it has
    no step time or peak of its own: it was never trained on its own)."""
    out = []
    for r in records:
        for b, acc in sorted((r.get("rank_accuracy") or {}).items(), key=lambda kv: int(kv[0])):
            out.append(
                dict(
                    task=r["task"],
                    method=f"{r['method']}@r{b}",
                    seed=r.get("seed"),
                    test_accuracy=acc,
                    trainable_params=(r.get("rank_params") or {}).get(b, 0),
                    backbone_params=r.get("backbone_params", 1),
                    step_s=float("nan"),
                    truncated_from=r["method"],
                )
            )
    return out


def with_rank_rows(records: list[dict], order: list[str] | None = None):
    """``(records + rank_rows(records), order)`` with each derived row placed right after its
    run's row in ``order`` (if given)."""
    extra = rank_rows(records)
    if order is None:
        return list(records) + extra, None
    order = list(order)
    for r in extra:
        if r["method"] in order:
            continue
        parent = r["truncated_from"]
        derived = [m for m in order if m.startswith(f"{parent}@r")]
        at = order.index(derived[-1] if derived else parent) + 1 if parent in order else len(order)
        order.insert(at, r["method"])
    return list(records) + extra, order


def aggregate(records: Iterable[dict]) -> dict:
    """``{(method, task): {"mean", "std", "n", "params", "pct", "step_s", "peak_bytes"}}`` over
    seeds (``peak_bytes``: the mean over the runs that have it, else ``None``)."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[(r["method"], r["task"])].append(r)
    out = {}
    for key, rs in groups.items():
        acc = np.array([r["test_accuracy"] for r in rs], float)
        peaks = [r["peak_bytes"] for r in rs if r.get("peak_bytes")]
        out[key] = dict(
            mean=float(acc.mean()),
            std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            n=len(acc),
            params=int(rs[0].get("trainable_params", 0)),
            pct=100 * rs[0].get("trainable_params", 0) / max(rs[0].get("backbone_params", 1), 1),
            step_s=float(np.mean([r.get("step_s", np.nan) for r in rs])),
            peak_bytes=float(np.mean(peaks)) if peaks else None,
        )
    return out


def best_choice(candidates: list[dict]) -> dict:
    """The selection record with the best val200 accuracy; ties go to the candidate nearest the
    default (``lr_factor`` or ``C`` closest to 1 in log scale), so the rule never reads test."""
    key = "C" if "C" in candidates[0] else "lr_factor"
    return max(candidates, key=lambda r: (r["val_accuracy"], -abs(math.log(r[key]))))


def selection_table(selection: list[dict]) -> str:
    """Val200 accuracy of every candidate hyperparameter per (task, method) and the chosen one.

    Selection records hold ``task``, ``method``, ``val_accuracy`` and ``lr_factor`` (with ``lr``)
    or ``C`` (the raw-pixel logistic regression).
    """
    groups: dict = defaultdict(list)
    for r in selection:
        groups[(r["task"], r["method"])].append(r)
    lines = [
        "Hyperparameters chosen on val200 (train800 -> val200, seed 0; never on test):",
        "",
        "| task | method | candidates: val200 accuracy | chosen |",
        "|---|---|---|---|",
    ]
    for (task, method), rs in sorted(groups.items()):
        key = "C" if "C" in rs[0] else "lr"
        rs = sorted(rs, key=lambda r: r[key])
        best = best_choice(rs)
        cells = ", ".join(f"{key}={r[key]:.3g}: {100 * r['val_accuracy']:.1f}" for r in rs)
        lines.append(f"| {task} | {method} | {cells} | {key}={best[key]:.3g} |")
    return "\n".join(lines)


def comparison(records: list[dict], method: str, others: list[str]) -> list[str]:
    """Plain sentences: is ``method``'s mean test accuracy over seeds >= each other's, per task."""
    agg = aggregate(records)
    tasks = sorted({t for _, t in agg})
    lines = []
    for o in others:
        for t in tasks:
            if (method, t) not in agg or (o, t) not in agg:
                continue
            a, b = agg[(method, t)], agg[(o, t)]
            verdict = ">=" if a["mean"] >= b["mean"] else "<"
            lines.append(
                f"{t}: {method} {100 * a['mean']:.2f} (n={a['n']}) {verdict} {o} "
                f"{100 * b['mean']:.2f} (n={b['n']}): {'yes' if verdict == '>=' else 'no'}"
            )
    return lines


def budget_verdicts(records: list[dict], method: str, others: list[str]) -> list[str]:
    """Per task: is ``method`` >= each other row in mean test accuracy *at no larger budget*
    (trainable params, from the records)? The sentence states both figures and both budgets."""
    agg = aggregate(records)
    out = []
    for o in others:
        for t in sorted({t for _, t in agg}):
            if (method, t) not in agg or (o, t) not in agg:
                continue
            a, b = agg[(method, t)], agg[(o, t)]
            ok_acc, ok_budget = a["mean"] >= b["mean"], a["pct"] <= b["pct"]
            out.append(
                f"{t}: {method} {100 * a['mean']:.2f} at {a['pct']:.3f}% vs {o} "
                f"{100 * b['mean']:.2f} at {b['pct']:.3f}% of the backbone: "
                + ("yes" if ok_acc and ok_budget else "no")
                + ("" if ok_budget else " (larger budget)")
            )
    return out


def extended_grids(selection: list[dict]) -> list[str]:
    """The (task, row) whose lr grid was extended past an edge, and the factor added."""
    return [
        f"{r['task']} / {r['method']}: grid extended to x{r['lr_factor']:g} "
        f"(val200 {100 * r['val_accuracy']:.1f})"
        for r in selection
        if r.get("extended")
    ]


def _layer_of(key: str) -> str:
    layer = next(
        (p for p in key.replace("/", ".").split(".") if p.startswith("encoderblock_")), None
    )
    return "other" if layer is None else layer.replace("encoderblock_", "block ")


def guft_density(records: list[dict], method: str) -> tuple[dict, dict]:
    """Selected-entry density (fraction) per layer and per module type, pooled over the runs.

    Returns:
      ``(by_layer, by_type)``: ``{group: selected entries / entries}`` summed over every run of
      ``method`` that carries ``trained_per_tensor`` and ``tensor_sizes``.
    """
    from guft_jax.masks import module_type

    num = {"layer": defaultdict(float), "type": defaultdict(float)}
    den = {"layer": defaultdict(float), "type": defaultdict(float)}
    for r in records:
        if r["method"] != method or not r.get("trained_per_tensor"):
            continue
        sizes = r.get("tensor_sizes", {})
        for key, c in r["trained_per_tensor"].items():
            for kind, group in (("layer", _layer_of(key)), ("type", module_type(key))):
                num[kind][group] += c
                den[kind][group] += sizes.get(key, 0)
    out = tuple({g: num[k][g] / den[k][g] for g in num[k] if den[k][g]} for k in ("layer", "type"))
    return out


def _has_mask(method: str | None) -> bool:
    """The registered ``method`` selects entries with a mask (its factory takes ``eligible``)."""
    import inspect

    from guft_jax.methods import method_names, spec

    if method not in method_names():
        return False
    return "eligible" in inspect.signature(spec(method).factory).parameters


def mask_rows(records: list[dict]) -> list[str]:
    """Rows whose runs select entries with a mask (GUFT, its variants, one-shot masks): their
    registered method takes an ``eligible`` preset."""
    out = []
    for r in records:
        if r["method"] not in out and _has_mask((r.get("config") or {}).get("method")):
            out.append(r["method"])
    return out


def density_table(records: list[dict], methods: list[str] | None = None) -> str:
    """Markdown: selected-entry density per module type of every mask row (``""`` if none), one
    column per row (eligibility / allocation variant)."""
    methods = methods or mask_rows(records)
    cols = {m: guft_density(records, m)[1] for m in methods}
    cols = {m: d for m, d in cols.items() if d}
    if not cols:
        return ""
    types = sorted({t for d in cols.values() for t in d}, key=lambda t: -max(
        d.get(t, 0.0) for d in cols.values()))  # fmt: skip
    lines = [
        "Selected entries per module type (% of that type's entries, pooled over runs):",
        "",
        "| module type | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for t in types:
        cells = [f"{100 * d[t]:.3f}" if t in d else "—" for d in cols.values()]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(records: list[dict], *, method_order: list[str] | None = None) -> str:
    """Accuracy mean ± std per task, mean over tasks, #trainable params, % of backbone, step.

    ``step s`` is the run's wall time per training step after the first epoch (the run's own
    measurement, on whatever else the machine ran); ``step / full`` (when a ``full`` row exists)
    divides it by full fine-tuning's on the same task; ``peak MB`` (when records carry
    ``peak_bytes``) is XLA's estimate for the compiled step. Runs with ``rank_accuracy`` add
    rows ``{method}@r{b}`` after theirs (:func:`rank_rows`).
    """
    records, method_order = with_rank_rows(records, method_order)
    agg = aggregate(records)
    tasks = sorted({t for _, t in agg})
    methods = method_order or sorted({m for m, _ in agg})
    methods = [m for m in methods if any((m, t) in agg for t in tasks)]
    has_full = any((REFERENCE_ROW, t) in agg for t in tasks)
    has_peak = any(a["peak_bytes"] for a in agg.values())
    head = ["method", *tasks, "mean", "trainable params", "% of backbone", "step s"]
    head += ["step / full"] * has_full + ["peak MB"] * has_peak + ["seeds"]
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
        t0 = next(t for t in tasks if (m, t) in agg)
        any_a = agg[(m, t0)]
        cells.append(f"{100 * np.mean(means):.2f}" if len(means) == len(tasks) else "—")
        cells.append(f"{any_a['params']:,}")
        cells.append(f"{any_a['pct']:.3f}")
        cells.append("—" if np.isnan(any_a["step_s"]) else f"{any_a['step_s']:.3f}")
        if has_full:
            ref = agg.get((REFERENCE_ROW, t0))
            full_s = ref["step_s"] if ref else np.nan
            ratio = any_a["step_s"] / full_s
            cells.append("—" if np.isnan(ratio) else f"{ratio:.2f}")
        if has_peak:
            peak = any_a["peak_bytes"]
            cells.append("—" if not peak else f"{peak / 2**20:,.0f}")
        cells.append(str(any_a["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_params(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(records + rank_rows(records))
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


def plot_guft_density(records: list[dict], path: str, methods: list[str] | None = None) -> None:
    """Selected-entry density per layer and per module type, one bar series per mask row (so the
    eligibility / allocation variants show where their budgets went)."""
    methods = methods or mask_rows(records)
    dens = {m: guft_density(records, m) for m in methods}
    dens = {m: d for m, d in dens.items() if d[0]}
    if not dens:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(dens)
    for ax, idx, title in ((axes[0], 0, "per layer"), (axes[1], 1, "per module type")):
        keys = sorted({k for d in dens.values() for k in d[idx]}, key=lambda k: (len(k), k))
        for j, (m, d) in enumerate(dens.items()):
            xs = [i + j * width for i in range(len(keys))]
            ax.bar(xs, [100 * d[idx].get(k, 0.0) for k in keys], width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, rotation=75,
                      fontsize=7)  # fmt: skip
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylabel("selected entries (% of the group)")
        ax.set_title(f"selected-entry density {title}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def answers(records: list[dict], questions) -> list[str]:
    """One paragraph per question (``row``, ``others``, ``title``, ``budget``) whose rows ran:
    the title, then a sentence per task (:func:`budget_verdicts` or :func:`comparison`)."""
    out = []
    for q in questions:
        verdicts = budget_verdicts if q.budget else comparison
        lines = verdicts(records, q.row, list(q.others))
        if lines:
            out.append(q.title.format(row=q.row) + "\n\n" + "\n".join(f"- {x}" for x in lines))
    return out


def table_notes(records: list[dict]) -> str:
    """The notes under the table: what the timing and memory columns measure, and what each
    row of a rank-truncated run is."""
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


def write_tables(out, records, selection, *, order=None, questions=()) -> str:
    """Writes ``out/table.md`` (the table, the selection table, extended grids, the answers to
    ``questions``, the mask rows' densities, notes) and the two PNGs; returns the table."""
    import os

    table = markdown_table(records, method_order=order)
    parts = [table]
    if selection:
        parts.append(selection_table(selection))
    ext = extended_grids(selection)
    if ext:
        parts.append("Learning-rate grids extended once (best val200 at an edge):\n\n"
                     + "\n".join(f"- {x}" for x in ext))  # fmt: skip
    parts += answers(records, questions)
    dens = density_table(records)
    if dens:
        parts.append(dens)
    parts.append(table_notes(records))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n\n".join(parts) + "\n")
    plot_accuracy_vs_params(records, os.path.join(out, "accuracy_vs_params.png"))
    plot_guft_density(records, os.path.join(out, "guft_density.png"))
    return table


def _order(records: list[dict]) -> list[str]:
    """The rows in their preset's order (the records' ``preset``), else as they first appear."""
    from experiments.presets import PRESETS

    seen = list(dict.fromkeys(r["method"] for r in records))
    preset = PRESETS.get(next((r["preset"] for r in records if r.get("preset")), ""))
    if preset is None:
        return seen
    if preset.rows is None:
        from experiments.rows import every_row

        rows = every_row()
    else:
        rows = list(preset.rows)
    return [m for m in rows if m in seen] + [m for m in seen if m not in rows]


def main(argv: list[str]):
    """``python -m experiments.report OUT``: rewrites ``OUT/table.md`` and the PNGs from
    ``OUT/records.jsonl`` (and ``OUT/selection.jsonl`` when there is one)."""
    import os

    about = __doc__.splitlines()[0]
    _, args = cli.parse(lambda fv: None, argv, prog="experiments.report", about=about)
    if len(args) != 1:
        raise ValueError(f"experiments.report: expected one folder (OUT), got {args}")
    out = args[0]
    records = read_jsonl(os.path.join(out, "records.jsonl"))
    sel = os.path.join(out, "selection.jsonl")
    selection = read_jsonl(sel) if os.path.exists(sel) else []
    write_tables(out, records, selection, order=_order(records), questions=QUESTIONS)
    with open(os.path.join(out, "table.md")) as f:
        print(f.read())


if __name__ == "__main__":
    cli.run_main(main)
