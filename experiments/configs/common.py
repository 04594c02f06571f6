"""Fields shared by the experiment configs, and their validation."""

from __future__ import annotations

import ml_collections

from guft_jax.data import NORMALIZATIONS, SPLITS
from guft_jax.methods import method_names
from guft_jax.vit import CONFIGS

PRETRAINED = ("dinov2_s14",)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "dinov2_s14"  # a pretrained name, or a ViT config name (random init)
    c.checkpoint = ""  # optional .npz / .safetensors path for ViT config names
    c.dataset = "animal_mnist"
    # offline / user data: 0 = the split rule's default; a count (>= 1) or a fraction in (0, 1).
    # Floats, so that fractions parse from the command line.
    c.train_size = 0.0
    c.val_size = 0.0
    c.test_size = 0.0
    c.skip_bad = False  # folder: data: skip unreadable images (counted in results.json)
    c.image_size = 56
    c.normalization = "imagenet"
    c.train_split = "train800val200"
    c.eval_split = "test"
    c.method = "linear"
    c.method_kwargs = ml_collections.ConfigDict()
    c.epochs = 10
    c.batch_size = 50
    c.lr = 1e-3
    c.head_lr = 1e-3
    c.weight_decay = 1e-4
    c.warmup_epochs = 1.0
    c.clip_norm = 0.0
    c.seed = 0
    # 0: no mesh (one process, one device); n: a (n / fsdp, fsdp) ("data", "fsdp") mesh of n
    # devices. A multi-process run (experiments.run --coordinator_address, or JAX_* variables)
    # always meshes all devices of all processes.
    c.num_devices = 0
    c.fsdp = 1  # >1: ZeRO-3 over that many devices (sharding.FSDP_RULES), batches over both axes
    c.stop_after_epoch = 0  # >0: stop after that epoch (checkpointed) to test resuming
    c.progress = True
    # "auto": bf16 compute on GPU/TPU, fp32 on CPU (measured faster there); "fp32" | "bf16".
    c.precision = "auto"
    # "auto": uint8 splits held on GPU/TPU and resized inside jit; "host" | "device".
    c.input = "auto"
    c.remat = False  # rematerialise each encoder block in the backward (less activation memory)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field and its allowed values."""

    def bad(field, value, allowed):
        raise ValueError(f"config.{field}: {value!r} is not allowed; allowed: {allowed}")

    if c.method not in method_names():
        bad("method", c.method, sorted(method_names()))
    if c.model not in PRETRAINED and c.model not in CONFIGS:
        bad("model", c.model, list(PRETRAINED) + sorted(CONFIGS))
    if c.normalization not in NORMALIZATIONS:
        bad("normalization", c.normalization, list(NORMALIZATIONS))
    for f in ("train_split", "eval_split"):
        if c[f] not in SPLITS:
            bad(f, c[f], list(SPLITS))
    from guft_jax.data import OFFLINE
    from guft_jax.data.vtab import TASKS

    ds = c.dataset
    if not (ds in OFFLINE or ds.startswith(("npz:", "folder:")) or ds[len("vtab/") :] in TASKS):
        bad(
            "dataset",
            ds,
            sorted(OFFLINE) + ["npz:PATH", "folder:PATH"] + [f"vtab/{t}" for t in sorted(TASKS)],
        )
    from guft_jax.precision import CHOICES
    from guft_jax.train import INPUTS

    if c.precision not in CHOICES:
        bad("precision", c.precision, list(CHOICES))
    if c.input not in INPUTS:
        bad("input", c.input, list(INPUTS))
    for f, lo in (("epochs", 1), ("batch_size", 1), ("image_size", 1), ("fsdp", 1)):
        if int(c[f]) < lo:
            bad(f, c[f], f">= {lo}")
    for f in ("lr", "head_lr", "weight_decay", "warmup_epochs", "clip_norm"):
        if float(c[f]) < 0:
            bad(f, c[f], ">= 0")


def method_kwargs(method: str, *overrides: dict | None) -> ml_collections.ConfigDict:
    """Every keyword of the method's factory with its default (so any of them can be set from the
    command line, ``--config.method_kwargs.NAME=...``), then ``overrides`` in order."""
    import inspect

    from guft_jax.methods import spec

    s = spec(method)
    kw = {
        name: p.default
        for name, p in inspect.signature(s.factory).parameters.items()
        if name not in s.fixed and p.default is not inspect.Parameter.empty and name != "name"
    }
    for o in overrides:
        kw.update(o or {})
    return ml_collections.ConfigDict(kw)
