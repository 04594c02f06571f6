"""Train-step cost of every method relative to full fine-tuning, measured in one run.

    python -m benchmarks.step_bench --models ViT-S/16,ViT-B/16 --image_size 224 --batch 32

For each model and method: median step time (jitted forward + backward + AdamW update, the
engine's own step; methods interleaved round-robin so machine noise hits all alike), compile
time, optimizer-state bytes, XLA's peak-memory estimate of the compiled step
(``memory_analysis``: arguments + outputs + temporaries − aliased), the step's FLOPs
(``cost_analysis``) and the achieved FLOP/s as a fraction of a large float32 matmul's FLOP/s
measured in the same run (a CPU "MFU"). GUFT is measured at the paper's final budget (0.34% of
the backbone, entries spread over tensors in proportion to their size) on its sparse path and on
the dense reference path, and its saliency pass (batch mode) is timed against the same number of
plain forward+backward passes. Ratios are taken against full fine-tuning in the same run.
``--precision fp32,bf16`` measures each method under each policy in the same round-robin
(rows ``name@bf16``; ``step_vs_full`` against full fine-tuning at the same precision,
``step_vs_full_fp32`` against fp32 full fine-tuning). Writes ``benchmarks/results/step_bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from guft_jax import masks, memory_plan, ops, paths, saliency, train, vit
from guft_jax import precision as precision_lib
from guft_jax.methods import base as mbase
from guft_jax.methods import get_method, method_names, spec

# Every registered method (with its registered defaults), GUFT's dense reference path, and GUFT's
# sparse path with each SDDMM implementation forced (``ops.AUTO_IMPL`` picks one per backend).
SDDMM_ROWS = {"guft_gather": "gather", "guft_dense_dw": "dense", "guft_pallas": "pallas"}
METHODS = (*method_names(), "guft_dense", *SDDMM_ROWS)


def _method(name):
    """GUFT rows are timed at the paper's final budget (0.34%) spread over the tensors in
    proportion to their size: GUFT's own machinery with the magnitude score and per-tensor
    allocation fills the mask (no saliency pass needed to time a step; the step is the same)."""
    kw = dict(recompute_epochs=[1], ratios=[0.0034], score="magnitude", allocation="per_tensor")
    if name == "guft" or name in SDDMM_ROWS:
        return get_method("guft", **kw)
    if name == "guft_dense":
        return get_method("guft", sparse=False, **kw)
    return get_method(name, **(spec(name).defaults.kwargs or {}))


@contextlib.contextmanager
def _sddmm_impl(impl):
    """``ops.AUTO_IMPL`` for this backend set to ``impl`` while a step is traced (None: as is)."""
    backend = jax.default_backend()
    old = ops.AUTO_IMPL.get(backend)
    if impl is not None:
        ops.AUTO_IMPL[backend] = impl
    try:
        yield
    finally:
        ops.AUTO_IMPL[backend] = old


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def matmul_flops_per_s(n=2048, reps=5, dtype=jnp.float32) -> float:
    """FLOP/s of one ``n``³ matmul on random data (zeros and ones run faster than real data)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda u, v: u @ v)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(ts))


