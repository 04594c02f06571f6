"""The documentation site: it builds with zero warnings, its generated tables match their sources,
every public name is in the API reference, and its Python examples run as printed."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _generate():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``python docs/generate.py`` then ``sphinx-build -W`` into a temporary folder (as
    ``make docs`` does); returns the HTML folder."""
    gen = _generate()
    assert gen.main([]) == 0
    out = tmp_path_factory.mktemp("html")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html"]
    r = subprocess.run([*cmd, str(DOCS), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "WARNING" not in r.stderr and "ERROR" not in r.stderr, r.stderr[-4000:]
    return out


def _inventory(html: pathlib.Path) -> set[str]:
    from sphinx.util.inventory import InventoryFile

    with open(html / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", lambda a, b: b)
    return {name for kind, entries in inv.items() if kind.startswith("py:") for name in entries}


def test_every_public_name_is_in_the_api_reference(built):
    import guft_jax
    import guft_jax.peft
    import guft_jax.transforms

    documented = _inventory(built)
    missing = []
    for mod in (guft_jax, guft_jax.peft, guft_jax.transforms):
        names = getattr(mod, "__all__", None) or [
            n
            for n, v in vars(mod).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == mod.__name__
        ]
        for n in names:
            obj = getattr(mod, n)
            if isinstance(obj, type(guft_jax)):
                key = obj.__name__
            elif hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
                key = f"{obj.__module__}.{obj.__qualname__}"
            else:
                continue  # constants (``CONFIGS``, ``SPLITS``) are listed on the flat page
            if key not in documented:
                missing.append(f"{mod.__name__}.{n} ({key})")
    assert not missing, missing


def test_the_methods_table_lists_exactly_the_registered_methods(built):
    from guft_jax.methods import method_names

    table = (DOCS / "generated" / "methods.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|", table, flags=re.M)
    assert rows == list(method_names())
    page = (built / "methods" / "index.html").read_text()
    code = '<code class="docutils literal notranslate"><span class="pre">{}</span>'
    assert all(code.format(n) in page for n in method_names())


def test_every_registered_method_has_its_info():
    from guft_jax.methods import FAMILIES, method_names, spec

    bad = [n for n in method_names() if spec(n).info is None]
    assert not bad, f"registered without info=Info(family, summary, paper): {bad}"
    assert {spec(n).info.family for n in method_names()} <= set(FAMILIES)


def test_readme_methods_table_is_fresh_and_the_front_page_short():
    gen = _generate()
    readme = (ROOT / "README.md").read_text()
    assert gen.outputs()[ROOT / "README.md"] == readme, "run: python docs/generate.py"
    assert len(readme.splitlines()) <= 200


def test_no_narration_or_issue_numbers_in_the_docs():
    pages = [ROOT / "README.md", *DOCS.rglob("*.md")]
    pages = [p for p in pages if "_build" not in p.parts]
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in pages
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"issue [0-9]|this version", line, flags=re.I)
    ]
    assert not hits, hits


def test_no_docstring_cites_a_file_outside_the_repository():
    hits = []
    dirs = ("guft_jax", "experiments", "benchmarks", "tests", "tools")
    for p in [q for d in dirs for q in ROOT.glob(f"{d}/**/*.py") if q.name != "test_docs.py"]:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"(SPEC|STYLE)\.md|SPEC §|seed paper \d|\.\./shared", line):
                hits.append(f"{p.relative_to(ROOT)}:{i}")
    assert not hits, hits


def _python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


EXAMPLES = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_build" not in p.parts)


@pytest.mark.parametrize("page", [p for p in EXAMPLES if _python_blocks(DOCS / p)])
def test_the_docs_python_examples_run_as_printed(page):
    path = DOCS / page
    ns: dict = {"__name__": f"docs_{path.stem}"}
    for i, block in enumerate(_python_blocks(path)):
        exec(compile(block, f"{page}:block{i}", "exec"), ns)
