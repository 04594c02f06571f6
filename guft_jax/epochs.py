"""The epoch loop: a run's static parts, its batches (host or device), the method's epoch-start
hook, one epoch of jitted steps and its record, and the run's evaluation and results.

:func:`run_steps` is the loop over one epoch's batches that :func:`guft_jax.train.fit` and
:func:`guft_jax.packing.fit_packed` share; :func:`epoch_record` is the record both write.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from guft_jax import device_input, distributed
from guft_jax import paths as paths_lib
from guft_jax import sharding as shard_lib
from guft_jax.config import INPUTS, TrainConfig
from guft_jax.errors import Interrupted
from guft_jax.methods import base as mbase
from guft_jax.methods.base import EpochContext, Method, forward, trained_counts
from guft_jax.step import TrainState


class RunParts(NamedTuple):
    """The static pieces of one run, built once by :func:`guft_jax.train.fit`."""

    model: Any
    method: Method
    source: Any
    params: Any
    step_fn: Callable
    eval_fn: Callable
    mesh: Any
    shardings: tuple | None
    traces: list
    config: TrainConfig
    device_splits: dict  # split -> DeviceSplit (input="device"), else empty
    steps_per_epoch: int
    backbone: int
    log: Callable


def steps_per_epoch(config: TrainConfig, mesh, n_train: int) -> int:
    """Full batches per epoch; raises ValueError naming ``batch_size`` when there is none or it
    does not divide over the mesh's devices."""
    if mesh is not None and config.batch_size % mesh.devices.size:
        raise ValueError(
            f"batch_size: {config.batch_size} not divisible by {mesh.devices.size} devices"
        )
    steps = n_train // config.batch_size
    if steps < 1:
        raise ValueError(f"batch_size: {config.batch_size} exceeds the {n_train} training examples")
    return steps


def resolve_input(input: str, source, *, mesh=None, backend: str | None = None) -> str:
    """``"host"`` or ``"device"`` for :func:`fit`'s ``input`` option.

    ``"device"`` keeps each split's uint8 images on the device and resizes + normalises them
    inside jit (:mod:`guft_jax.device_input`), so the host does no per-step work. ``"auto"``
    picks it on GPU/TPU for a single process whose source can hand over its raw split
    (``source.raw``). On CPU device and host are the same memory and the two measure alike
    (``benchmarks/results/fit_bench.json``: fit / bare step 0.96 host, 1.00-1.03 device), so
    ``"auto"`` keeps the host pipeline, which every source has.

    Raises:
      ValueError: an unknown ``input``, or ``"device"`` for a source without ``raw``.
    """
    if input not in INPUTS:
        raise ValueError(f"input: must be one of {', '.join(INPUTS)}; got {input!r}")
    can = hasattr(source, "raw") and jax.process_count() == 1
    if input == "device" and not can:
        raise ValueError(
            "input: 'device' needs a single process and a source with raw(split) "
            f"({type(source).__name__}); use input='host'"
        )
    if input == "auto":
        backend = backend or jax.default_backend()
        return "device" if can and backend != "cpu" else "host"
    return input


def device_splits(source, splits, *, mesh, log) -> dict:
    """``{split: DeviceSplit}`` for the splits that fit on the device (others stay on host)."""
    out = {}
    dev = None if mesh is None else shard_lib.replicated(mesh)
    for split in dict.fromkeys(s for s in splits if s):
        try:
            out[split] = device_input.from_source(source, split, device=dev)
        except ValueError as e:  # too large for the device: that split stays on the host
            log(f"input: split {split!r} stays on the host ({e})")
    if out:
        mb = sum(d.nbytes for d in out.values()) / 2**20
        log(f"input: {', '.join(out)} held on the device as uint8 ({mb:.1f} MiB)")
    return out


def batches(run: RunParts, split: str, **kw):
    """``split``'s batches at the run's size and normalization: from the device-held uint8 split
    when there is one, else from the source's host pipeline."""
    c = run.config
    size = dict(batch_size=c.batch_size, image_size=c.image_size, normalization=c.normalization)
    dev = run.device_splits.get(split)
    if dev is not None:
        return device_input.device_batches(dev, **size, **kw)
    return run.source.batches(split, **size, **kw)


