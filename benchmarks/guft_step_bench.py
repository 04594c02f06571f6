"""GUFT's train step at a real selection against full fine-tuning, LoRA and BitFit, in one run.

    python -m benchmarks.guft_step_bench            # DINOv2-S/14, Animal-MNIST, 56 px, batch 50

``benchmarks.step_bench`` times GUFT at a magnitude-score selection spread over every tensor,
whose entries touch nearly every row and column of a matrix. Real saliency selections cluster:
this benchmark first trains GUFT with its shipped defaults (``Defaults`` of the registry; the
rounds at epochs 1, 2, 3 of a 3-epoch ``train.fit`` on the real Animal-MNIST train800val200
split, pretrained DINOv2-S/14) and then times the engine's jitted step (forward + backward +
AdamW) at that final selection with each weight-gradient choice the sparse path has:

- ``guft``: the sparse path with blocks and no densified weight (``ops.BLOCK_FORWARD[backend]
  = True``: ``x W0`` plus the block's part in both passes, the weight gradient on the block),
  where the block is at most ``ops.BLOCK_MAX_FRACTION`` of a matrix, else the backend's SDDMM;
- ``guft_block_dw``: blocks for the weight gradient only, ``W0 + S`` densified in each pass
  (``ops.BLOCK_FORWARD[backend] = False``);
- ``guft_noblock``: the same step with blocks disabled (the backend's SDDMM everywhere, what
  shipped before blocks);

against ``full``, ``lora`` and ``bitfit`` (registered defaults) on the same batch, interleaved
round-robin (``--reps`` rounds) so machine noise hits all alike; ratios are to full
fine-tuning's median step. Also reported: how much of each matrix its block covers. Writes
``benchmarks/results/guft_step_bench.json``.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from guft_jax import guft as guft_lib
from guft_jax import memory_plan, ops, train
from guft_jax import precision as precision_lib
from guft_jax.data import get_source
from guft_jax.methods import base as mbase
from guft_jax.methods import get_method, spec
from guft_jax.pretrained import load_pretrained


def trained_guft(model, params, source, *, image_size, batch, epochs, log):
    """GUFT (shipped defaults, rounds at epochs 1..3) trained by ``fit``: (method, final state)."""
    d = spec("guft").defaults
    kw = dict(d.kwargs or {})
    kw["recompute_epochs"] = list(range(1, len(kw.get("ratios", [0.001] * 3)) + 1))
    m = get_method("guft", **kw)
    r = train.fit(
        model=model,
        params=params,
        method=m,
        source=source,
        image_size=image_size,
        batch_size=batch,
        epochs=max(epochs, len(kw["recompute_epochs"])),
        lr=d.lr,
        head_lr=d.head_lr,
        progress=False,
        log=log,
    )
    return m, r.state


def block_coverage(params, state) -> dict:
    """Per kernel: block capacity area / matrix size, and filled unique rows x cols / size."""
    ms = state.method_state
    cap, used = [], []
    for k, b in ms.blocks.items():
        n_in, n_out = guft_lib.matrix_shape(k, guft_lib._leaf(params, k).shape)
        br, bc = np.asarray(b["rows"]), np.asarray(b["cols"])
        cap.append(br.size * bc.size / (n_in * n_out))
        used.append(np.sum(br < n_in) * np.sum(bc < n_out) / (n_in * n_out))
    taken = sum(c <= ops.BLOCK_MAX_FRACTION for c in cap)
    return dict(
        kernels=len(cap),
        block_capacity_fraction_mean=float(np.mean(cap)),
        block_used_fraction_mean=float(np.mean(used)),
        kernels_taking_block=int(taken),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_s14")
    ap.add_argument("--dataset", default="animal_mnist")
    ap.add_argument("--image_size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3, help="GUFT training before timing (>= 3)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--precision", default="auto", choices=precision_lib.CHOICES)
    ap.add_argument("--out", default="benchmarks/results/guft_step_bench.json")
    a = ap.parse_args(argv)
    t0 = time.time()
    source = get_source(a.dataset, seed=0)
    model, params = load_pretrained(
        a.model, num_classes=source.num_classes, image_size=a.image_size
    )
    model = precision_lib.with_precision(model, a.precision)
    log = lambda s: print(s, flush=True)
    gm, gstate = trained_guft(
        model, params, source, image_size=a.image_size, batch=a.batch, epochs=a.epochs, log=log
    )
    cover = block_coverage(params, gstate)
    log(f"blocks: {cover}")
    x, y = next(iter(source.batches("train800val200", batch_size=a.batch,
                                    image_size=a.image_size)))  # fmt: skip
    x, y = jnp.asarray(x), jnp.asarray(y.astype(np.int32))
    runs = {}
    for name in ("full", "lora", "bitfit", "guft", "guft_block_dw", "guft_noblock"):
        if name.startswith("guft"):
            m, state = gm, jax.tree.map(jnp.copy, gstate)  # the step donates its state
            tx, _ = train.optimizer_for(m, params, steps_per_epoch=1000, epochs=1, lr=1e-3)
            state = state._replace(opt_state=tx.init(state.trainable))
            base = params
        else:
            m = get_method(name, **(spec(name).defaults.kwargs or {}))
            base = mbase.prepare_base(m, params)
            tx, state = train.optimizer_for(m, base, steps_per_epoch=1000, epochs=1, lr=1e-3)
        step = train.make_train_step(model, m, tx)
        mask = train.mask_of(m, state)
        backend = jax.default_backend()
        saved = ops.BLOCK_MAX_FRACTION, ops.BLOCK_FORWARD.get(backend)  # read while tracing
        ops.BLOCK_MAX_FRACTION = -1.0 if name == "guft_noblock" else saved[0]
        ops.BLOCK_FORWARD[backend] = name != "guft_block_dw"
        try:
            t = time.perf_counter()
            compiled = step.lower(state, base, x, y, mask).compile()
            compile_s = time.perf_counter() - t
        finally:
            ops.BLOCK_MAX_FRACTION, ops.BLOCK_FORWARD[backend] = saved
        state, loss = compiled(state, base, x, y, mask)
        jax.block_until_ready(loss)
        runs[name] = dict(compiled=compiled, state=state, base=base, mask=mask, times=[],
                          compile_s=compile_s,
                          peak_bytes=memory_plan.compiled_peak_bytes(compiled))  # fmt: skip
        log(f"  {name}: compiled in {compile_s:.1f}s")
    for _ in range(a.reps):
        for r in runs.values():
            t = time.perf_counter()
            r["state"], loss = r["compiled"](r["state"], r["base"], x, y, r["mask"])
            jax.block_until_ready(loss)
            r["times"].append(time.perf_counter() - t)
    full = float(np.median(runs["full"]["times"]))
    out = {}
    for name, r in runs.items():
        med = float(np.median(r["times"]))
        out[name] = dict(step_s=med, step_vs_full=med / full, compile_s=r["compile_s"],
                         images_per_s=a.batch / med, peak_bytes=r["peak_bytes"],
                         times=r["times"])  # fmt: skip
    for name, o in out.items():
        o["peak_vs_lora"] = (o["peak_bytes"] or 0) / (out["lora"]["peak_bytes"] or 1)
        log(f"| {name} | {o['step_s']:.4f} s | {o['images_per_s']:.0f} img/s | "
            f"step/full {o['step_vs_full']:.3f} | peak {(o['peak_bytes'] or 0) / 2**20:.0f} MiB | "
            f"peak/LoRA {o['peak_vs_lora']:.3f} |")  # fmt: skip
    n_sel = int(sum(int(c) for c in gstate.method_state.count.values()))
    backbone = sum(
        math.prod(np.shape(v)) for k, v in params.items() if k != "head" for v in jax.tree.leaves(v)
    )
    res = dict(
        machine=common.machine(),
        args=vars(a),
        precision=precision_lib.resolve(a.precision),
        selected=n_sel,
        selected_pct=100 * n_sel / backbone,
        blocks=cover,
        methods=out,
        wall_s=time.time() - t0,
    )
    common.write_json(a.out, res)
    log(f"wrote {a.out} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
