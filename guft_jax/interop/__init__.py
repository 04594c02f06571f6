"""PyTorch interop: timm / Hugging Face checkpoints and Hugging Face PEFT adapters.

- :mod:`guft_jax.interop.timm_io`: :func:`load_timm` (timm ViT/DeiT/DINOv2-style checkpoints),
  :func:`export_timm` / :func:`export_hf` (merged guft_jax params as PyTorch state dicts).
- :mod:`guft_jax.interop.peft_io`: :func:`save_peft` / :func:`load_peft` (PEFT 0.17 adapters for
  LoRA, DoRA, VeRA, FourierFT, AdaLoRA, (IA)³, LN tuning, LoHa, LoKr, OFT, BOFT, HRA, and GUFT /
  one-shot masks as SHiRA), one table entry per method (:data:`CONVERTERS`), the entries in one
  module per family (``peft_lowrank``, ``peft_seeded``, ``peft_sparse``, ``peft_scaling``).

Nothing here imports torch: arrays cross to PyTorch as safetensors files.
"""

from guft_jax.interop.peft_io import CONVERTERS, Loaded, load_peft, save_peft, torch_randperm
from guft_jax.interop.timm_io import export_hf, export_timm, load_timm, timm_to_flat

__all__ = [
    "CONVERTERS",
    "Loaded",
    "export_hf",
    "export_timm",
    "load_peft",
    "load_timm",
    "save_peft",
    "timm_to_flat",
    "torch_randperm",
]
