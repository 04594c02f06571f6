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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, with its default.

    Attributes:
      image_size: input resolution (square), in pixels.
      batch_size: examples per step (a run needs at least one full batch per epoch).
      epochs: epochs to train (a resume may raise it).
      lr: the peak learning rate of the method's parameters (AdamW, cosine decay).
      head_lr: the task head's peak learning rate; ``None``: the same as ``lr``.
      weight_decay: AdamW's decoupled weight decay (not applied to the head's bias).
      warmup_epochs: linear warm-up length in epochs (fractions allowed).
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
      record: the run's whole experiment config (e.g. ``ConfigDict.to_dict()``), written into
        ``results.json`` and fingerprinted into every checkpoint: a resume with a different one
        is refused. ``None``: the fingerprint covers this config's fields only.
    """

    image_size: int = 56
    batch_size: int = 50
    epochs: int = 10
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
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
    record: Mapping[str, Any] | None = None

    def __post_init__(self):
        validate(self)

    @property
    def head_lr_or_lr(self) -> float:
        """The head's learning rate (``head_lr``, or ``lr`` when it is ``None``)."""
        return self.lr if self.head_lr is None else self.head_lr

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
    for name in ("lr", "weight_decay", "warmup_epochs"):
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


__all__ = ["Hooks", "TrainConfig", "defaults", "field_names", "validate"]