def epoch_start(
    model,
    method: Method,
    params,
    state: TrainState,
    epoch: int,
    *,
    batches: Callable,
    epochs: int,
    log: Callable[[str], None] = print,
) -> TrainState:
    """Runs ``MethodHooks.epoch_start`` (if any) with an :class:`EpochContext`; ``batches()``
    iterates over the training set's numpy batches."""
    hook = method.hooks.epoch_start
    if hook is None:
        return state
    ctx = EpochContext(
        params=params,
        trainable=state.trainable,
        opt_state=state.opt_state,
        state=state.method_state,
        loss_fn=det_loss(model),
        batches=batches,
        log=log,
        epochs=epochs,
        forward=lambda p, t, s, x: forward(model, method, p, t, s, x),
    )
    tr, opt, ms = hook(epoch, ctx)
    return state._replace(trainable=tr, opt_state=opt, method_state=ms)


def run_epoch_start(run: RunParts, epoch: int, state: TrainState) -> TrainState:
    """:func:`epoch_start` on the run's training split, the state placed back on its shardings."""
    state = epoch_start(
        run.model,
        run.method,
        run.params,
        state,
        epoch,
        batches=lambda: batches(run, run.config.train_split),
        epochs=run.config.epochs,
        log=run.log,
    )
    return jax.device_put(state, run.shardings[0](state)) if run.shardings is not None else state


@functools.lru_cache(maxsize=8)
def det_loss(model):
    """Per-example deterministic losses of plain variables, jitted once per model (the last 8
    models are kept: a cache that does not grow with the runs of a process)."""
    return jax.jit(
        lambda variables, x, y: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(variables, x, deterministic=True).astype(jnp.float32), y
        )
    )


class EpochTiming(NamedTuple):
    """Wall times of one epoch: all of it, and the host's share (dispatching the steps)."""

    seconds: float
    dispatch_seconds: float


def run_steps(
    state,
    batch_iter,
    step: Callable,
    *,
    desc: str,
    total: int,
    batch_size: int,
    progress: bool,
    stop: Callable[[], bool] = lambda: False,
    on_stop: Callable[[int], BaseException] | None = None,
):
    """One epoch's loop: ``state, loss = step(state, x, y)`` for every batch of ``batch_iter``.

    Returns ``(state, losses, timing)``: the losses as a float64 numpy array (one row per step;
    packed runs give one column per run) and an :class:`EpochTiming`. ``stop()`` is asked after
    every step; when true, ``on_stop(steps_done)`` is raised.
    """
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(
        batch_iter,
        total=total,
        disable=not progress or jax.process_index() != 0,
        desc=desc,
        leave=False,
    )
    for x, y in bar:
        state, loss = step(state, x, y)
        losses.append(loss)
        if stop():
            raise on_stop(len(losses))
        if progress and len(losses) % 5 == 0:
            # the previous step's loss: reading it does not wait for the step just dispatched
            rate = len(losses) * batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{float(np.mean(losses[-2])):.4f}", img_s=f"{rate:.1f}")
    dispatch_s = time.perf_counter() - t0  # the host's share: ~ the epoch's time when input-bound
    losses = np.asarray(distributed.gather_processes(losses), np.float64)
    return state, losses, EpochTiming(time.perf_counter() - t0, dispatch_s)


def epoch_record(epoch: int, step: int, loss: float, images: int, timing: EpochTiming, traces):
    """The record of one epoch in ``metrics.jsonl`` and ``results.json``'s history."""
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": loss,
        "images_per_s": images / timing.seconds,
        "epoch_seconds": timing.seconds,
        "dispatch_seconds": timing.dispatch_seconds,
        "traces": traces,
    }


# The divergence guard (:func:`divergence`): an epoch's mean training loss above FACTOR times the
# first epoch's for PATIENCE consecutive epochs. Epoch means, not steps: a single step's loss is
# noisy at small batches, an epoch's mean is not; the first epoch is the reference because it
# starts from the pretrained model (its mean is near the untrained head's log(num_classes)), and
# two epochs in a row keep one bad epoch after the warm-up's peak from counting.
DIVERGE_FACTOR = 1.5
DIVERGE_PATIENCE = 2


