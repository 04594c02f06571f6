"""GUFT's sparse-delta matmul vs the dense ``x @ W``, forward + backward, per SDDMM implementation.

    python -m benchmarks.ops_bench                       # CPU defaults: batch 8,16, float32
    python -m benchmarks.ops_bench --batches 50 --tokens_per_image 17 --shapes \
        384x384,384x1536,1536x384 --fill 0.5 --out /tmp/ops_dinov2_56.json  # DINOv2-S/14, 56 px
    python -m benchmarks.ops_bench --batches 64 --dtype bfloat16 --impls gather,dense,pallas \\
        --out benchmarks/results/ops_bench_accelerator.json  # as benchmarks/accelerator.sh

For ViT-B/16 layer shapes (tokens = batch · 197; ``(d_in, d_out)`` = qkv/out 768×768, fc1
768×3072, fc2 3072×768) at GUFT's final density (0.3% of the entries, random, unsorted as GUFT
stores them): the time (fastest of ``--reps``; medians recorded too) of one jitted forward +
backward (``y``, ``dx`` and the weight gradient) of :func:`guft_jax.ops.sparse_delta_matmul` with
each ``impl`` against the same for the dense matmul (``y``, ``dx``, the full ``dW``), and of the
weight gradient alone (the SDDMM vs the ``xᵀ dy`` matmul). All functions of one configuration
run interleaved round-robin, so the ratios are taken within one run under the same machine noise.
The Pallas kernel runs in interpret mode off GPU (a correctness check, far from a speed figure),
so there it is checked against the dense gradient but not timed. Also times fused attention
(:func:`guft_jax.attention.attention`) against its einsum reference at ViT-B/16's shape. Writes JSON
after every configuration.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, harness
from guft_jax import kernels, ops

SHAPES = ((768, 768), (768, 3072), (3072, 768))
TOKENS_PER_IMAGE = 197  # ViT-B/16 at 224 px: 14 x 14 patches + [CLS]


def _case(batch, d_in, d_out, density, dtype, seed=0, *, tokens=TOKENS_PER_IMAGE, fill=1.0):
    """``density`` of the entries selected, in slots of which ``fill`` are filled: the rest is
    padding (``rows = d_in``) after them, as GUFT's capacity slack leaves it."""
    rng = np.random.default_rng(seed)
    k = max(1, round(density * d_in * d_out))
    cap = max(k, round(k / fill))
    flat = rng.choice(d_in * d_out, size=k, replace=False)  # GUFT's order: not sorted
    x = jnp.asarray(rng.normal(size=(batch, tokens, d_in)), dtype)
    w0 = jnp.asarray(rng.normal(size=(d_in, d_out)) / math.sqrt(d_in), dtype)
    g = jnp.asarray(rng.normal(size=(batch, tokens, d_out)), dtype)
    rows = jnp.asarray(np.concatenate([flat // d_out, np.full(cap - k, d_in)]), jnp.int32)
    cols = jnp.asarray(np.concatenate([flat % d_out, np.zeros(cap - k, int)]), jnp.int32)
    values = jnp.asarray(0.01 * rng.normal(size=cap), dtype)
    return dict(x=x, w0=w0, g=g, rows=rows, cols=cols, values=values, k=k)


def _functions(impls):
    def dense_fwd_bwd(x, w0, g):
        y, vjp = jax.vjp(lambda x, w: x @ w, x, w0)
        return (y, *vjp(g))

    def sparse_fwd_bwd(impl):
        def f(x, w0, rows, cols, values, g):
            op = lambda x, v: ops.sparse_delta_matmul(x, w0, rows, cols, v, impl=impl)
            y, vjp = jax.vjp(op, x, values)
            return (y, *vjp(g))

        return f

    def dw_matmul(x, g):
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        return jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))

    def sddmm(impl):
        def f(x, g, rows, cols):
            x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
            return ops.sddmm(x2, g2, rows, cols, impl=impl)

        return f

    fns = {"dense_fwd_bwd": (jax.jit(dense_fwd_bwd), ("x", "w0", "g"))}
    for impl in impls:
        fns[f"sparse_{impl}_fwd_bwd"] = (
            jax.jit(sparse_fwd_bwd(impl)),
            ("x", "w0", "rows", "cols", "values", "g"),
        )
    fns["dw_matmul"] = (jax.jit(dw_matmul), ("x", "g"))
    for impl in impls:
        fns[f"sddmm_{impl}"] = (jax.jit(sddmm(impl)), ("x", "g", "rows", "cols"))
    return fns


def _check_pallas(case) -> float:
    """Max |SDDMM_pallas - dense dW at the entries| / max |dW| (interpret mode off GPU)."""
    x2 = case["x"].reshape(-1, case["x"].shape[-1])
    g2 = case["g"].reshape(-1, case["g"].shape[-1])
    got = jax.jit(lambda *a: ops.sddmm(*a, impl="pallas"))(x2, g2, case["rows"], case["cols"])
    want = jax.jit(lambda *a: ops.sddmm(*a, impl="dense"))(x2, g2, case["rows"], case["cols"])
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def bench_case(
    batch, d_in, d_out, *, density, dtype, impls, reps, log, tokens=TOKENS_PER_IMAGE, fill=1.0
):
    case = _case(batch, d_in, d_out, density, dtype, tokens=tokens, fill=fill)
    runs = {
        name: harness.jit_run(name, f, [case[a] for a in argn], carry=0)
        for name, (f, argn) in _functions(impls).items()
    }
    harness.round_robin(runs, reps)  # machine noise hits every function alike
    compile_s = {name: r.compile_s for name, r in runs.items()}
    ms, median_ms = _fastest_and_median_ms(runs)
    out = dict(
        batch=batch,
        tokens=batch * tokens,
        slots=int(case["rows"].shape[0]),
        d_in=d_in,
        d_out=d_out,
        entries=case["k"],
        density=case["k"] / (d_in * d_out),
        min_ms=ms,
        median_ms=median_ms,
        compile_s=compile_s,
        fwd_bwd_vs_dense={i: ms[f"sparse_{i}_fwd_bwd"] / ms["dense_fwd_bwd"] for i in impls},
        weight_grad_vs_dw_matmul={i: ms[f"sddmm_{i}"] / ms["dw_matmul"] for i in impls},
    )
    log(
        f"  batch {batch} {d_in}x{d_out} ({case['k']} entries): dense fwd+bwd "
        f"{ms['dense_fwd_bwd']:.1f} ms; "
        + ", ".join(
            f"{i} {ms[f'sparse_{i}_fwd_bwd']:.1f} ms ({out['fwd_bwd_vs_dense'][i]:.3f}x, "
            f"dW {out['weight_grad_vs_dw_matmul'][i]:.3f}x)"
            for i in impls
        )
    )
    return out, case


def _fastest_and_median_ms(runs) -> tuple[dict, dict]:
    """Per run, the fastest and the median step in ms. Ratios use the fastest: on a shared
    machine other load only ever adds time."""
    fastest = {name: 1e3 * float(np.min(r.times)) for name, r in runs.items()}
    return fastest, {name: 1e3 * float(np.median(r.times)) for name, r in runs.items()}


def bench_attention(batch, *, dtype, reps, log, tokens=TOKENS_PER_IMAGE, heads=12, head_dim=64):
    """Forward + backward of :func:`guft_jax.attention.attention` per impl at ViT-B/16 shapes."""
    impls = ["einsum", "xla"] + (["auto"] if jax.default_backend() == "gpu" else [])
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, g = (jax.random.normal(kk, (batch, tokens, heads, head_dim), dtype) for kk in ks)

    def fwd_bwd(impl):
        def f(q, k, v, g):
            o, vjp = jax.vjp(lambda q, k, v: ops.attention(q, k, v, impl=impl), q, k, v)
            return (o, *vjp(g))

        return jax.jit(f)

    runs = {i: harness.jit_run(i, fwd_bwd(i), [q, k, v, g], carry=0) for i in impls}
    harness.round_robin(runs, reps)
    ms, _ = _fastest_and_median_ms(runs)
    out = dict(
        batch=batch,
        shape=[batch, tokens, heads, head_dim],
        dtype=jnp.dtype(dtype).name,
        min_ms=ms,
        vs_einsum={i: ms[i] / ms["einsum"] for i in impls},
    )
    log(
        f"  attention fwd+bwd {out['shape']} {out['dtype']}: "
        + ", ".join(f"{i} {ms[i]:.1f} ms ({out['vs_einsum'][i]:.3f}x)" for i in impls)
    )
    return out


def summarize(cases, impls) -> dict:
    """Geometric-mean ratios per impl over all cases, and the fastest impl."""
    geo = lambda v: float(np.exp(np.mean(np.log(v))))
    fwd = {i: geo([c["fwd_bwd_vs_dense"][i] for c in cases]) for i in impls}
    dw = {i: geo([c["weight_grad_vs_dw_matmul"][i] for c in cases]) for i in impls}
    fastest = min(fwd, key=fwd.get)
    backend = jax.default_backend()
    return dict(
        fwd_bwd_vs_dense_geomean=fwd,
        weight_grad_vs_dw_matmul_geomean=dw,
        fastest_impl=fastest,
        auto_impl=ops.resolve_sddmm_impl("auto", backend),
        auto_agrees=ops.resolve_sddmm_impl("auto", backend) == fastest,
        kernels=kernels.as_dict(kernels.resolve(None, backend)),
    )


def main(argv=None):
    on_gpu = jax.default_backend() == "gpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64" if on_gpu else "8,16")
    ap.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES))
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--tokens_per_image", type=int, default=TOKENS_PER_IMAGE)
    ap.add_argument(
        "--fill", type=float, default=1.0, help="filled fraction of the slots (GUFT: ~0.5)"
    )
    ap.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    ap.add_argument("--impls", default="gather,dense,pallas" if on_gpu else "gather,dense")
    ap.add_argument("--reps", type=int, default=20 if on_gpu else 7)
    ap.add_argument(
        "--attention_batch", type=int, default=64 if on_gpu else 8, help="0: skip attention"
    )
    ap.add_argument("--out", default="benchmarks/results/ops_bench.json")
    a = ap.parse_args(argv)
    impls = a.impls.split(",")
    dtype = jnp.dtype(a.dtype)
    shapes = [tuple(int(d) for d in s.split("x")) for s in a.shapes.split(",")]
    t0 = time.time()
    res = dict(
        machine=common.machine(),
        args=vars(a),
        cases=[],
    )
    log = lambda s: print(s, flush=True)
    for batch in [int(b) for b in a.batches.split(",")]:
        for d_in, d_out in shapes:
            case, data = bench_case(
                batch, d_in, d_out, density=a.density, dtype=dtype, impls=impls, reps=a.reps,
                log=log, tokens=a.tokens_per_image, fill=a.fill,
            )  # fmt: skip
            res["cases"].append(case)
            if "pallas_check" not in res:
                # Once, on a real shape: compiled on GPU, interpreted elsewhere.
                res["pallas_check"] = dict(
                    shape=[batch * a.tokens_per_image, d_in, d_out],
                    interpret=not on_gpu,
                    max_rel_err_vs_dense=_check_pallas(data),
                )
            res["summary"] = summarize(res["cases"], impls)
            res["wall_s"] = time.time() - t0
            common.write_json(a.out, res)
    if a.attention_batch:
        res["attention"] = bench_attention(a.attention_batch, dtype=dtype, reps=a.reps, log=log)
        res["wall_s"] = time.time() - t0
        common.write_json(a.out, res)
    s = res["summary"]
    log(
        "fwd+bwd / dense (geomean): "
        + ", ".join(f"{i} {v:.3f}" for i, v in s["fwd_bwd_vs_dense_geomean"].items())
        + f"; fastest {s['fastest_impl']}, auto = {s['auto_impl']}"
        + f"; wrote {a.out} ({res['wall_s']:.0f} s)"
    )


if __name__ == "__main__":
    main()
