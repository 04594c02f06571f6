"""The training configuration: one frozen, typed object that holds every default of a run.

:class:`TrainConfig` is the single source of the training defaults. :func:`guft_jax.train.fit`
takes one, the command line (``experiments.run``) builds its config from
:func:`TrainConfig` 's fields, and packing, the offline benchmark and the benchmarks start from
it, so a default changed here changes everywhere (``tests/test_config.py`` checks it).

>>> cfg = TrainConfig(epochs=3, lr=3e-4)
>>> cfg.batch_size, cfg.head_lr_or_lr
(50, 0.0003)
>>> cfg.replace(batch_size=32).batch_size
32

:class:`Hooks` holds what a run calls back (logging, warnings, the stop flag): functions, not
settings, so they are not part of the config nor of its fingerprint.
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
from collections.abc import Callable, Mapping
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16", None)
INPUTS = ("auto", "host", "device")
# ``TrainConfig.lr``'s one non-numeric value: choose the lr on the val split (guft_jax.lr_auto).
LR_AUTO = "auto"
# The warm-up floor's default, in steps (see TrainConfig.warmup_floor and warmup_steps).
WARMUP_FLOOR = 100


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, with its default.

    Attributes:
      image_size: input resolution (square), in pixels.
      batch_size: examples per step (a run needs at least one full batch per epoch).
      epochs: epochs to train (a resume may raise it).
      lr: the peak learning rate of the method's parameters (AdamW, cosine decay), or
        ``"auto"``: the method's lr grid is trained briefly, packed in one program, and the lr
        with the best val accuracy is used (:mod:`guft_jax.lr_auto`; needs a val split).
      head_lr: the task head's peak learning rate; ``None``: the same as ``lr``.
      weight_decay: AdamW's decoupled weight decay (not applied to the head's bias).
      warmup_epochs: linear warm-up length in epochs (fractions allowed); ``0``: none.
      warmup_floor: the shortest warm-up in steps when ``warmup_epochs > 0``, capped at a
        quarter of the run (:func:`warmup_steps`): a small dataset's epoch is a few steps.
      clip_norm: global gradient-norm clip; ``None``: no clipping.
      seed: the run's seed (initialisation, shuffling, dropout, GUFT's tie-breaks).
      normalization: the image normalization (:data:`guft_jax.data.NORMALIZATIONS`).
      train_split: the split trained on (``trainval`` = VTAB-1K's ``train800val200``).
      eval_split: the split evaluated once at the end (``None``: none).
      precision: ``"auto"`` (bf16 on GPU/TPU, fp32 on CPU), ``"fp32"``, ``"bf16"``, or ``None``
        (the model's own dtype); see :mod:`guft_jax.precision`.
      input: ``"auto"``, ``"host"`` or ``"device"`` (:func:`guft_jax.train.resolve_input`).
      param_rules: sharding rules of the frozen params over a mesh (e.g.
        :data:`guft_jax.sharding.FSDP_RULES`).
      state_rules: sharding rules of the train state; ``None``: ``param_rules``.
      progress: show tqdm progress bars.
      fresh: delete the workdir's checkpoints, metrics, events and results first.
      lock: take the workdir's lock (``False`` when the caller already holds it).
      stop_after_epoch: end the run after that epoch's checkpoint (to test resuming).
      lr_auto_budget: with ``lr="auto"``, the candidates' training length as a fraction of
        ``epochs`` (at least one epoch and :data:`guft_jax.lr_auto.MIN_STEPS` steps).
      record: the run's whole experiment config (e.g. ``ConfigDict.to_dict()``), written into
        ``results.json`` and fingerprinted into every checkpoint: a resume with a different one
        is refused. ``None``: the fingerprint covers this config's fields only.
    """

    image_size: int = 56
    batch_size: int = 50
    epochs: int = 10
    lr: float | str = 1e-3
    head_lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    warmup_floor: int = WARMUP_FLOOR
    clip_norm: float | None = None
    seed: int = 0
    normalization: str = "imagenet"
    train_split: str = "trainval"
    eval_split: str | None = "test"
    precision: str | None = "auto"
    input: str = "auto"
    param_rules: tuple = ()
    state_rules: tuple | None = None
    progress: bool = True
    fresh: bool = False
    lock: bool = True
    stop_after_epoch: int | None = None
    lr_auto_budget: float = 0.3
    record: Mapping[str, Any] | None = None

    def __post_init__(self):
        validate(self)

    @property
    def head_lr_or_lr(self) -> float | str:
        """The head's learning rate (``head_lr``, or ``lr`` when it is ``None``)."""
        return self.lr if self.head_lr is None else self.head_lr

    @property
    def lr_is_auto(self) -> bool:
        """``lr == "auto"``: the lr is chosen on the val split before the run."""
        return isinstance(self.lr, str)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)


