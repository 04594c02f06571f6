"""README.md's "Use it in your own loop" section runs as printed (extracted here, never copied)."""

import pathlib
import re

import jax
import numpy as np

import guft_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it in your own loop"


def _blocks() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)


def test_the_readme_own_loop_examples_run_as_printed():
    blocks = _blocks()
    assert len(blocks) == 2  # GUFT, then LoRA
    ns: dict = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md:guft", "exec"), ns)
    # GUFT: three 1% rounds happened, the frozen entries are the pretrained ones bitwise
    state = guft_jax.transforms.find_state(ns["opt"])
    assert int(state.round) == 3
    base = ns["model"].init(jax.random.key(0), ns["x"][:1])["params"]
    mask = guft_jax.unfrozen(ns["opt"], base)
    paths = guft_jax.transforms.tree_paths(base)
    n_elig = n_sel = 0
    for p, a, b, m in zip(
        paths,
        jax.tree.leaves(ns["params"]),
        jax.tree.leaves(base),
        jax.tree.leaves(mask),
        strict=True,
    ):
        m = np.asarray(m)
        assert np.array_equal(np.asarray(a)[~m].view(np.uint32), np.asarray(b)[~m].view(np.uint32))
        if not p.startswith("head/"):
            n_elig, n_sel = n_elig + m.size, n_sel + int(m.sum())
    assert 0 < n_sel <= 3 * round(0.01 * n_elig)

    exec(compile(blocks[1], "README.md:lora", "exec"), ns)
    x = ns["x"][:32]
    out = ns["model"].apply({"params": ns["merged"]}, x)
    ref = ns["model"].apply({"params": ns["lo"].apply(ns["params"], ns["trainable"])}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert set(ns["trainable"]) == {"lora", "head"}
