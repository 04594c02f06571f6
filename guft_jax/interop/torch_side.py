"""The PyTorch side of the interop tests: run with the torch venv's python, never imported.

``python guft_jax/interop/torch_side.py jobs.json`` reads a list of jobs, runs them with real
timm / Hugging Face transformers / PEFT on CPU and writes every result array to one ``.npz``
(the JAX side needs numpy 2 and torch 1.13 needs numpy 1, so the two sides share files only).
Set up the environment with ``tools/torch_env.sh``.

Jobs (``{"kind": ..., "out": result name, ...}``; ``images``: a job's own ``.npy`` NHWC images
instead of the spec's):

- ``logits``: build ``model`` (``base``: ``timm`` or ``hf``), load ``weights`` (safetensors,
  strict), optionally ``updates`` (strict=False) and the PEFT ``adapter`` directory
  (``PeftModel.from_pretrained``); logits of the images.
- ``make_adapter``: ``get_peft_model(model, <peft_type>Config(**config))`` on the loaded base,
  every trainable adapter weight set to seeded noise, ``save_pretrained(dir)``; its logits.
- ``randperm``: ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``.
- ``timm_init``: a timm ``VisionTransformer`` with timm's own random init; its state dict saved
  to ``weights`` and its logits.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import torch


def build(base: str, cfg: dict):
    """A timm ``VisionTransformer`` or HF ``ViTForImageClassification`` of ``cfg``'s sizes."""
    if base == "timm":
        from timm.models.vision_transformer import VisionTransformer

        act = (
            functools.partial(torch.nn.GELU, approximate="tanh")
            if cfg.get("gelu") == "tanh"
            else torch.nn.GELU
        )
        return VisionTransformer(
            img_size=cfg["img_size"],
            patch_size=cfg["patch_size"],
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            mlp_ratio=cfg["mlp_dim"] / cfg["embed_dim"],
            num_classes=cfg["num_classes"],
            qkv_bias=True,
            class_token=True,
            global_pool="token",
            act_layer=act,
        )
    from transformers import ViTConfig, ViTForImageClassification

    conf = ViTConfig(
        hidden_size=cfg["embed_dim"],
        num_hidden_layers=cfg["depth"],
        num_attention_heads=cfg["num_heads"],
        intermediate_size=cfg["mlp_dim"],
        image_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        num_labels=cfg["num_classes"],
        hidden_act="gelu_pytorch_tanh" if cfg.get("gelu") == "tanh" else "gelu",
        layer_norm_eps=cfg.get("eps", 1e-12),
        qkv_bias=True,
    )
    return ViTForImageClassification(conf)


def logits(model, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out).numpy()


def load_base(job: dict):
    from safetensors.torch import load_file

    model = build(job["base"], job["model"])
    model.load_state_dict(load_file(job["weights"]), strict=True)
    if job.get("updates"):
        model.load_state_dict(load_file(job["updates"]), strict=False)
    return model.eval()


def randomize(model, seed: int, scale: float) -> None:
    """Seeded noise on every trainable weight (adapter factors and the saved head); scales,
    magnitudes and LayerNorm copies are perturbed around their values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g) * scale
            mult = any(s in name for s in ("magnitude", "ia3_l", "ln_tuning", "boft_s"))
            p.copy_(p * (1 + noise) if mult else noise)


def run(job: dict, images: np.ndarray) -> np.ndarray:
    kind = job["kind"]
    if kind == "randperm":
        gen = torch.Generator().manual_seed(job["seed"])
        return torch.randperm(job["n"], generator=gen).numpy()
    if kind == "timm_init":
        from safetensors.torch import save_file

        torch.manual_seed(job["seed"])
        model = build("timm", job["model"]).eval()
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, job["weights"])
        return logits(model, images)
    if kind == "logits":
        model = load_base(job)
        if job.get("adapter"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, job["adapter"]).eval()
        return logits(model, images)
    if kind == "make_adapter":
        import peft

        model = load_base(job)
        config = getattr(peft, job["config_class"])(**job["config"])
        model = peft.get_peft_model(model, config)
        randomize(model, job.get("seed", 0), job.get("scale", 0.1))
        model.save_pretrained(job["dir"])
        return logits(model.eval(), images)
    raise ValueError(f"torch_side: unknown job kind {kind!r}")


def main(path: str) -> None:
    with open(path) as f:
        spec = json.load(f)
    images = np.load(spec["images"]).astype(np.float32)
    results = {}
    for job in spec["jobs"]:
        imgs = np.load(job["images"]).astype(np.float32) if "images" in job else images
        results[job["out"]] = run(job, imgs)
    np.savez(spec["results"], **results)


if __name__ == "__main__":
    main(sys.argv[1])