def divergence(losses, *, factor: float = DIVERGE_FACTOR, patience: int = DIVERGE_PATIENCE):
    """The 1-indexed epoch at which a run counts as diverging, or ``None``.

    A run diverges at the first epoch whose mean training loss is non-finite, or that ends
    ``patience`` consecutive epochs whose mean losses all exceed ``factor`` times the first
    epoch's (the first epoch itself is never one of them).

    Args:
      losses: the epochs' mean training losses, in order (epoch 1 first).
      factor: how far above the first epoch's mean a loss counts as risen.
      patience: consecutive risen epochs that make a divergence.

    >>> divergence([2.3, 4.6, 1.0, 4.0, 4.1])
    5
    >>> divergence([2.3, 1.2, 0.8]) is None
    True
    """
    run = 0
    for i, loss in enumerate(losses):
        if not np.isfinite(loss):
            return i + 1
        run = run + 1 if i > 0 and loss > factor * losses[0] else 0
        if run >= patience:
            return i + 1
    return None


def divergence_line(history: list[dict], lr, head_lr) -> str | None:
    """The one line that says a run diverges (its lr, the step and the losses), when
    :func:`divergence` of ``history``'s epoch records fires at its last epoch; else ``None``."""
    losses = [h["train_loss"] for h in history]
    at = divergence(losses)
    if at is None or at != len(losses):
        return None
    rec = history[-1]
    return (
        f"diverging: lr {lr:g} (head lr {head_lr:g}): training loss {rec['train_loss']:.4g} at "
        f"step {rec['step']} (epoch {rec['epoch']}), above {DIVERGE_FACTOR:g}x the first epoch's "
        f"{losses[0]:.4g} for {DIVERGE_PATIENCE} epochs; try a smaller lr or lr='auto'"
    )


def _train_batches(run: RunParts, epoch: int):
    c = run.config
    kw = dict(shuffle=True, seed=c.seed, epoch=epoch, drop_remainder=True)
    if run.mesh is not None and c.train_split not in run.device_splits:
        # each process loads its rows only; the step sees the global batch
        return (
            (x, y)
            for x, y, _, _ in distributed.global_batches(
                run.source,
                c.train_split,
                mesh=run.mesh,
                batch_size=c.batch_size,
                image_size=c.image_size,
                normalization=c.normalization,
                **kw,
            )
        )
    return batches(run, c.train_split, **kw)


def train_epoch(
    run: RunParts, epoch: int, state: TrainState, stop: Callable[[], bool] = lambda: False
) -> tuple[TrainState, dict]:
    """One epoch of steps; returns the new state and the epoch's record.

    ``stop()`` is asked after every step; when it says so the epoch ends with
    :class:`~guft_jax.errors.Interrupted` (its partial work is not kept).

    Raises:
      FloatingPointError: a NaN/Inf training loss (naming the epoch and the step).
    """
    # The state's shapes are fixed within an epoch: pick its jitted step once, not per step.
    step_fn = getattr(run.step_fn, "for_state", lambda s: run.step_fn)(state)

    def step(state, x, y):
        if y.dtype != np.int32:
            y = y.astype(np.int32)
        if not isinstance(x, jax.Array) or (run.mesh is not None and x.is_fully_addressable):
            x, y = shard_lib.put_batch((x, y), run.mesh)
        return step_fn(state, run.params, x, y, ())  # the mask: the method's, from the state

    state, losses, timing = run_steps(
        state,
        _train_batches(run, epoch),
        step,
        desc=f"epoch {epoch}/{run.config.epochs}",
        total=run.steps_per_epoch,
        batch_size=run.config.batch_size,
        progress=run.config.progress,
        stop=stop,
        on_stop=lambda done: Interrupted(epoch, done),
    )
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        raise FloatingPointError(
            f"non-finite training loss in epoch {epoch} (step {bad} of the epoch); stopping"
        )
    images = len(losses) * run.config.batch_size
    rec = epoch_record(epoch, int(state.step), float(losses.mean()), images, timing, run.traces[0])
    return state, rec


