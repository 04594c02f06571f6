"""Memory plans, nothing run: per-device bytes from shapes, or the compiled step's peak bytes.

    JAX_PLATFORMS=cpu python -m benchmarks.memory_plan > results/memory_plan.md   # --plan shapes
    python -m benchmarks.memory_plan --plan compiled   # ViT-B/16 batch 256, ViT-L/16 batch 64

``--plan shapes`` (default): the README's memory-plan table, bytes per device for ViT-B/L/H/g x
{full FT, LoRA, GUFT} x {1, 8, 64, 256} chips, from shapes only (``jax.eval_shape`` + the fsdp
rules, :func:`guft_jax.memory_plan.plan`), as markdown on stdout.

``--plan compiled`` (``benchmarks/results/remat_plan.json``): for each (model, batch) and method,
the engine's jitted step (``train.make_train_step``; bf16 compute by default) is lowered and
compiled for the local backend on abstract arguments (``jax.ShapeDtypeStruct``), once plain and
once with ``remat=True`` (``jax.checkpoint`` per encoder block), and XLA's buffer assignment of
the step is read (:func:`guft_jax.memory_plan.compiled_peak_bytes`: arguments + outputs +
temporaries - aliased). Compiled for CPU this is the CPU compiler's plan, a stand-in for the
accelerator's (``STAGES=remat bash benchmarks/accelerator.sh`` measures there).
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from benchmarks import common, harness
from guft_jax import guft, memory_plan, train, vit
from guft_jax import precision as precision_lib
from guft_jax.config import TrainConfig
from guft_jax.methods import get_method, spec

MODELS = ("ViT-B/16", "ViT-L/16", "ViT-H/14", "ViT-g/14")
CHIPS = ((1, 1), (8, 8), (64, 64), (256, 256))
# ViT-g/14's attention kernels (1408 = 2^7 * 11 wide, 16 heads of 88) do not divide by 256:
# also planned on data x fsdp = 2 x 128.
EXTRA = {"ViT-g/14": ((256, 128),)}
METHODS = {
    "full FT": lambda: get_method("full"),
    "LoRA r=8 (q,v)": lambda: get_method("lora", rank=8, alpha=16.0),
    "GUFT (sparse, 3x0.1%)": lambda: guft.guft(),
}


def mib(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def shapes_table(out=sys.stdout) -> None:
    """``--plan shapes``: the per-device memory table, as markdown, to ``out``."""
    out.write(
        "| model | method | chips | params | trainable | optimizer | GUFT state | "
        "total state | act./image (fp32) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    for model in MODELS:
        for label, make in METHODS.items():
            method = make()
            abstract = memory_plan.abstract_state(model, method, image_size=224, num_classes=1000)
            for chips, fsdp in CHIPS + EXTRA.get(model, ()):
                p = memory_plan.plan(model, method, chips, fsdp=fsdp, abstract=abstract)
                mesh = f"{chips // fsdp}x{fsdp}"
                out.write(
                    f"| {model} | {label} | {chips} ({mesh}) | {mib(p.params)} | "
                    f"{mib(p.trainable)} | {mib(p.optimizer)} | {mib(p.guft_state)} | "
                    f"{mib(p.state_total)} | {mib(p.activations_per_image)} |\n"
                )
    out.write("\nMiB per device; chips (data x fsdp).\n")


def compiled_peak(model_name, method_name, *, batch, image_size, remat, precision):
    """``(peak bytes, compile seconds)`` of the train step compiled on abstract arguments."""
    m = get_method(method_name, **(spec(method_name).defaults.kwargs or {}))
    params, state = memory_plan.abstract_state(
        model_name, m, image_size=image_size, num_classes=100
    )
    box = []

    def make(p):  # the optimizer object, built while tracing (it holds no arrays)
        tx, st = train.optimizer_for(m, p, steps_per_epoch=1, epochs=1, lr=TrainConfig().lr)
        box.append(tx)
        return st

    jax.eval_shape(make, params)
    model = vit.build_model(model_name, num_classes=100)
    model = precision_lib.with_precision(model.clone(remat=remat), precision)
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), np.float32)
    y = jax.ShapeDtypeStruct((batch,), np.int32)
    step = train.make_train_step(model, m, box[0])
    compiled, seconds = harness.compile_lowered(step.lower(state, params, x, y, ()))
    return memory_plan.compiled_peak_bytes(compiled), seconds


def compiled_plan(a) -> dict:
    """``--plan compiled``: plain vs remat peak per (model, batch) and method."""
    rows = []
    for name, batch in zip(a.models.split(","), map(int, a.batches.split(",")), strict=True):
        for meth in a.methods.split(","):
            row = dict(model=name, batch=batch, method=meth)
            for remat in (False, True):
                b, s = compiled_peak(
                    name,
                    meth,
                    batch=batch,
                    image_size=a.image_size,
                    remat=remat,
                    precision=a.precision,
                )
                row["remat" if remat else "plain"] = dict(peak_bytes=b, compile_s=s)
            row["remat_vs_plain"] = row["remat"]["peak_bytes"] / row["plain"]["peak_bytes"]
            rows.append(row)
            print(
                f"| {name} | {batch} | {meth} | {row['plain']['peak_bytes'] / 2**30:.2f} GiB | "
                f"{row['remat']['peak_bytes'] / 2**30:.2f} GiB | {row['remat_vs_plain']:.3f} |",
                flush=True,
            )
    return dict(machine=common.machine(), args=vars(a), rows=rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="shapes", choices=("shapes", "compiled"))
    ap.add_argument("--models", default="ViT-B/16,ViT-L/16", help="compiled: the models")
    ap.add_argument("--batches", default="256,64", help="compiled: one batch per model")
    ap.add_argument("--methods", default="full,lora", help="compiled: registered methods")
    ap.add_argument("--image_size", type=int, default=224, help="compiled: input size")
    ap.add_argument("--precision", default="bf16", choices=precision_lib.CHOICES)
    ap.add_argument("--out", default="benchmarks/results/remat_plan.json", help="compiled: JSON")
    a = ap.parse_args(argv)
    if a.plan == "shapes":
        shapes_table()
        return
    common.write_json(a.out, compiled_plan(a))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
