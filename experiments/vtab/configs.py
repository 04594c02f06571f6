"""VTAB-1K configs: one per (task, method family), under the VTAB-1K protocol below.

    python -m experiments.run --config experiments/vtab/configs.py:cifar100,guft \
        --workdir runs/vtab/cifar100_guft_0 --config.checkpoint=/path/ViT-B_16.npz

(``experiments.vtab.sweep`` runs the 19 tasks x methods x seeds and passes ``data_dir`` /
``version``; the plain ``experiments.run`` command reads tfds' default data_dir, e.g.
``TFDS_DATA_DIR``.) The argument is ``task,method`` or ``task,method,dry``; ``dry`` is the CI dry
run: a tiny random ViT at 16 px, 1 epoch, batch 32, on ``tfds.testing.mock_data``.

Protocol (google-research/task_adaptation; NOAH, VPT, SSF, GPS): ViT-B/16 ImageNet-21k
(``ViT-B_16.npz``, vit_jax layout; ``pre_logits`` dropped), images resized straight to 224 px, no
augmentation, train on train800val200, report the last epoch's accuracy on test; AdamW, lr 1e-3,
weight decay 1e-4, batch 64, 100 epochs, cosine decay with 10 warm-up epochs. Normalisation is a
flag (``imagenet``: NOAH/VPT/FacT; ``0.5``: SSF/GPS and the HF in21k weights).

Per-method settings come from the registry (each method's ``Defaults``: ``vtab_lr``,
``vtab_kwargs``, ``dry_kwargs``; the settings of each method's paper), so a newly registered
method has a VTAB config with no edit here:
- ``full``, ``linear``, ``bitfit``: the common protocol.
- ``lora`` / ``dora``: rank 8, alpha 16 on query and value. ``vera``: rank 256.
- ``fourierft``: n = 3000 entries, alpha 300, spectral lr 0.2 (the head keeps 1e-3).
- ``guft``: the paper's 0.1% per round with ``recompute_epochs=None``, i.e.
  ``guft.auto_schedule(100, 3) = [1, 6, 11]``, the paper's E_list. Our task head is
  zero-initialised (as vit_jax's), so the epoch-1 saliency goes through a head fitted on the
  frozen backbone (``head_warmup``; the paper's timm head starts random).
- ``magnitude`` / ``snip`` / ``salun`` / ``fisher``: one-shot masks at GUFT's final budget
  (0.34%) at the start of epoch 1, the same way.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import base_config, method_kwargs
from guft_jax.methods import method_names, spec


def get_config(arg: str = "cifar100,guft") -> ml_collections.ConfigDict:
    """``task,method[,dry]`` -> the run's config (validated by ``experiments.configs.common``).

    Raises:
      ValueError: unknown task, method or mode (the message lists the allowed values).
    """
    from guft_jax.data.vtab import TASKS

    parts = arg.split(",")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "dry"):
        raise ValueError(f"vtab config arg: {arg!r}; expected 'task,method' or 'task,method,dry'")
    task, method = parts[:2]
    if task not in TASKS:
        raise ValueError(f"vtab config task: {task!r}; allowed: {sorted(TASKS)}")
    if method not in method_names():
        raise ValueError(f"vtab config method: {method!r}; allowed: {sorted(method_names())}")
    dry = len(parts) == 3

    c = base_config()
    c.task, c.family = task, method
    c.dataset = f"vtab/{task}"
    c.data_dir = ""  # tfds data_dir holding the prepared datasets ("" = tfds' default)
    c.version = ""  # tfds version override, e.g. "4.*.*" for oxford_iiit_pet built by tfds >= 4.9
    c.model = "ViT-B/16"
    c.checkpoint = "ViT-B_16.npz"  # google-research/vision_transformer ImageNet-21k weights
    c.image_size = 224
    c.normalization = "imagenet"
    c.train_split, c.eval_split = "train800val200", "test"
    c.batch_size = 64
    c.epochs = 100
    c.warmup_epochs = 10.0
    c.lr = c.head_lr = 1e-3
    c.weight_decay = 1e-4
    c.clip_norm = 0.0
    c.progress = True

    d = spec(method).defaults
    kwargs = dict(d.vtab_kwargs if d.vtab_kwargs is not None else (d.kwargs or {}))
    kwargs = method_kwargs(method, kwargs).to_dict()
    c.method = method
    if d.vtab_lr is not None:
        c.lr = d.vtab_lr
    if dry:
        c.model, c.checkpoint, c.image_size = "ViT-tiny/4", "", 16
        c.epochs, c.batch_size, c.warmup_epochs = 1, 32, 0.0
        c.progress = False
        kwargs.update(d.dry_kwargs or {})
    c.method_kwargs = ml_collections.ConfigDict(kwargs)
    return c
