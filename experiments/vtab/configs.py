"""VTAB-1K configs: one per (task, method family), the protocol of SPEC.md §6.

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

Method families (ViT-B/16 settings of each paper, SPEC.md §1-3):
- ``full``, ``linear``, ``bitfit``: the common protocol.
- ``lora`` / ``dora``: rank 8, alpha 16 on query and value. ``vera``: rank 256.
- ``fourierft``: n = 3000 entries, alpha 300, spectral lr 0.2 (the head keeps 1e-3).
- ``guft``: the paper's E_list [1, 6, 11] with 0.1% per round, each shifted by one head-only
  epoch, i.e. recomputes at the start of epochs [2, 7, 12]: our task head is zero-initialised
  (vit_jax), so the backbone's gradient and GUFT's saliency are exactly zero during epoch 1 (the
  paper's timm head starts random). Set ``GUFT_HEAD_EPOCHS = 0`` for the literal [1, 6, 11].
- ``magnitude`` / ``snip`` / ``salun`` / ``fisher``: one-shot masks at GUFT's final budget
  (0.34%); the gradient scores recompute after the same head-only epoch.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import base_config

PAPER_E_LIST = (1, 6, 11)
PAPER_RATIOS = (0.001, 0.001, 0.001)
GUFT_HEAD_EPOCHS = 1  # head-only epochs before the first recompute (see the module docstring)
ONESHOT_RATIO = 0.0034
QV = (r"MultiHeadDotProductAttention_1/(query|value)/kernel$",)

# method -> (lr of the method's parameters or None for the protocol's, method kwargs)
FAMILIES: dict[str, tuple[float | None, dict]] = {
    "full": (None, {}),
    "linear": (None, {}),
    "bitfit": (None, {}),
    "lora": (None, dict(rank=8, alpha=16.0, targets=QV)),
    "dora": (None, dict(rank=8, alpha=16.0, targets=QV)),
    "vera": (None, dict(rank=256, targets=QV)),
    "fourierft": (0.2, dict(n=3000, alpha=300.0, targets=QV)),
    "guft": (
        None,
        dict(
            recompute_epochs=[e + GUFT_HEAD_EPOCHS for e in PAPER_E_LIST],
            ratios=list(PAPER_RATIOS),
        ),
    ),
    "magnitude": (None, dict(ratio=ONESHOT_RATIO)),
    "snip": (None, dict(ratio=ONESHOT_RATIO)),
    "salun": (None, dict(ratio=ONESHOT_RATIO)),
    "fisher": (None, dict(ratio=ONESHOT_RATIO)),
}
GRADIENT_ONESHOT = ("snip", "salun", "fisher")


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
    if method not in FAMILIES:
        raise ValueError(f"vtab config method: {method!r}; allowed: {sorted(FAMILIES)}")
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

    lr, kwargs = FAMILIES[method]
    kwargs = dict(kwargs)
    c.method = method
    if lr is not None:
        c.lr = lr
    if method in GRADIENT_ONESHOT:
        # The registry's one-shot factory fixes its recompute at epoch 1 (zero scores with a zero
        # head); GUFT's factory with a single round after the head-only epoch(s) is the same mask.
        c.method = "guft"
        kwargs = dict(
            recompute_epochs=[1 + GUFT_HEAD_EPOCHS],
            ratios=[kwargs["ratio"]],
            score=method,
            capacity_slack=1.0,
        )
    if dry:
        c.model, c.checkpoint, c.image_size = "ViT-tiny/4", "", 16
        c.epochs, c.batch_size, c.warmup_epochs = 1, 32, 0.0
        c.progress = False
        if "recompute_epochs" in kwargs:
            kwargs["recompute_epochs"] = [1]
            kwargs["ratios"] = [0.01]
        if method == "fourierft":
            kwargs["n"] = 64
    c.method_kwargs = ml_collections.ConfigDict(kwargs)
    return c
