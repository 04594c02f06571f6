"""Fields shared by the experiment configs, and their validation."""

from __future__ import annotations

import numbers

import ml_collections

from guft_jax import config as config_lib
from guft_jax.config import LR_AUTO, TrainConfig
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
    # The training settings: TrainConfig's defaults (guft_jax/config.py, their single source).
    # On the command line "none" is 0 (clip_norm, stop_after_epoch) and head_lr is a number.
    t = TrainConfig()
    c.image_size = t.image_size
    c.normalization = t.normalization
    c.train_split = t.train_split
    c.eval_split = t.eval_split
    c.method = "linear"
    c.method_kwargs = ml_collections.ConfigDict()
    c.epochs = t.epochs
    c.batch_size = t.batch_size
    # a number, or "auto" (chosen on the val split, guft_jax.lr_auto): typed `object` so that
    # both parse from the command line (--config.lr=3e-4, --config.lr=auto)
    c.lr = ml_collections.FieldReference(t.lr, field_type=object)
    c.head_lr = t.head_lr_or_lr
    c.weight_decay = t.weight_decay
    c.warmup_epochs = t.warmup_epochs
    c.warmup_floor = t.warmup_floor  # the warm-up's floor in steps (config.warmup_steps)
    c.lr_auto_budget = t.lr_auto_budget  # lr="auto": the candidates' share of the epochs
    c.clip_norm = t.clip_norm or 0.0
    c.seed = t.seed
    # 0: no mesh (one process, one device); n: a (n / fsdp, fsdp) ("data", "fsdp") mesh of n
    # devices. A multi-process run (experiments.run --coordinator_address, or JAX_* variables)
    # always meshes all devices of all processes.
    c.num_devices = 0
    c.fsdp = 1  # >1: ZeRO-3 over that many devices (sharding.FSDP_RULES), batches over both axes
    c.stop_after_epoch = t.stop_after_epoch or 0  # >0: stop after that epoch (checkpointed)
    c.progress = t.progress
    # "auto": bf16 compute on GPU/TPU, fp32 on CPU (measured faster there); "fp32" | "bf16".
    c.precision = t.precision
    # "auto": uint8 splits held on GPU/TPU and resized inside jit; "host" | "device".
    c.input = t.input
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
    if c.lr != LR_AUTO and (isinstance(c.lr, str | bool) or not isinstance(c.lr, numbers.Real)
                            or c.lr < 0):  # fmt: skip
        bad("lr", c.lr, f"a number >= 0 or {LR_AUTO!r}")
    for f in ("head_lr", "weight_decay", "warmup_epochs", "clip_norm", "warmup_floor"):
        if f in c and c[f] is not None and float(c[f]) < 0:
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
    # Lists as tuples: ml_collections' flags override tuples from the command line
    # (``--config.method_kwargs.recompute_epochs="(1, 4, 7)"``), not lists.
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return ml_collections.ConfigDict(kw)


USER_DATA = ("npz:", "folder:")


def default_lr(dataset: str, registered: float) -> float | str:
    """The ``lr`` a config starts from: ``"auto"`` for users' data (``npz:`` / ``folder:``,
    split with a val split by :mod:`guft_jax.data.splits`), whose size no shipped default fits;
    the method's ``registered`` lr for the packaged datasets and VTAB, whose benchmarks select
    their own.

    >>> default_lr("npz:my.npz", 1e-3), default_lr("animal_mnist", 1e-3)
    ('auto', 0.001)
    """
    return LR_AUTO if dataset.startswith(USER_DATA) else registered


def train_config(c: ml_collections.ConfigDict, **run) -> TrainConfig:
    """The :class:`~guft_jax.config.TrainConfig` of a validated experiment config (its fields
    read by name; 0 means "none" for ``clip_norm`` and ``stop_after_epoch``); ``run`` sets the
    run-control fields (``fresh``, ``lock``, ``param_rules``, ...). The whole config becomes the
    run's ``record`` (``results.json``, the resume fingerprint)."""
    kw = {k: c[k] for k in config_lib.field_names() if k in c}
    kw["clip_norm"] = c.clip_norm or None
    kw["stop_after_epoch"] = c.stop_after_epoch or None
    return TrainConfig(**kw, record=c.to_dict(), **run)