def bench_model(
    model_name,
    *,
    image_size,
    batch,
    reps,
    methods,
    log,
    precisions=("fp32",),
    peer=(),
    saliency_pass=True,
    remat=False,
):
    model = vit.build_model(model_name, num_classes=100)
    if remat:  # jax.checkpoint per encoder block
        model = model.clone(remat=True)
    params = vit.init_params(model, jax.random.PRNGKey(0), image_size)
    params = dict(params, head=jax.tree.map(lambda x: x + 0.01, params["head"]))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, image_size, image_size, 3))
    y = jnp.arange(batch, dtype=jnp.int32) % 100
    backbone = vit.count_params({k: v for k, v in params.items() if k != "head"})
    runs, failed = {}, {}
    multi = len(precisions) > 1
    for prec, name in [(p, n) for p in precisions for n in methods]:
        key = f"{name}@{prec}" if multi else name
        pmodel = precision_lib.with_precision(model, prec)
        m = _method(name)
        base = mbase.prepare_base(m, params)  # once, outside the timed step (NF4 quantisation)
        tx, state = train.optimizer_for(m, base, steps_per_epoch=1000, epochs=1, lr=1e-3)
        state = train.epoch_start(
            pmodel, m, base, state, 1, batches=lambda: [(x, y)], epochs=1, log=lambda s: None
        )
        mask = train.mask_of(m, state)
        n_trainable = int(
            sum(train.trained_counts(m, base, state.trainable, state.method_state).values())
        )
        step = train.make_train_step(pmodel, m, tx)
        t = time.perf_counter()
        try:
            with _sddmm_impl(SDDMM_ROWS.get(name)):  # the impl is chosen while tracing
                compiled = step.lower(state, base, x, y, mask).compile()
            compile_s = time.perf_counter() - t
            state, loss = compiled(state, base, x, y, mask)  # warm-up
            jax.block_until_ready(loss)
        except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others
            failed[key] = f"{type(e).__name__}: {str(e)[:500]}"
            log(f"  {model_name} {key}: FAILED {failed[key]}")
            continue
        peak = memory_plan.compiled_peak_bytes(compiled)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        mstate = _bytes(state.opt_state)
        runs[key] = dict(
            precision=precision_lib.resolve(prec),
            full_key=f"full@{prec}" if multi else "full",
            compiled=compiled,
            state=state,
            params=base,
            mask=mask,
            times=[],
            compile_s=compile_s,
            peak_bytes=peak,
            flops=float(cost.get("flops", 0.0)) if cost else 0.0,
            opt_state_bytes=mstate,
            trainable=n_trainable,
        )
        log(f"  {model_name} {key}: compiled in {compile_s:.1f}s")
    peers = {}
    if peer:  # the PyTorch peer, timed in the same round-robin (benchmarks/torch_peer.py)
        from benchmarks import torch_peer

        for prec in precisions:
            for spec_ in peer:
                method, _, comp = spec_.partition("+")
                try:
                    run = torch_peer.build(
                        model_name,
                        method,
                        image_size=image_size,
                        batch=batch,
                        precision=precision_lib.resolve(prec),
                        compile_model=comp == "compile",
                    )
                except Exception as e:  # noqa: BLE001 -- the peer failing must not lose ours
                    failed[f"torch:{spec_}@{prec}"] = f"{type(e).__name__}: {str(e)[:500]}"
                    log(f"  {model_name} torch:{spec_}: FAILED {failed[f'torch:{spec_}@{prec}']}")
                    continue
                key = f"{run.name}@{prec}" if multi else run.name
                peers[key] = dict(run=run, times=[], precision=precision_lib.resolve(prec))
                log(f"  {model_name} {key}: built")
    for _ in range(reps):  # round-robin: noise hits every method alike
        for r in runs.values():
            t = time.perf_counter()
            r["state"], loss = r["compiled"](r["state"], r["params"], x, y, r["mask"])
            jax.block_until_ready(loss)
            r["times"].append(time.perf_counter() - t)
        for r in peers.values():
            r["times"].append(torch_peer.timed(r["run"]))
    out = {}
    for name, r in runs.items():
        med = float(np.median(r["times"]))
        out[name] = dict(
            precision=r["precision"],
            full_key=r["full_key"],
            step_s=med,
            images_per_s=batch / med,
            compile_s=r["compile_s"],
            flops=r["flops"],
            flops_per_s=r["flops"] / med if r["flops"] else None,
            opt_state_bytes=r["opt_state_bytes"],
            peak_bytes=r["peak_bytes"],
            trainable=r["trainable"],
            trainable_pct=100 * r["trainable"] / backbone,
        )
    f32 = out.get("full@fp32" if multi else "full")
    for o in out.values():
        f = out.get(o.pop("full_key"))
        if f is None:
            continue
        o["step_vs_full"] = o["step_s"] / f["step_s"]
        o["opt_state_vs_full"] = o["opt_state_bytes"] / f["opt_state_bytes"]
        if o["peak_bytes"] and f["peak_bytes"]:
            o["peak_vs_full"] = o["peak_bytes"] / f["peak_bytes"]
        if f32 is not None:
            o["step_vs_full_fp32"] = o["step_s"] / f32["step_s"]
    peer_out = {}
    for name, r in peers.items():
        med = float(np.median(r["times"]))
        peer_out[name] = dict(
            precision=r["precision"],
            step_s=med,
            images_per_s=batch / med,
            peak_bytes=r["run"].peak_bytes,
            trainable=r["run"].trainable,
        )
        own = out.get(f"full@{r['precision']}" if multi else "full")
        if own:
            peer_out[name]["our_full_vs_this"] = own["images_per_s"] / (batch / med)
    sal = _saliency_vs_plain(model, params, x, y, reps) if saliency_pass else None
    return dict(methods=out, saliency=sal, backbone_params=backbone, peer=peer_out, failed=failed)


