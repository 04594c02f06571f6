"""GUFT in your own loop: optimizer-state bytes and step time against plain AdamW, in one run.

    python -m benchmarks.own_loop_bench --reps 30

A 1M-parameter MLP (512 -> 1024 -> 512 -> 10, the last layer the ``head``) trained by a user's
jitted step (loss, gradients, ``tx.update``, ``optax.apply_updates``; params and optimizer state
donated) with three optimizers: plain ``optax.adamw``, ``gradual_unfreeze(adamw)`` (dense state)
and ``gradual_unfreeze(adamw, sparse=True)``, one round selecting 1% of the non-head entries at
step 0 (the head trains in full, as in GUFT). Each step is compiled and warmed up (the round
runs in the first step), then the three steps run round-robin (noise hits every row alike) and
the median is reported with its ratio to plain AdamW's, with the optimizer-state bytes and their
ratio. Writes ``benchmarks/results/own_loop_bench.json``.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, harness
from guft_jax import transforms

OUT = os.path.join(os.path.dirname(__file__), "results", "own_loop_bench.json")


class MLP(nn.Module):
    """The benchmark's model: two hidden layers and a ``head``."""

    hidden: int = 1024
    width: int = 512
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.classes, name="head")(x)


def _optimizers(ratio: float) -> dict:
    adamw = optax.adamw(1e-3, weight_decay=1e-4)
    gu = dict(steps=[0], ratios=[ratio])
    return {
        "adamw": (adamw, False),
        "gradual_unfreeze_dense": (transforms.gradual_unfreeze(adamw, **gu), True),
        "gradual_unfreeze_sparse": (transforms.gradual_unfreeze(adamw, sparse=True, **gu), True),
    }


def _step(model, tx, needs_saliency):
    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def step(p, opt, x, y, scores):
        g = jax.grad(loss)(p, x, y)
        kw = dict(saliency=scores) if needs_saliency else {}
        u, opt = tx.update(g, opt, p, **kw)
        return optax.apply_updates(p, u), opt

    return jax.jit(step, donate_argnums=(0, 1))


def run(*, reps: int, batch: int, ratio: float, seed: int = 0) -> dict:
    """The rows (state bytes, median step seconds and their ratios to plain AdamW)."""
    model = MLP()
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, model.width)), jnp.float32)
    y = jnp.asarray(rng.integers(0, model.classes, batch), jnp.int32)
    params = model.init(jax.random.key(seed), x[:1])["params"]
    n_params = sum(v.size for v in jax.tree.leaves(params))
    scores = jax.tree.map(lambda v: jnp.asarray(rng.random(v.shape), jnp.float32), params)
    runs = {}
    for name, (tx, needs) in _optimizers(ratio).items():
        p = jax.tree.map(jnp.array, params)
        # compile, run the round, warm up; each step carries (params, optimizer state)
        args = (p, tx.init(p), x, y, scores)
        runs[name] = harness.jit_run(name, _step(model, tx, needs), args, carry=2, warmup=3)
    harness.round_robin(runs, reps)
    rows = {}
    for name, r in runs.items():
        state_bytes = harness.tree_bytes(r.args[1])
        rows[name] = dict(state_bytes=state_bytes, step_s=float(np.median(r.times)))
    base = rows["adamw"]
    for row in rows.values():
        row["state_ratio_to_adamw"] = row["state_bytes"] / base["state_bytes"]
        row["step_ratio_to_adamw"] = row["step_s"] / base["step_s"]
    st = transforms.find_state(runs["gradual_unfreeze_sparse"].args[1])
    n_elig = n_params - sum(v.size for v in jax.tree.leaves(params["head"]))
    return dict(
        params=int(n_params),
        eligible=int(n_elig),
        selected=int(np.sum(np.asarray(st.indices) < n_elig)),
        ratio=ratio,
        batch=batch,
        reps=reps,
        rows=rows,
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    res = run(reps=args.reps, batch=args.batch, ratio=args.ratio)
    res["machine"] = common.machine()
    common.write_json(args.out, res)
    for name, row in res["rows"].items():
        print(
            f"{name:26s} state {row['state_bytes']:>10,d} B ({row['state_ratio_to_adamw']:.4f}x)"
            f"  step {1e3 * row['step_s']:.2f} ms ({row['step_ratio_to_adamw']:.3f}x)"
        )
    return res


if __name__ == "__main__":
    main()
