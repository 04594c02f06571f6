"""docs/own_loop.md's loop runs as printed for each of its examples (extracted, never copied),
on a user's Flax linen MLP: the loss falls and the merged params give the trained logits."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "own_loop.md"


def _block(name: str) -> str:
    text = DOC.read_text().split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)[0]


def _examples() -> list[str]:
    """One statement per example (a statement may span lines: they end at a closing paren)."""
    out, cur = [], ""
    for line in _block("examples").splitlines():
        if line.startswith("TARGETS, HEAD ="):  # the page's own placeholders; the test sets its own
            continue
        cur += line.split("#")[0].rstrip() + "\n"
        if cur.count("(") == cur.count(")"):
            out.append(cur)
            cur = ""
    return out


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(3, name="classifier")(x)


def _setup():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96).astype(np.int32)
    x = (rng.normal(size=(96, 8)) * 0.5 + (y[:, None] - 1)).astype(np.float32)
    model = Net()
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    forward = lambda p, xb: model.apply({"params": p}, xb)  # noqa: E731
    batches = lambda: [
        (jnp.asarray(x[j : j + 32]), jnp.asarray(y[j : j + 32])) for j in (0, 32, 64)
    ]  # noqa: E731,E501
    return forward, params, batches


EXAMPLES = _examples()


@pytest.mark.parametrize(
    "example", EXAMPLES, ids=[re.search(r"peft\.(\w+)", e)[1] for e in EXAMPLES]
)
def test_the_documented_loop_runs_every_example(example):
    ns = {"TARGETS": r"Dense_[01]/kernel$", "HEAD": r"^classifier/"}
    exec(compile(_block("loop"), "docs/own_loop.md:loop", "exec"), ns)
    exec(compile(example, "docs/own_loop.md:example", "exec"), ns)
    forward, params, batches = _setup()
    ns["print"] = lambda *a: None
    trainable, state, losses = ns["train"](ns["ad"], forward, params, batches)
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    ad = ns["ad"]
    merged = ad.merge(params, trainable, state)
    x = batches()[0][0]
    np.testing.assert_allclose(
        forward(merged, x), forward(ad.apply(params, trainable, state), x), atol=1e-5
    )


def test_there_is_an_example_per_method_with_extra_parts():
    names = {re.search(r"peft\.(\w+)", e)[1] for e in EXAMPLES}
    assert {"aflora", "adalora", "dylora", "diff_pruning", "guft", "snip"} <= names