def _saliency_vs_plain(model, params, x, y, reps):
    """GUFT's saliency pass vs the same number of plain fwd+bwd passes."""
    loss = jax.jit(
        lambda theta, xx, yy: train.optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": theta}, xx), yy
        )
    )
    eligible = masks.eligible_leaves(params, preset="blocks")
    theta = {k: paths.get(params, paths.path_of(k)) for k in eligible}

    def per_ex(th, xx, yy):
        return loss(paths.replaced(params, {paths.path_of(k): v for k, v in th.items()}), xx, yy)

    acc = saliency.make_accumulator(per_ex, mode="batch")
    grad = jax.jit(jax.grad(lambda th, xx, yy: jnp.mean(per_ex(th, xx, yy))))
    n_batches = max(2, reps)
    batches = [(np.asarray(x), np.asarray(y))] * n_batches
    saliency.compute(per_ex, theta, batches[:1], accumulator=acc)  # compile
    jax.block_until_ready(grad(theta, x, y))
    t = time.perf_counter()
    g, _ = saliency.compute(per_ex, theta, batches, accumulator=acc)
    jax.block_until_ready(g)
    sal_s = time.perf_counter() - t
    t = time.perf_counter()
    for xx, yy in batches:
        jax.block_until_ready(grad(theta, xx, yy))
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    k = masks.budget(0.001, sum(math.prod(s) for s in eligible.values()))
    mk = masks.topk_mask(g, k)
    jax.block_until_ready(mk)
    topk_s = time.perf_counter() - t
    return dict(
        batches=n_batches,
        saliency_s=sal_s,
        plain_fwd_bwd_s=plain_s,
        ratio=sal_s / plain_s,
        topk_s=topk_s,
        topk_k=k,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ViT-S/16,ViT-B/16")
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--batch", default="32", help="one batch size, or one per model (comma)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="benchmarks/results/step_bench.json")
    ap.add_argument(
        "--precision",
        default="fp32",
        help=f"comma-separated policies from {', '.join(precision_lib.CHOICES)} "
        "(each method measured under each, interleaved)",
    )
    ap.add_argument(
        "--peer",
        default="",
        help="'torch': also time the PyTorch peer (timm + peft, when importable) in the same "
        "round-robin: full, full+compile, lora, bitfit",
    )
    ap.add_argument(
        "--saliency",
        default=1,
        type=int,
        choices=(0, 1),
        help="1: also time GUFT's saliency pass against plain fwd+bwd passes",
    )
    ap.add_argument("--remat", default=0, type=int, choices=(0, 1), help="1: remat each block")
    a = ap.parse_args(argv)
    if a.peer not in ("", "torch"):
        ap.error(f"--peer: {a.peer!r} is not allowed; allowed: torch")
    peer = ("full", "full+compile", "lora", "bitfit") if a.peer == "torch" else ()
    if peer:
        from benchmarks import torch_peer

        why = torch_peer.available()
        if why:
            ap.error(f"--peer torch: {why}")
    precisions = [p.strip() for p in a.precision.split(",") if p.strip()]
    for p in precisions:  # a bad name fails before anything runs
        if p not in precision_lib.CHOICES:
            ap.error(
                f"--precision: {p!r} is not allowed; allowed: {', '.join(precision_lib.CHOICES)}"
            )
    unknown = sorted(set(a.methods.split(",")) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    t0 = time.time()
    res = dict(
        machine=common.machine(),
        args=vars(a),
        matmul_flops_per_s=matmul_flops_per_s(),
        models={},
    )
    if jax.default_backend() != "cpu":  # the accelerator's bf16 ceiling, measured in this run
        res["matmul_bf16_flops_per_s"] = matmul_flops_per_s(8192, 10, jnp.bfloat16)
    models = a.models.split(",")
    batches = [int(b) for b in str(a.batch).split(",")]
    batches = batches * len(models) if len(batches) == 1 else batches
    for name, batch in zip(models, batches, strict=True):
        print(f"{name} @ {a.image_size}px, batch {batch}", flush=True)
        r = bench_model(
            name,
            image_size=a.image_size,
            batch=batch,
            reps=a.reps,
            methods=a.methods.split(","),
            log=lambda s: print(s, flush=True),
            precisions=precisions,
            peer=peer,
            saliency_pass=bool(a.saliency),
            remat=bool(a.remat),
        )
        for o in r["methods"].values():
            if o["flops_per_s"]:
                o["mfu_vs_matmul"] = o["flops_per_s"] / res["matmul_flops_per_s"]
                if "matmul_bf16_flops_per_s" in res:  # MFU against the measured bf16 peak
                    o["mfu_vs_bf16_matmul"] = o["flops_per_s"] / res["matmul_bf16_flops_per_s"]
        r["batch"] = batch
        res["models"][name] = r
        print(table(name, r), flush=True)
        for pn, po in r["peer"].items():
            print(
                f"| {pn} | step {po['step_s']:.4f}s | {po['images_per_s']:.0f} img/s | "
                f"ours(full)/this {po.get('our_full_vs_this', float('nan')):.3f} | "
                f"peak {(po['peak_bytes'] or 0) / 2**30:.2f} GiB |",
                flush=True,
            )
        res["wall_s"] = time.time() - t0
        common.write_json(a.out, res)
        print(f"wrote {a.out} ({res['wall_s']:.0f} s)", flush=True)


def table(name, r) -> str:
    lines = [
        f"| {name} | trainable % | step s | img/s | step / full | opt state MB | opt / full "
        f"| peak MB | peak / full | MFU vs matmul | MFU vs bf16 matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, o in r["methods"].items():
        lines.append(
            f"| {m} | {o['trainable_pct']:.3f} | {o['step_s']:.4f} | {o['images_per_s']:.0f} | "
            f"{o.get('step_vs_full', float('nan')):.3f} | {o['opt_state_bytes'] / 2**20:.2f} | "
            f"{o.get('opt_state_vs_full', float('nan')):.4f} | "
            f"{(o['peak_bytes'] or 0) / 2**20:.0f} | {o.get('peak_vs_full', float('nan')):.3f} | "
            f"{o.get('mfu_vs_matmul') or float('nan'):.3f} | "
            f"{o.get('mfu_vs_bf16_matmul') or float('nan'):.3f} |"
        )
    s = r["saliency"]
    if s is None:
        return "\n".join(lines)
    lines.append(
        f"\nsaliency pass over {s['batches']} batches: {s['saliency_s']:.2f}s vs plain fwd+bwd "
        f"{s['plain_fwd_bwd_s']:.2f}s (ratio {s['ratio']:.3f}); global top-k "
        f"(k={s['topk_k']:,}) {s['topk_s']:.2f}s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
