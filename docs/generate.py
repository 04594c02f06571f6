"""Writes the documentation's generated tables, so that they cannot drift from their sources.

    python docs/generate.py           # rewrite docs/generated/*.md and README.md's methods table
    python docs/generate.py --check   # exit 1 (naming the file) where a generated text is stale

- ``methods.md``: every registered method (``guft_jax.methods``) with the :class:`Info` it was
  registered with, and where it runs: the engine (every registered method), your own loop
  (``guft_jax.peft.<name>``: on any model, or on guft_jax's ViT only) and PyTorch
  (``guft_jax.interop`` exports it to Hugging Face PEFT, where that module exists).
- ``api_methods.md``: the API reference's blocks for every module of ``guft_jax.methods``.
- ``speed_*.md``: the step benchmarks' JSON files in ``benchmarks/results/`` as tables.
- README.md's methods table (between ``<!-- methods:begin -->`` and ``<!-- methods:end -->``):
  the same rows, shorter.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "generated"
BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"


def _exporters() -> set[str]:
    try:
        interop = importlib.import_module("guft_jax.interop")
    except ImportError:
        return set()
    return set(getattr(interop, "CONVERTERS", ()))


def method_rows() -> list[dict]:
    """One dict per registered method, in registry order (the order of the tables)."""
    import guft_jax.peft
    from guft_jax.methods import Info, method_names, spec

    exports = _exporters()
    rows = []
    for name in method_names():
        info = spec(name).info or Info("—", "—", "")  # tests/test_docs.py requires an Info
        rows.append(
            dict(
                name=name,
                family=info.family,
                summary=info.summary.replace("|", "\\|"),  # a table cell: escape its pipes
                paper=info.paper,
                own_loop="ViT only" if name in guft_jax.peft.VIT_ONLY else "any model",
                engine=True,
                pytorch=name in exports,
            )
        )
    return rows


def _paper(paper: str) -> str:
    """An arXiv id as a link, another citation as it is, nothing as a dash."""
    if re.fullmatch(r"\d{4}\.\d{4,5}", paper):
        return f"[arXiv:{paper}](https://arxiv.org/abs/{paper})"
    return paper or "—"


def _yes(flag: bool) -> str:
    return "yes" if flag else "—"


def methods_table(rows: list[dict], *, short: bool = False) -> str:
    if short:
        head = "| method | family | what trains | paper |\n|---|---|---|---|\n"
        body = "".join(
            f"| `{r['name']}` | {r['family']} | {r['summary']} | {_paper(r['paper'])} |\n"
            for r in rows
        )
        return head + body
    head = (
        "| method | family | what trains | paper | engine | own loop | PyTorch (PEFT) |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| `{r['name']}` | {r['family']} | {r['summary']} | {_paper(r['paper'])} | "
        f"{_yes(r['engine'])} | {r['own_loop']} | {_yes(r['pytorch'])} |\n"
        for r in rows
    )
    return head + body


STEP_COLUMNS = (
    ("trainable %", "trainable_pct", "{:.3f}"),
    ("step s", "step_s", "{:.3f}"),
    ("step / full", "step_vs_full", "{:.3f}"),
    ("opt state MB", "opt_state_bytes", "mb"),
    ("opt / full", "opt_state_vs_full", "{:.4f}"),
    ("peak MB", "peak_bytes", "mb"),
    ("peak / full", "peak_vs_full", "{:.3f}"),
    ("MFU", "mfu_vs_matmul", "{:.2f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "—"
    if fmt == "mb":
        return f"{v / 2**20:,.1f}"
    return fmt.format(v)


def step_table(path: pathlib.Path) -> str:
    """A step benchmark's JSON (``benchmarks.step_bench``) as one table per model."""
    d = json.loads(path.read_text())
    m = d.get("machine", {})
    out = [
        f"`{path.relative_to(ROOT)}`: {m.get('device', '?')}, jax {m.get('jax', '?')}, "
        f"{m.get('cpu_count', '?')} CPU cores; arguments `{json.dumps(d.get('args', {}))}`; "
        f"wall {d.get('wall_s', 0):.0f} s.\n"
    ]
    for model, entry in d.get("models", {}).items():
        out.append(f"\n**{model}**\n\n")
        out.append("| method | " + " | ".join(c for c, _, _ in STEP_COLUMNS) + " |\n")
        out.append("|---" * (len(STEP_COLUMNS) + 1) + "|\n")
        for name, row in entry.get("methods", {}).items():
            if "error" in row:
                out.append(f"| {name} | failed: {str(row['error'])[:80]} |\n")
                continue
            cells = " | ".join(_cell(row, k, f) for _, k, f in STEP_COLUMNS)
            out.append(f"| {name} | {cells} |\n")
    return "".join(out)


def method_modules_api() -> str:
    """``automodule`` blocks for the method interface and every module of ``guft_jax.methods``."""
    names = sorted(p.stem for p in (ROOT / "guft_jax" / "methods").glob("*.py"))
    mods = ["guft_jax.methods"] + [f"guft_jax.methods.{n}" for n in names if n != "__init__"]
    # the package re-exports the function `combine` under its module's name: documented there
    opts = {"guft_jax.methods": "   :exclude-members: combine\n"}
    block = "```{{eval-rst}}\n.. automodule:: {}\n   :members:\n{}```\n\n"
    return "".join(block.format(m, opts.get(m, "")) for m in mods)


def flat_api() -> str:
    """The table of ``guft_jax.__all__``: each name and the documented object it re-exports."""
    import guft_jax

    rows = []
    for name in guft_jax.__all__:
        obj = getattr(guft_jax, name)
        if isinstance(obj, type(guft_jax)):
            rows.append(f"| `{name}` | {{py:mod}}`{obj.__name__}` |\n")
            continue
        if hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
            target = f"{{py:obj}}`{obj.__module__}.{obj.__qualname__}`"
        else:  # a constant: the module that defines it
            homes = sorted(
                m
                for m, mod in sys.modules.items()
                if m.startswith("guft_jax.") and getattr(mod, name, None) is obj
            )
            # a name computed on access (``METHODS``) has no defining module
            target = f"a constant of {{py:mod}}`{homes[0]}`" if homes else "computed on access"
        rows.append(f"| `guft_jax.{name}` | {target} |\n")
    return "| name | documented as |\n|---|---|\n" + "".join(rows)


def outputs() -> dict[pathlib.Path, str]:
    rows = method_rows()
    files = {
        OUT / "methods.md": methods_table(rows),
        OUT / "api_methods.md": method_modules_api(),
        OUT / "api_flat.md": flat_api(),
    }
    for name in (
        "step_bench",
        "step_bench_methods",
        "step_bench_methods_new",
        "step_bench_accelerator",
    ):
        src = ROOT / "benchmarks" / "results" / f"{name}.json"
        if src.exists():
            files[OUT / f"speed_{name}.md"] = step_table(src)
    readme = (ROOT / "README.md").read_text()
    if BEGIN in readme and END in readme:
        before, rest = readme.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        table = methods_table(rows, short=True)
        files[ROOT / "README.md"] = f"{before}{BEGIN}\n{table}{END}{after}"
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail where a generated file is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f"stale generated files (run python docs/generate.py): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
