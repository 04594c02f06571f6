"""``TrainConfig.lr = "auto"``: the learning rate chosen on the val split before the run.

The method's registered val grid (``Defaults.lr_grid``: factors of its registered ``lr``, of its
``head_lr`` for head-only methods) is trained on the ``train`` split, every candidate at once in
one packed program (:func:`guft_jax.packing.fit_packed`: a vmapped run axis, the learning rates
as data), for a short budget; each candidate is scored on the ``val`` split, never on ``test``.
A candidate that the divergence guard flags (:func:`guft_jax.epochs.divergence`: a non-finite
loss, or epoch losses above 1.5x the first epoch's for 2 epochs) is dropped; the best val
accuracy among the rest is chosen (ties: the lower val loss, then the smaller lr). The table of
candidates is logged and the choice is recorded in ``results.json`` as ``lr_auto``.

The budget is :attr:`~guft_jax.config.TrainConfig.lr_auto_budget` (default 0.3) of the run's
epochs, at least :data:`MIN_EPOCHS` epochs (the guard needs its reference epoch and two more)
and :data:`MIN_STEPS` steps, at most the run's epochs. The candidates keep the run's schedule
shape (warm-up with its floor, cosine decay over their budget), so a lr that diverges at the
warm-up's peak diverges there too. A method with a sparse training path (GUFT, the one-shot
masks) selects on its dense path, whose shapes agree across runs (the updates are the same).

>>> from guft_jax.config import TrainConfig
>>> budget_epochs(TrainConfig(epochs=10), steps_per_epoch=16)
3
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from guft_jax.config import LR_AUTO, TrainConfig
from guft_jax.epochs import DIVERGE_PATIENCE, divergence, steps_per_epoch
from guft_jax.methods import base as mbase
from guft_jax.methods.base import Method

MIN_STEPS = 20  # the fewest steps a candidate trains: a warm-up and a few steps at its peak
MIN_EPOCHS = DIVERGE_PATIENCE + 1
TRAIN, VAL = "train", "val"  # the splits the candidates train on and are scored on


class Candidate(NamedTuple):
    """One lr tried: its rates, val score, last epoch's training loss and the guard's verdict."""

    lr: float
    head_lr: float
    val_accuracy: float
    val_loss: float
    train_loss: float
    diverged: bool


def grid(method: Method, config: TrainConfig) -> tuple[list[float], list[float]]:
    """``(lrs, head_lrs)`` of the candidates: the registered grid's factors of the method's
    registered ``lr`` (of ``head_lr`` for a head-only method, ``Defaults.select_head_lr``);
    ``config.head_lr`` (if set) replaces the registered head lr. A method that is not registered
    gets :class:`~guft_jax.methods.base.Defaults`' grid around its defaults."""
    try:
        d = mbase.spec(method.name).defaults
    except ValueError:
        d = mbase.Defaults()
    head = d.head_lr if config.head_lr is None else config.head_lr
    scaled = [_round(base * f) for base in [head if d.select_head_lr else d.lr] for f in d.lr_grid]
    if d.select_head_lr:
        return [d.lr] * len(scaled), scaled
    return scaled, [head] * len(scaled)


def _round(lr: float) -> float:
    """``lr`` to 6 significant digits (3e-4, not the product's 0.00030000000000000003)."""
    return float(f"{lr:.6g}")


def budget_epochs(config: TrainConfig, *, steps_per_epoch: int) -> int:
    """The candidates' epochs (see the module docstring)."""
    want = max(
        math.ceil(config.lr_auto_budget * config.epochs),
        MIN_EPOCHS,
        math.ceil(MIN_STEPS / steps_per_epoch),
    )
    return min(config.epochs, want)


def _val_size(source) -> int:
    try:
        return int(source.size(VAL))
    except (ValueError, KeyError):  # InputError is a ValueError
        return 0


def _dense(method: Method) -> Method:
    """The method on its dense path when it has a sparse one (shapes that pack)."""
    hp = dict(method.hparams or {})
    if not hp.get("sparse"):
        return method
    try:
        return mbase.get_method(method.name, **dict(hp, sparse=False))
    except ValueError:
        return method


