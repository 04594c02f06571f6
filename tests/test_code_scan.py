"""The code base's size limits and its settings, checked by ``tools/code_scan.py``: no function
longer than 80 lines, no ``guft_jax`` module longer than 500, no module attribute of
``guft_jax`` assigned from outside its module (benchmarks and tests included)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import code_scan  # noqa: E402


def test_the_scan_finds_nothing():
    p = subprocess.run([sys.executable, "tools/code_scan.py"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:]
    assert p.stdout.strip().endswith("code scan: 0 violation(s)")


def test_the_scan_would_see_a_long_function_and_a_foreign_assignment(tmp_path, monkeypatch):
    """The checks can fail: a synthetic tree with one violation of each kind is reported."""
    for d in ("guft_jax", "experiments", "benchmarks", "tests"):
        (tmp_path / d).mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    (tmp_path / "guft_jax" / "big.py").write_text(f"def f():\n{body}\n" + "#\n" * 420)
    (tmp_path / "tests" / "t.py").write_text(
        "from guft_jax import ops\n\ndef test(monkeypatch):\n    ops.X = 1\n"
        "    monkeypatch.setattr(ops, 'Y', 2)\n"
    )
    monkeypatch.setattr(code_scan, "ROOT", tmp_path)
    assert [(n, lines) for _, n, lines in code_scan.long_functions()] == [("f", 82)]
    assert [n for _, n in code_scan.long_modules()] == [1 + 81 + 420]
    assert [t for _, t in code_scan.foreign_assignments()] == ["ops.X", "ops"]