def results(run: RunParts, state: TrainState, history: list, record: dict | None) -> dict:
    """The JSON-able results of a trained run (before its evaluation)."""
    method, params = run.method, run.params
    trained = trained_counts(method, params, state.trainable, state.method_state)
    sizes = {}
    for path in trained:
        try:
            sizes[path] = int(np.size(paths_lib.get(params, path)))
        except (KeyError, TypeError):
            pass
    return {
        "method": method.name,
        "hparams": method.hparams or {},
        "trainable_params": int(sum(trained.values())),
        "head_params": mbase.head_count(state.trainable),
        "backbone_params": run.backbone,
        "epochs": run.config.epochs,
        "traces": run.traces[0],
        "history": history,
        "config": record or {},
        "trained_per_tensor": trained,
        "tensor_sizes": sizes,
    }


def evaluate_into(run: RunParts, state: TrainState, split: str | None, results: dict) -> None:
    """Adds ``{split}_accuracy``, ``{split}_loss`` and ``{split}_examples`` to ``results``."""
    if split is None:
        return
    c = run.config
    ev = evaluate(
        run.eval_fn,
        run.params,
        state,
        run.source,
        split,
        batch_size=c.batch_size,
        image_size=c.image_size,
        normalization=c.normalization,
        mesh=run.mesh,
        batches=batches(run, split) if split in run.device_splits else None,
    )
    results[f"{split}_accuracy"] = ev["accuracy"]
    results[f"{split}_loss"] = ev["loss"]
    results[f"{split}_examples"] = ev["num_examples"]


def _padded(x, y, batch_size: int):
    """Pads a last, smaller batch to ``batch_size`` with zero-weight rows (numpy or device)."""
    n = len(x)
    w = np.ones(batch_size, np.float32)
    if n < batch_size:
        xp = jnp if isinstance(x, jax.Array) else np
        pad = batch_size - n
        x = xp.concatenate([x, xp.zeros((pad,) + x.shape[1:], x.dtype)])
        y = xp.concatenate([y, xp.zeros((pad,), y.dtype)])
        w[n:] = 0
    return x, y, w


def evaluate(
    eval_step,
    params,
    state: TrainState,
    source,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    normalization: str,
    mesh=None,
    batches: Any = None,
) -> dict:
    """Accuracy and mean loss over a whole split (the last batch is padded and masked).

    ``batches`` (optional) replaces ``source.batches(split, ...)``: e.g. the device-resident
    batches of :func:`guft_jax.device_input.device_batches`. The per-batch sums stay on the device
    until the end (one transfer per split, not per batch). With a ``mesh`` and no ``batches``
    each process loads only its rows of every batch (:func:`guft_jax.distributed.global_batches`)
    and the sums, taken over the global arrays, are exact counts over all processes.
    """
    one = functools.partial(eval_step, params, state.trainable, state.method_state)
    if hasattr(eval_step, "plain"):  # step.MergedEval: fold the method in once
        one = functools.partial(
            eval_step.plain, eval_step.merge(params, state.trainable, state.method_state)
        )
    if batches is None and mesh is not None:
        sums, n = [], 0
        for x, y, w, m in distributed.global_batches(
            source,
            split,
            mesh=mesh,
            batch_size=batch_size,
            image_size=image_size,
            normalization=normalization,
        ):
            sums.append(one(x, y, w))
            n += m
        return _eval_result(sums, n)
    if batches is None:
        batches = source.batches(
            split, batch_size=batch_size, image_size=image_size, normalization=normalization
        )
    sums, n = [], 0
    for x, y in batches:
        m = len(x)
        x, y, w = _padded(x, y.astype(np.int32), batch_size)
        x, y, w = shard_lib.put_batch((x, y, w), mesh)
        sums.append(one(x, y, w))
        n += m
    return _eval_result(sums, n)


def _eval_result(sums, n: int) -> dict:
    sums = np.asarray(distributed.gather_processes(sums), np.float64).reshape(-1, 2).sum(0)
    correct, loss = float(sums[0]), float(sums[1])
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "num_examples": n}