def field_names() -> tuple[str, ...]:
    """The names of :class:`TrainConfig` 's fields, in order."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def defaults() -> dict[str, Any]:
    """``{field: default}`` of every :class:`TrainConfig` field."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _bad(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"TrainConfig.{field}: {value!r} is not allowed; allowed: {allowed}")


def validate(c: TrainConfig) -> None:
    """Raises ValueError naming the first bad field and its allowed values."""
    for name in ("image_size", "batch_size", "epochs"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise _bad(name, v, "an integer >= 1")
    if c.lr != LR_AUTO and (isinstance(c.lr, str | bool) or not isinstance(c.lr, numbers.Real)
                             or c.lr < 0):  # fmt: skip
        raise _bad("lr", c.lr, f"a number >= 0 or {LR_AUTO!r}")
    if (
        isinstance(c.warmup_floor, bool)
        or not isinstance(c.warmup_floor, numbers.Integral)
        or (c.warmup_floor < 0)
    ):
        raise _bad("warmup_floor", c.warmup_floor, "an integer >= 0")
    if (
        isinstance(c.lr_auto_budget, bool)
        or not isinstance(c.lr_auto_budget, numbers.Real)
        or not (0 < c.lr_auto_budget <= 1)
    ):
        raise _bad("lr_auto_budget", c.lr_auto_budget, "a number in (0, 1]")
    for name in ("weight_decay", "warmup_epochs"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v < 0:
            raise _bad(name, v, "a number >= 0")
    for name in ("head_lr", "clip_norm"):
        v = getattr(c, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or v < 0):
            raise _bad(name, v, "None or a number >= 0")
    if c.precision not in PRECISIONS:
        raise _bad("precision", c.precision, ", ".join(map(repr, PRECISIONS)))
    if c.input not in INPUTS:
        raise _bad("input", c.input, ", ".join(map(repr, INPUTS)))
    if c.stop_after_epoch is not None and c.stop_after_epoch < 1:
        raise _bad("stop_after_epoch", c.stop_after_epoch, "None or an integer >= 1")


def warmup_steps(
    *, warmup_epochs: float, steps_per_epoch: int, total_steps: int, floor: int = WARMUP_FLOOR
) -> int:
    """The linear warm-up's length in steps: ``warmup_epochs`` with a floor in steps.

    ``max(round(warmup_epochs * steps_per_epoch), min(floor, total_steps // 4))`` when
    ``warmup_epochs > 0``, else 0. An epoch-counted warm-up alone depends on the dataset's size
    by accident: one epoch of 210 images at batch 50 is 4 steps, after which AdamW takes
    full-size steps with second-moment estimates from 4 gradients (full fine-tuning of a
    300-image set diverged at epoch 2 that way). Untuned warm-up for Adam should last about
    ``2 / (1 - b2)`` steps (arXiv 1910.04209; 2,000 at b2 = 0.999), more than a small run has,
    so the floor is ``floor`` steps (default 100: below the VTAB-1K protocol's 10 epochs x 12
    steps, which it leaves unchanged), capped at a quarter of the run so that the cosine decay
    keeps at least three quarters of it.

    >>> warmup_steps(warmup_epochs=1.0, steps_per_epoch=4, total_steps=40)
    10
    >>> warmup_steps(warmup_epochs=10.0, steps_per_epoch=12, total_steps=1200)
    120
    """
    if warmup_epochs <= 0:
        return 0
    return max(int(round(warmup_epochs * steps_per_epoch)), min(floor, total_steps // 4))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What a run calls back.

    Attributes:
      log: receives the run's progress lines (process 0 only).
      warn: receives damaged-checkpoint and fallback notices (default: stderr).
      stop: asked after every step (e.g. a Ctrl-C handler's flag): when it returns true the run
        ends with :class:`~guft_jax.errors.Interrupted` after that step.
    """

    log: Callable[[str], None] = print
    warn: Callable[[str], None] = _stderr
    stop: Callable[[], bool] | None = None


__all__ = [
    "LR_AUTO",
    "WARMUP_FLOOR",
    "Hooks",
    "TrainConfig",
    "defaults",
    "field_names",
    "validate",
    "warmup_steps",
]
