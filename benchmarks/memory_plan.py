"""The README's memory-plan table: bytes per device for ViT-B/L/H/g x {full FT, LoRA, GUFT} x
{1, 8, 64, 256} chips, from shapes only (``jax.eval_shape`` + the fsdp rules; no allocation).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/memory_plan.py > results/memory_plan.md
"""

from __future__ import annotations

import sys

from guft_jax import guft, memory_plan
from guft_jax.methods import get_method

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


def main(out=sys.stdout) -> None:
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


if __name__ == "__main__":
    main()