def table(candidates: list[Candidate], chosen: float | None) -> str:
    """The candidates as a text table (the chosen row marked)."""
    lines = ["lr_auto: lr        head_lr   val_acc  val_loss  train_loss  diverged"]
    for c in candidates:
        mark = "  <- chosen" if chosen is not None and (c.lr, c.head_lr) == chosen else ""
        lines.append(
            f"lr_auto: {c.lr:<9.3g} {c.head_lr:<9.3g} {c.val_accuracy:<8.4f} {c.val_loss:<9.4g} "
            f"{c.train_loss:<11.4g} {'yes' if c.diverged else 'no'}{mark}"
        )
    return "\n".join(lines)


def pick(candidates: list[Candidate]) -> Candidate | None:
    """The best candidate the guard did not drop (val accuracy, then val loss, then the
    smaller lr), or ``None`` when every one diverged."""
    kept = [c for c in candidates if not c.diverged]
    if not kept:
        return None
    return min(kept, key=lambda c: (-c.val_accuracy, c.val_loss, c.lr, c.head_lr))


def choose(
    model,
    params,
    method: Method,
    source,
    config: TrainConfig,
    *,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> tuple[TrainConfig, dict[str, Any]]:
    """Resolves ``config.lr == "auto"``: ``(config with the chosen lr, the lr_auto record)``.

    Args:
      model: the Flax model.
      params: its pretrained params.
      method: the method trained.
      source: the data source; its ``train`` split trains the candidates, its ``val`` split
        scores them.
      config: the run's config (``lr="auto"``; a numeric ``lr`` is returned unchanged, with
        ``None`` as the record).
      log: receives the candidates' table.
      warn: receives the guard's lines and the all-diverged notice.

    Returns:
      The config with the chosen ``lr`` (and ``head_lr``) and the record: ``candidates`` (each
      with ``lr``, ``head_lr``, ``val_accuracy``, ``val_loss``, ``train_loss``, ``diverged``),
      ``chosen``, ``chosen_head_lr``, ``epochs``, ``train_split``, ``val_split``.

    Raises:
      ValueError: naming ``lr`` when the source has no val split to choose on.
    """
    from guft_jax import packing  # packing imports train, which imports this module's users

    if not config.lr_is_auto:
        return config, None
    if _val_size(source) < 1:
        raise ValueError(
            f"lr: {LR_AUTO!r} chooses on the val split, and {getattr(source, 'name', 'the data')}"
            " has none; give a number (e.g. the method's registered lr) or a val split"
        )
    lrs, head_lrs = grid(method, config)
    spe = steps_per_epoch(config, None, source.size(TRAIN))
    epochs = budget_epochs(config, steps_per_epoch=spe)
    sel = config.replace(
        lr=lrs[0], head_lr=head_lrs[0], epochs=epochs, train_split=TRAIN, eval_split=VAL,
        progress=False, stop_after_epoch=None, record=None,
    )  # fmt: skip
    log(f"lr_auto: {len(lrs)} candidates, {epochs} epochs on {TRAIN!r}, scored on {VAL!r}")
    n = len(lrs)
    _, runs = packing.fit_packed(
        model, params, _dense(method), [source] * n, sel,
        lrs=lrs, head_lrs=head_lrs, seeds=[config.seed] * n,
    )  # fmt: skip
    cands = []
    for lr, head, r in zip(lrs, head_lrs, runs, strict=True):
        losses = [h["train_loss"] for h in r["history"]]
        at = divergence(losses)
        if at is not None:
            rec = r["history"][at - 1]
            warn(
                f"diverging: lr {lr:g} (head lr {head:g}): training loss {rec['train_loss']:.4g} "
                f"at step {rec['step']} (epoch {at}); lr_auto drops this candidate"
            )
        cands.append(Candidate(lr, head, float(r[f"{VAL}_accuracy"]), float(r[f"{VAL}_loss"]),
                               float(losses[-1]), at is not None))  # fmt: skip
    best = pick(cands)
    if best is None:
        best = min(cands, key=lambda c: (c.lr, c.head_lr))
        warn(f"lr_auto: every candidate diverged; using the smallest, lr {best.lr:g}")
    for line in table(cands, (best.lr, best.head_lr)).splitlines():
        log(line)
    record = {
        "candidates": [c._asdict() for c in cands],
        "chosen": best.lr,
        "chosen_head_lr": best.head_lr,
        "epochs": epochs,
        "train_split": TRAIN,
        "val_split": VAL,
    }
    return config.replace(lr=best.lr, head_lr=best.head_lr), record


__all__ = [
    "MIN_EPOCHS",
    "MIN_STEPS",
    "Candidate",
    "budget_epochs",
    "choose",
    "grid",
    "pick",
    "table",
]
