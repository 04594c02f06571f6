"""Peak memory of the compiled train step with and without ``remat``, compiled, never run.

    python -m benchmarks.remat_plan                     # ViT-B/16 batch 256, ViT-L/16 batch 64

For each (model, batch) and method, the engine's jitted step (``train.make_train_step``; bf16
compute by default) is lowered and compiled for the local backend on abstract arguments
(``jax.ShapeDtypeStruct``: nothing is allocated or run), once plain and once with
``remat=True`` (``jax.checkpoint`` per encoder block), and XLA's buffer assignment of the step
is read (:func:`guft_jax.memory_plan.compiled_peak_bytes`: arguments + outputs + temporaries −
aliased). Compiled for CPU this is the CPU compiler's plan, a stand-in for the accelerator's
(``STAGES=remat bash benchmarks/accelerator.sh`` measures there). Writes
``benchmarks/results/remat_plan.json``.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import common
from guft_jax import memory_plan, train, vit
from guft_jax import precision as precision_lib
from guft_jax.methods import get_method, spec


def peak(model_name, method_name, *, batch, image_size, remat, precision):
    m = get_method(method_name, **(spec(method_name).defaults.kwargs or {}))
    params, state = memory_plan.abstract_state(
        model_name, m, image_size=image_size, num_classes=100
    )
    box = []

    def make(p):  # the optimizer object, built while tracing (it holds no arrays)
        tx, st = train.optimizer_for(m, p, steps_per_epoch=1, epochs=1, lr=1e-3)
        box.append(tx)
        return st

    jax.eval_shape(make, params)
    model = vit.build_model(model_name, num_classes=100)
    model = precision_lib.with_precision(model.clone(remat=remat), precision)
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), np.float32)
    y = jax.ShapeDtypeStruct((batch,), np.int32)
    t = time.perf_counter()
    compiled = train.make_train_step(model, m, box[0]).lower(state, params, x, y, ()).compile()
    return memory_plan.compiled_peak_bytes(compiled), time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ViT-B/16,ViT-L/16")
    ap.add_argument("--batches", default="256,64")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--precision", default="bf16", choices=precision_lib.CHOICES)
    ap.add_argument("--out", default="benchmarks/results/remat_plan.json")
    a = ap.parse_args(argv)
    rows = []
    for name, batch in zip(a.models.split(","), map(int, a.batches.split(",")), strict=True):
        for meth in a.methods.split(","):
            row = dict(model=name, batch=batch, method=meth)
            for remat in (False, True):
                b, s = peak(name, meth, batch=batch, image_size=a.image_size, remat=remat,
                            precision=a.precision)  # fmt: skip
                row["remat" if remat else "plain"] = dict(peak_bytes=b, compile_s=s)
            row["remat_vs_plain"] = row["remat"]["peak_bytes"] / row["plain"]["peak_bytes"]
            rows.append(row)
            print(
                f"| {name} | {batch} | {meth} | {row['plain']['peak_bytes'] / 2**30:.2f} GiB | "
                f"{row['remat']['peak_bytes'] / 2**30:.2f} GiB | {row['remat_vs_plain']:.3f} |",
                flush=True,
            )
    res = dict(
        machine=common.machine(),
        args=vars(a),
        rows=rows,
    )
    common.write_json(a.out, res)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
