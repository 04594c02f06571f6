"""LoSiA-Pro's train step against full fine-tuning's (and LoSiA's), measured in one run.

    python -m benchmarks.losia_bench --model ViT-S/16 --image_size 224 --batch 8,32 --reps 7

Each method is the engine's own jitted step (forward + backward + AdamW + the method's step
hook), compiled once; the steps run round-robin (noise hits every method alike) and the median
is reported with its ratio to full fine-tuning's, plus optimizer-state bytes, XLA's peak-memory
estimate of the compiled step and its FLOPs (``cost_analysis``). The LoSiA rows run with their
registered defaults (p = 1/8, T = 100) from step 0, so one layer is recording importance (its
dense weight gradient runs) in every measured step, as in training. ``losia_pro_static`` is
LoSiA-Pro without relocalisation (no importance tap: only ``x[:, rows]`` saved, no dense weight
gradient at all). Writes ``benchmarks/results/losia_bench.json``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from guft_jax import memory_plan, train, vit
from guft_jax.methods import get_method, spec

ROWS = {
    "full": ("full", {}),
    "losia": ("losia", None),
    "losia_pro": ("losia_pro", None),
    "losia_pro_static": ("losia_pro", dict(relocalize=False)),
}


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def _method(row):
    name, kw = ROWS[row]
    kw = dict(spec(name).defaults.kwargs or {}) if kw is None else kw
    return get_method(name, **kw)


def bench(model_name, *, image_size, batch, reps, rows, log=print):
    model = vit.build_model(model_name, num_classes=100)
    params = vit.init_params(model, jax.random.PRNGKey(0), image_size)
    # a non-zero head, so the backbone's gradient (and LoSiA's importance) is not exactly zero
    params = dict(params, head=jax.tree.map(lambda x: x + 0.01, params["head"]))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, image_size, image_size, 3))
    y = jnp.arange(batch, dtype=jnp.int32) % 100
    runs = {}
    for row in rows:
        m = _method(row)
        tx, state = train.optimizer_for(m, params, steps_per_epoch=1000, epochs=1, lr=1e-4)
        mask = train.mask_of(m, state)
        step = train.make_train_step(model, m, tx)
        t = time.perf_counter()
        compiled = step.lower(state, params, x, y, mask).compile()
        compile_s = time.perf_counter() - t
        peak = memory_plan.compiled_peak_bytes(compiled)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        state, loss = compiled(state, params, x, y, mask)  # warm-up
        jax.block_until_ready(loss)
        n_tr = sum(train.trained_counts(m, params, state.trainable, state.method_state).values())
        runs[row] = dict(
            compiled=compiled,
            state=state,
            mask=mask,
            times=[],
            compile_s=compile_s,
            peak_bytes=peak,
            flops=float(cost.get("flops", 0.0)) if cost else 0.0,
            opt_state_bytes=_bytes(state.opt_state),
            trainable=int(n_tr),
        )
        log(f"  {model_name} {row}: compiled in {compile_s:.1f}s")
    for i in range(reps):
        for r in runs.values():
            t = time.perf_counter()
            r["state"], loss = r["compiled"](r["state"], params, x, y, r["mask"])
            jax.block_until_ready(loss)
            r["times"].append(time.perf_counter() - t)
        log(
            f"  rep {i + 1}/{reps}: "
            + ", ".join(f"{k} {v['times'][-1]:.2f}s" for k, v in runs.items())
        )
    out = {}
    for row, r in runs.items():
        out[row] = dict(
            step_s=float(np.median(r["times"])),
            times_s=r["times"],
            compile_s=r["compile_s"],
            flops=r["flops"],
            opt_state_bytes=r["opt_state_bytes"],
            peak_bytes=r["peak_bytes"],
            trainable=r["trainable"],
        )
    if "full" in out:
        f = out["full"]
        for o in out.values():
            o["step_vs_full"] = o["step_s"] / f["step_s"]
            # per-rep ratios against the full step of the same round (round-robin pairs)
            o["step_vs_full_per_rep"] = [
                a / b for a, b in zip(o["times_s"], f["times_s"], strict=True)
            ]
            o["step_vs_full_per_rep_median"] = float(np.median(o["step_vs_full_per_rep"]))
            # the least-disturbed steps (a shared machine only ever adds time)
            o["step_vs_full_min"] = min(o["times_s"]) / min(f["times_s"])
            o["opt_state_vs_full"] = o["opt_state_bytes"] / f["opt_state_bytes"]
            if o["flops"] and f["flops"]:
                o["flops_vs_full"] = o["flops"] / f["flops"]
            if o["peak_bytes"] and f["peak_bytes"]:
                o["peak_vs_full"] = o["peak_bytes"] / f["peak_bytes"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-S/16")
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--batch", default="8,32", help="batch sizes, each measured separately")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default="benchmarks/results/losia_bench.json")
    a = ap.parse_args(argv)
    t0 = time.time()
    res = dict(
        machine=common.machine(load_avg_start=os.getloadavg()),
        args=vars(a),
        batches={
            b: bench(
                a.model, image_size=a.image_size, batch=int(b), reps=a.reps, rows=a.rows.split(",")
            )
            for b in a.batch.split(",")
        },
    )
    res["machine"]["load_avg_end"] = os.getloadavg()
    res["wall_s"] = time.time() - t0
    common.write_json(a.out, res)
    for b, rows in res["batches"].items():
        for row, o in rows.items():
            peak = o.get("peak_vs_full", float("nan"))
            ratio, fastest = o.get("step_vs_full", 1), o.get("step_vs_full_min", 1)
            print(
                f"batch {b} {row:>18}: step {o['step_s']:.3f}s "
                f"({ratio:.2f}x full, fastest {fastest:.2f}x), "
                f"flops {o.get('flops_vs_full', 1):.2f}x, "
                f"opt state {o.get('opt_state_vs_full', 1):.3f}x, peak {peak:.2f}x"
            )


if __name__ == "__main__":
    main()
