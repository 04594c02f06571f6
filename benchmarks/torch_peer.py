"""The PyTorch peer of ``benchmarks.step_bench`` (``--peer torch``): timm + HF peft, optional.

Never a dependency of guft_jax: imported only when asked for, and only where ``torch``, ``timm``
and ``peft`` are importable (the accelerator image has them; CI and the CPU box do not). The
peer's train step is the usual PyTorch one: ``timm.create_model(<model>, num_classes=100)``,
cross-entropy, ``backward()``, AdamW (``fused=True`` on CUDA), under ``torch.autocast`` in
bfloat16 for ``precision="bf16"`` (TF32 matmuls allowed for ``"fp32"``), optionally wrapped in
``torch.compile``. Methods: ``full``, ``lora`` (peft ``LoraConfig(r=8, lora_alpha=16)`` on timm's
fused ``qkv``, the head trained in full), ``bitfit`` (biases and head).

``step_bench`` builds one :class:`PeerRun` per method and times its ``step()`` in the same
round-robin as its own methods (:func:`benchmarks.harness.round_robin`), so both sides see the
same machine noise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

# guft_jax model names -> timm's
TIMM_MODELS = {
    "ViT-Ti/16": "vit_tiny_patch16_224",
    "ViT-S/16": "vit_small_patch16_224",
    "ViT-B/16": "vit_base_patch16_224",
    "ViT-L/16": "vit_large_patch16_224",
    "ViT-H/14": "vit_huge_patch14_224",
}
METHODS = ("full", "lora", "bitfit")


def available() -> str | None:
    """``None`` when torch, timm and peft import, else the reason."""
    missing = [m for m in ("torch", "timm", "peft") if importlib.util.find_spec(m) is None]
    return f"not importable: {', '.join(missing)}" if missing else None


@dataclass
class PeerRun:
    name: str
    step: Any  # () -> None, synchronised
    trainable: int
    total: int
    peak_bytes: int | None


def build(model_name, method, *, image_size, batch, precision, compile_model=False) -> PeerRun:
    """One peer method, warmed up (compiled, one step run); ``run.step()`` is a timed step.

    Raises:
      ValueError: an unknown model or method, or the peer libraries missing.
    """
    why = available()
    if why:
        raise ValueError(f"--peer torch: {why}")
    if model_name not in TIMM_MODELS:
        raise ValueError(
            f"--peer torch: model {model_name!r} has no timm twin; allowed: {list(TIMM_MODELS)}"
        )
    if method not in METHODS:
        raise ValueError(f"--peer torch: method {method!r} not in {METHODS}")
    import timm
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    net = timm.create_model(
        TIMM_MODELS[model_name], pretrained=False, num_classes=100, img_size=image_size
    ).to(dev)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(
            net, LoraConfig(r=8, lora_alpha=16, target_modules=["qkv"], modules_to_save=["head"])
        )
    elif method == "bitfit":
        for n, p in net.named_parameters():
            p.requires_grad_(n.endswith("bias") or n.startswith("head"))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, fused=dev == "cuda")
    fwd = torch.compile(net) if compile_model else net
    x = torch.randn(batch, 3, image_size, image_size, device=dev)
    y = torch.arange(batch, device=dev) % 100
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=dtype, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        sync()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # compile / autotune, then one plain step
        step()
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    name = f"torch:{method}" + ("+compile" if compile_model else "")
    return PeerRun(
        name=name,
        step=step,
        trainable=sum(p.numel() for p in params),
        total=sum(p.numel() for p in net.parameters()),
        peak_bytes=peak,
    )
