"""The training engine: one jitted, donated train step per run, for every method.

Only the method's ``trainable`` tree is differentiated: the frozen pretrained ``params`` are an
argument of the step, receive no gradient and no optimizer state. A method with element-level
masks (GUFT's reference path) supplies them through ``MethodHooks.update_mask``; the mask is a
traced argument, so growing it never retraces (``fit`` reports the trace count).

``fit`` runs epochs (1-indexed), calls ``MethodHooks.epoch_start`` at the start of each, saves an
orbax checkpoint of the whole train state (trainable, optimizer, method state, RNG, step) after
each epoch, resumes from the newest intact one, writes metrics as JSON lines and TensorBoard
events, and finally evaluates once on the evaluation split (the last epoch's weights: never
selected on test).

The run directory follows :mod:`guft_jax.rundir`: ``fit`` holds the workdir's lock for the whole
run (a second run on it fails at once naming the holder's pid), stores the config's fingerprint
and the method's name with every checkpoint and refuses a resume that changes anything but
``epochs`` / the progress options (naming the fields), cuts ``metrics.jsonl`` and the
TensorBoard events back to the restored step (each epoch is logged once, whatever the moment of
a ``kill -9``), and writes ``results.json`` atomically. A damaged newest checkpoint is named in
one line and the previous intact one is used (:func:`guft_jax.checkpoint.restore_intact`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from guft_jax import checkpoint as ckpt_lib
from guft_jax import device_input, distributed, optim, rundir
from guft_jax import paths as paths_lib
from guft_jax import precision as precision_lib
from guft_jax import sharding as shard_lib
from guft_jax.data import data_identity, describe_source, summary_line
from guft_jax.errors import EpochsLoweredError, Interrupted, short_path
from guft_jax.methods import base as mbase
from guft_jax.methods.base import (
    EpochContext,
    Method,
    StepInfo,
    forward,
    trained_counts,
)
from guft_jax.methods.report import trainable_report
from guft_jax.vit import count_params


class TrainState(NamedTuple):
    step: jax.Array
    trainable: Any
    opt_state: Any
    method_state: Any
    rng: jax.Array  # a raw uint32 PRNG key (checkpointable)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
    """Mean softmax cross-entropy (weighted mean if ``weights`` is given), in float32."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if weights is None:
        return jnp.mean(losses)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_loss_fn(model, method: Method) -> Callable:
    """``loss(trainable, params, method_state, images, labels, rng=None)``: the task loss plus the
    method's extra term (``MethodHooks.loss``, training only); ``rng=None`` runs the model and the
    method deterministically (no dropout / drop-path / sampling)."""
    extra = method.hooks.loss

    def loss(trainable, params, method_state, images, labels, rng=None):
        logits = forward(model, method, params, trainable, method_state, images, rng=rng)
        out = cross_entropy(logits, labels)
        if extra is not None and rng is not None:
            out = out + extra(params, trainable, method_state, rng)
        return out

    return loss


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def make_step_body(model, method: Method, tx, *, total_steps: int = 0) -> Callable:
    """The un-jitted step ``body(state, params, images, labels, mask=(), scale=None) ->
    (state, loss)``: loss and gradients of the trainable tree, the masked optimizer update
    (``mask=()``: the method's ``update_mask`` of the traced state; ``scale``: per-leaf update
    factors, see :func:`guft_jax.optim.masked_step`), then the method's ``MethodHooks.step``.
    :func:`make_train_step` jits it; :mod:`guft_jax.packing` vmaps it over runs."""
    loss_fn = make_loss_fn(model, method)
    hook, mask_fn = method.hooks.step, method.hooks.update_mask

    def body(state: TrainState, params, images, labels, mask=(), scale=None):
        rng, drop = jax.random.split(state.rng)
        loss, grads = jax.value_and_grad(loss_fn)(
            state.trainable, params, state.method_state, images, labels, drop
        )
        if not _has_leaves(mask) and mask_fn is not None:
            mask = mask_fn(state.method_state)  # traced: a mask that changes never retraces
        trainable, opt_state = optim.masked_step(
            tx, grads, state.opt_state, state.trainable, mask if _has_leaves(mask) else None, scale
        )
        mstate = state.method_state
        if hook is not None:
            info = StepInfo(
                state.step,
                total_steps,
                trainable,
                state.trainable,
                opt_state,
                mstate,
                grads,
                params,
            )
            trainable, opt_state, mstate = hook(info)
        return TrainState(state.step + 1, trainable, opt_state, mstate, rng), loss

    return body


def make_train_step(
    model,
    method: Method,
    tx: optax.GradientTransformation,
    *,
    total_steps: int = 0,
    shardings: tuple | None = None,
    on_trace: Callable[[], None] | None = None,
) -> Callable:
    """The jitted train step ``step(state, params, images, labels, mask) -> (state, loss)``.

    ``state`` is donated. ``mask`` is ``()`` (the method's ``update_mask`` of the traced state is
    used, if it has one) or an element-level bool tree shaped like ``state.trainable`` (see
    :func:`guft_jax.optim.masked_step`). After the optimizer update the
    method's ``MethodHooks.step`` (if any) runs inside the same program with a :class:`StepInfo`
    (``total_steps`` is static). ``shardings`` is ``(state, params, batch, mask)`` NamedShardings
    for ``jax.jit``; ``state`` may also be a function ``state -> per-leaf shardings`` (rules
    applied to the state's current shapes: one jitted step per state shape, reachable as
    ``step.for_state(state)``). ``on_trace`` is called each time the step is traced.
    """
    body = make_step_body(model, method, tx, total_steps=total_steps)

    def step(state: TrainState, params, images, labels, mask):
        if on_trace is not None:
            on_trace()
        return body(state, params, images, labels, mask)

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    state_sh, params_sh, batch_sh, mask_sh = shardings
    repl = shard_lib.replicated(batch_sh.mesh)

    def jitted(sh):
        return jax.jit(
            step,
            donate_argnums=(0,),
            in_shardings=(sh, params_sh, batch_sh, batch_sh, mask_sh),
            out_shardings=(sh, repl),
        )

    if not callable(state_sh):
        return jitted(state_sh)
    # Per-leaf state shardings depend on the leaves' shapes, which a method may change between
    # epochs (GUFT's sparse capacities): one jitted step per state shape (each traced once).
    cache: dict = {}

    def for_state(state):
        key = (
            jax.tree_util.tree_structure(state),
            tuple(np.shape(x) for x in jax.tree_util.tree_leaves(state)),
        )
        if key not in cache:
            cache[key] = jitted(state_sh(state))
        return cache[key]

    def sharded_step(state, params, images, labels, mask):
        return for_state(state)(state, params, images, labels, mask)

    sharded_step.for_state = for_state  # the jitted step for a state (``.lower`` it to inspect)
    return sharded_step


def make_eval_step(model, method: Method) -> Callable:
    """``eval(params, trainable, method_state, images, labels, weights) -> (correct, loss_sum)``."""

    def ev(params, trainable, method_state, images, labels, weights):
        logits = forward(model, method, params, trainable, method_state, images)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(correct * weights), jnp.sum(losses * weights)

    return jax.jit(ev)


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
    batches of :func:`guft_jax.device_input.batches`. The per-batch sums stay on the device
    until the end (one transfer per split, not per batch). With a ``mesh`` and no ``batches``
    each process loads only its rows of every batch (:func:`guft_jax.distributed.global_batches`)
    and the sums, taken over the global arrays, are exact counts over all processes.
    """
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
            sums.append(eval_step(params, state.trainable, state.method_state, x, y, w))
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
        sums.append(eval_step(params, state.trainable, state.method_state, x, y, w))
        n += m
    return _eval_result(sums, n)


def _eval_result(sums, n: int) -> dict:
    sums = np.asarray(distributed.gather(sums), np.float64).reshape(-1, 2).sum(0)
    correct, loss = float(sums[0]), float(sums[1])
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "num_examples": n}


def init_state(method: Method, params, tx=None, *, seed: int, labels_out: list | None = None):
    """The initial :class:`TrainState` (``method.init`` is called once). With ``tx=None`` the
    optimizer state is ``()``; ``labels_out`` receives the optimizer labels of the trainable tree.
    """
    rng = jax.random.PRNGKey(seed)
    rng, init_rng = jax.random.split(rng)
    # A copy: the step donates the state, and a method may start from the very arrays of params.
    trainable = jax.tree_util.tree_map(jnp.copy, method.init(init_rng, params))
    mstate = mbase.init_state(method, params, trainable)
    if labels_out is not None:
        labels_out.append(mbase.labels_of(method, trainable))
    opt = tx.init(trainable) if tx is not None else ()
    return TrainState(jnp.zeros((), jnp.int32), trainable, opt, mstate, rng)


def optimizer_for(method: Method, params, *, steps_per_epoch: int, epochs: int, **kw):
    """``(tx, state_without_optimizer)``: AdamW groups from the method's labels (one init)."""
    labels: list = []
    state = init_state(method, params, None, seed=kw.pop("seed", 0), labels_out=labels)
    warmup = int(round(kw.pop("warmup_epochs", 0) * steps_per_epoch))
    tx = optim.make_optimizer(
        labels=labels[0], warmup_steps=warmup, total_steps=steps_per_epoch * epochs, **kw
    )
    return tx, state._replace(opt_state=tx.init(state.trainable))


class FitResult(NamedTuple):
    """What :func:`fit` returns: the final train state and the JSON-able results (also in
    ``workdir/results.json``). ``r["key"]`` reads ``r.results["key"]`` (``r["state"]`` the
    state)."""

    state: TrainState
    results: dict

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.state if key == "state" else self.results[key]
        return tuple.__getitem__(self, key)


class _Writer:
    """``metrics.jsonl`` + TensorBoard events in ``workdir`` (process 0 only).

    On creation both are cut back to ``step`` (the restored checkpoint's optimizer step, 0 for a
    new run): records past it, and a torn last line, are dropped and ``tb/`` is rewritten from
    the kept records, so every epoch appears exactly once.
    """

    def __init__(self, workdir: str | None, *, step: int, log: Callable[[str], None]):
        self.workdir = workdir if jax.process_index() == 0 else None
        self.tb = None
        self.kept: list[dict] = []  # the records of the epochs before this resume
        if self.workdir:
            os.makedirs(self.workdir, exist_ok=True)
            self.path = os.path.join(self.workdir, rundir.METRICS_NAME)
            kept, dropped = rundir.truncate_metrics(self.path, step)
            self.kept = kept
            if dropped:
                log(
                    f"{self.path}: dropped {dropped} record(s) past step {step}, which the "
                    "restored checkpoint does not hold (each epoch is logged once)"
                )
            self.tb = rundir.rewrite_tensorboard(os.path.join(self.workdir, rundir.TB_NAME), kept)

    def write(self, record: dict) -> None:
        if not self.workdir:
            return
        rundir.append_jsonl(self.path, record)
        rundir.write_scalars(self.tb, record)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _Run(NamedTuple):
    """The static pieces of one run, built once by :func:`fit`."""

    model: Any
    method: Method
    source: Any
    params: Any
    step_fn: Callable
    eval_fn: Callable
    mesh: Any
    shardings: tuple | None
    traces: list
    data: dict  # image_size, batch_size, normalization, train_split, seed
    device_splits: dict  # split -> DeviceSplit (input="device"), else empty
    epochs: int
    steps_per_epoch: int
    log: Callable
    progress: bool


def _check_args(epochs, batch_size, mesh, n_train) -> int:
    if epochs < 1:
        raise ValueError(f"epochs: must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if mesh is not None and batch_size % mesh.devices.size:
        raise ValueError(f"batch_size: {batch_size} not divisible by {mesh.devices.size} devices")
    steps = n_train // batch_size
    if steps < 1:
        raise ValueError(f"batch_size: {batch_size} exceeds the {n_train} training examples")
    return steps


def _place(state, params, mesh, param_rules, state_rules):
    """Device placement: the frozen params by ``param_rules``, the train state by
    ``state_rules`` (a function of the state: its shapes may change when a method grows its
    capacity; replicated without rules). Works across processes: every process holds the
    same host values and keeps its shards."""
    if mesh is None:
        return state, params, None
    rules = tuple(state_rules)

    def state_sh(st):
        if not rules:
            return jax.tree_util.tree_map(lambda _: shard_lib.replicated(mesh), st)
        return shard_lib.tree_shardings(st, mesh, rules)

    params_sh = shard_lib.tree_shardings(params, mesh, param_rules)
    shardings = (state_sh, params_sh, shard_lib.batch_sharding(mesh), shard_lib.replicated(mesh))
    return jax.device_put(state, state_sh(state)), jax.device_put(params, params_sh), shardings


def _restore(
    run: _Run,
    mgr,
    state: TrainState,
    config: dict | None,
    workdir: str | None,
    *,
    data: dict | None = None,
    warn: Callable[[str], None] = print,
) -> tuple[TrainState, dict | None]:
    """``(state, meta)`` of the newest intact checkpoint (``meta`` None: nothing to resume).

    Refuses another method's checkpoint, other data (``data``: :func:`guft_jax.data.data_identity`
    of the splits the run reads) and (with ``config``) a changed config before reading any
    array; damaged steps are named on ``warn``, moved aside and skipped.
    """
    if mgr is None:
        return state, None
    method = run.method

    def target(structure):
        if method.hooks.resize is None:
            return state
        tr, opt, ms = method.hooks.resize(
            state.trainable, state.opt_state, state.method_state, structure
        )
        return state._replace(trainable=tr, opt_state=opt, method_state=ms)

    def check(meta):  # the config first: a changed seed also redraws a user dataset's splits
        if config is not None:
            rundir.check_resume_config(meta.get("fingerprint"), config, workdir=workdir)
        if data is not None:
            rundir.check_resume_data(meta.get("data"), data, workdir=workdir)

    out = ckpt_lib.restore_intact(mgr, target, method=method.name, check_meta=check, log=warn)
    if out is None:
        return state, None
    state, meta, _ = out
    if run.shardings is not None:
        state = jax.device_put(state, run.shardings[0](state))
    run.log(f"resumed from {mgr.directory} at epoch {meta['epoch']}")
    return state, meta


INPUTS = ("auto", "host", "device")


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


def _device_splits(source, splits, *, mesh, log) -> dict:
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


def _batches(run: _Run, split: str, **kw):
    d = run.data
    dev = run.device_splits.get(split)
    if dev is not None:
        return device_input.batches(
            dev,
            batch_size=d["batch_size"],
            image_size=d["image_size"],
            normalization=d["normalization"],
            **kw,
        )
    return run.source.batches(
        split,
        batch_size=d["batch_size"],
        image_size=d["image_size"],
        normalization=d["normalization"],
        **kw,
    )


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
        loss_fn=_det_loss(model),
        batches=batches,
        log=log,
        epochs=epochs,
        forward=lambda p, t, s, x: forward(model, method, p, t, s, x),
    )
    tr, opt, ms = hook(epoch, ctx)
    return state._replace(trainable=tr, opt_state=opt, method_state=ms)


def _epoch_start(run: _Run, epoch: int, state: TrainState) -> TrainState:
    state = epoch_start(
        run.model,
        run.method,
        run.params,
        state,
        epoch,
        batches=lambda: _batches(run, run.data["train_split"]),
        epochs=run.epochs,
        log=run.log,
    )
    return jax.device_put(state, run.shardings[0](state)) if run.shardings is not None else state


_DET_LOSS: dict = {}


def _det_loss(model):
    """Per-example deterministic losses of plain variables, jitted once per model."""
    if id(model) not in _DET_LOSS:
        _DET_LOSS[id(model)] = jax.jit(
            lambda variables, x, y: optax.softmax_cross_entropy_with_integer_labels(
                model.apply(variables, x, deterministic=True).astype(jnp.float32), y
            )
        )
    return _DET_LOSS[id(model)]


def _train_epoch(
    run: _Run, epoch: int, state: TrainState, stop: Callable[[], bool] = lambda: False
) -> tuple[TrainState, dict]:
    """One epoch of steps; returns the new state and the epoch's record.

    ``stop()`` is asked after every step; when it says so the epoch ends with
    :class:`~guft_jax.errors.Interrupted` (its partial work is not kept).
    """
    mask = ()  # the step takes the method's mask from its traced state
    t0 = time.time()
    losses = []
    d = run.data
    kw = dict(shuffle=True, seed=d["seed"], epoch=epoch, drop_remainder=True)
    if run.mesh is not None and d["train_split"] not in run.device_splits:
        # each process loads its rows only; the step sees the global batch
        it = (
            (x, y)
            for x, y, _, _ in distributed.global_batches(
                run.source,
                d["train_split"],
                mesh=run.mesh,
                batch_size=d["batch_size"],
                image_size=d["image_size"],
                normalization=d["normalization"],
                **kw,
            )
        )
    else:
        it = _batches(run, d["train_split"], **kw)
    bar = tqdm(
        it,
        total=run.steps_per_epoch,
        disable=not run.progress or jax.process_index() != 0,
        desc=f"epoch {epoch}/{run.epochs}",
        leave=False,
    )
    # The state's shapes are fixed within an epoch: pick its jitted step once, not per step.
    step_fn = getattr(run.step_fn, "for_state", lambda s: run.step_fn)(state)
    for x, y in bar:
        if y.dtype != np.int32:
            y = y.astype(np.int32)
        if not isinstance(x, jax.Array):
            x, y = shard_lib.put_batch((x, y), run.mesh)
        elif run.mesh is not None and x.is_fully_addressable:
            x, y = shard_lib.put_batch((x, y), run.mesh)
        state, loss = step_fn(state, run.params, x, y, mask)
        losses.append(loss)
        if stop():
            raise Interrupted(epoch, len(losses))
        if run.progress and len(losses) % 5 == 0:
            # the previous step's loss: reading it does not wait for the step just dispatched
            rate = len(losses) * d["batch_size"] / (time.time() - t0)
            bar.set_postfix(loss=f"{float(losses[-2]):.4f}", img_s=f"{rate:.1f}")
    dispatch_s = time.time() - t0  # the host's share: ~ the epoch's time when input-bound
    losses = np.asarray(distributed.gather(losses), np.float64)
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        raise FloatingPointError(
            f"non-finite training loss in epoch {epoch} (step {bad} of the epoch); stopping"
        )
    dt = time.time() - t0
    rec = {
        "epoch": epoch,
        "step": int(state.step),
        "train_loss": float(losses.mean()),
        "images_per_s": len(losses) * d["batch_size"] / dt,
        "epoch_seconds": dt,
        "dispatch_seconds": dispatch_s,
        "traces": run.traces[0],
    }
    return state, rec


def _results(run: _Run, state: TrainState, history: list, config: dict | None) -> dict:
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
        "backbone_params": run.data["backbone"],
        "epochs": run.epochs,
        "traces": run.traces[0],
        "history": history,
        "config": config or {},
        "trained_per_tensor": trained,
        "tensor_sizes": sizes,
    }


def _evaluate_into(run: _Run, state: TrainState, split: str | None, results: dict) -> None:
    if split is None:
        return
    d = run.data
    ev = evaluate(
        run.eval_fn,
        run.params,
        state,
        run.source,
        split,
        batch_size=d["batch_size"],
        image_size=d["image_size"],
        normalization=d["normalization"],
        mesh=run.mesh,
        batches=_batches(run, split) if split in run.device_splits else None,
    )
    results[f"{split}_accuracy"] = ev["accuracy"]
    results[f"{split}_loss"] = ev["loss"]
    results[f"{split}_examples"] = ev["num_examples"]


def _open_workdir(stack, workdir: str | None, *, lock: bool, fresh: bool, log) -> None:
    """Takes the workdir's lock for the ``stack``'s life (unless ``lock=False``: the caller
    holds it), clears the run's files for ``fresh`` and removes a killed write's temporaries."""
    if not workdir or jax.process_index() != 0:
        return
    if lock:
        stack.enter_context(rundir.locked(workdir))
    if fresh:
        removed = rundir.clear_run(workdir)
        if removed:
            log(f"fresh start: removed {', '.join(removed)} from {workdir}")
    rundir.remove_stale_tmp(workdir)


def _resume_notes(meta: dict | None, epochs: int, step: int, log) -> dict:
    """``{"epochs_changed_on_resume": [old, new]}`` when a resume changed ``epochs`` (logged)."""
    if meta is None or meta.get("epochs") in (None, epochs):
        return {}
    log(
        f"epochs changed on resume: {meta['epochs']} -> {epochs}; the learning-rate schedule "
        f"now spans {epochs} epochs, from step {step} on"
    )
    return {"epochs_changed_on_resume": [meta["epochs"], epochs]}


def fit(
    *,
    model,
    params,
    method: Method,
    source,
    image_size: int,
    batch_size: int,
    epochs: int,
    lr: float,
    head_lr: float | None = None,
    weight_decay: float = 1e-4,
    warmup_epochs: float = 0,
    clip_norm: float | None = None,
    seed: int = 0,
    normalization: str = "imagenet",
    train_split: str = "train800val200",
    eval_split: str | None = "test",
    workdir: str | None = None,
    stop_after_epoch: int | None = None,
    mesh=None,
    param_rules: Sequence[tuple] = (),
    state_rules: Sequence[tuple] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    config: dict | None = None,
    lock: bool = True,
    fresh: bool = False,
    precision: str | None = "auto",
    input: str = "auto",
    warn: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Trains ``method`` on ``source``; returns a :class:`FitResult` (the JSON-able results are
    also written to ``workdir/results.json``). Resumes from ``workdir``'s newest intact
    checkpoint (see the module docstring for the run-directory rules).

    ``mesh`` (:func:`guft_jax.sharding.make_mesh`) splits every batch over its devices;
    ``param_rules`` / ``state_rules`` (``None``: the same as ``param_rules``) shard the frozen
    params and the train state (:mod:`guft_jax.sharding`, e.g. ``FSDP_RULES``). In a
    multi-process run (:mod:`guft_jax.distributed`) each process loads only its rows of every
    batch, evaluation counts are exact over all processes, and ``log``, metrics, results and
    progress bars come from process 0 only.

    ``stop_after_epoch`` ends the run early after that epoch's checkpoint (to test resuming).
    ``config`` (the run's whole config as a dict) goes into ``results.json`` and its
    fingerprint into every checkpoint; a resume with a different one is refused.

    ``precision`` (:mod:`guft_jax.precision`): ``"bf16"`` computes in bfloat16 with float32
    master weights, optimizer state, LayerNorm statistics, softmax and loss; ``"fp32"``;
    ``"auto"`` (default) is bf16 on GPU/TPU and fp32 on CPU (measured faster there); ``None``
    keeps ``model``'s own ``dtype``. ``input``: ``"host"`` (the source's numpy pipeline),
    ``"device"`` (uint8 splits on the device, resized inside jit) or ``"auto"``
    (:func:`resolve_input`); both give the same batches for array sources. ``lock=False``
    when the caller already holds the workdir's lock (``experiments.run`` takes it before
    reading any data); ``fresh=True`` deletes the workdir's checkpoints, metrics, events and
    results first.

    A run directory's ``results.json`` describes the model beside it: ``history`` holds every
    epoch trained (read back from ``metrics.jsonl`` across resumes), ``epochs`` the epochs
    trained, ``wall_seconds`` the time of all the run's processes up to its last checkpoint
    plus this one's, and ``data_identity`` the data's per-split counts and content hashes
    (also stored with every checkpoint: a resume on other data is refused). Rerunning a
    finished run with the same ``epochs`` changes nothing and returns the stored results;
    asking for fewer epochs than were trained is refused; more continues the run.

    ``warn`` receives the damaged-checkpoint and fallback notices (default: stderr). ``stop``
    is asked after every step (e.g. a Ctrl-C handler's flag): when true, training ends with
    :class:`~guft_jax.errors.Interrupted` after that step, saving nothing of the unfinished
    epoch (a rerun resumes from the last epoch's checkpoint).

    Raises:
      FloatingPointError: a NaN/Inf loss (the last good checkpoint, if any, is kept).
      EpochsLoweredError: ``epochs`` is below the epochs the workdir's model was trained.
      DataChangedError: a resume on other data (the changed splits named).
      Interrupted: ``stop()`` said so (a ``KeyboardInterrupt``).
      WorkdirLockedError: another process holds ``workdir``.
      ConfigChangedError: a resume with a changed config (the fields named).
      CheckpointStructureError: the workdir holds another method's or another shape's run.
      CheckpointDamagedError: no intact checkpoint is left in the workdir.
    """
    if jax.process_index() != 0:
        log = warn = _quiet
    warn = _stderr if warn is None else warn
    with contextlib.ExitStack() as stack:
        _open_workdir(stack, workdir, lock=lock, fresh=fresh, log=log)
        t_start = time.time()
        steps = _check_args(epochs, batch_size, mesh, source.size(train_split))
        log(summary_line(source))
        model = precision_lib.with_precision(model, precision)
        input_kind = resolve_input(input, source, mesh=mesh)
        dtype = getattr(model, "dtype", None) or jnp.float32
        log(f"precision: {jnp.dtype(dtype).name} compute, float32 weights; input: {input_kind}")
        backbone = count_params({k: v for k, v in params.items() if k != "head"})
        params = mbase.prepare_base(method, params)  # (may quantise: count the backbone before)
        tx, state = optimizer_for(
            method,
            params,
            steps_per_epoch=steps,
            epochs=epochs,
            lr=lr,
            head_lr=head_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            clip_norm=clip_norm,
            seed=seed,
        )
        log(
            trainable_report(method, params, state.trainable, state.method_state, backbone=backbone)
        )
        state_rules = param_rules if state_rules is None else state_rules
        state, params, shardings = _place(state, params, mesh, param_rules, state_rules)
        traces = [0]
        run = _Run(
            model=model,
            method=method,
            source=source,
            params=params,
            step_fn=make_train_step(
                model,
                method,
                tx,
                total_steps=steps * epochs,
                shardings=shardings,
                on_trace=lambda: traces.__setitem__(0, traces[0] + 1),
            ),
            eval_fn=make_eval_step(model, method),
            mesh=mesh,
            shardings=shardings,
            traces=traces,
            device_splits=(
                _device_splits(source, [train_split, eval_split], mesh=mesh, log=log)
                if input_kind == "device"
                else {}
            ),
            data=dict(
                image_size=image_size,
                batch_size=batch_size,
                normalization=normalization,
                train_split=train_split,
                seed=seed,
                backbone=backbone,
            ),
            epochs=epochs,
            steps_per_epoch=steps,
            log=log,
            progress=progress,
        )
        mgr = None
        if workdir:
            mgr = ckpt_lib.manager(os.path.join(workdir, rundir.CHECKPOINTS_NAME))
            stack.enter_context(_closing(mgr.close))
        data_id = data_identity(source, [train_split, eval_split])
        state, meta = _restore(run, mgr, state, config, workdir, data=data_id, warn=warn)
        trained = 0 if meta is None else int(meta["epoch"])
        if trained > epochs:
            raise EpochsLoweredError(
                f"epochs={epochs} is fewer than the {trained} epochs the model in "
                f"{short_path(workdir)} has been trained; give epochs >= {trained} to continue it, "
                "or pass --fresh to start over"
            )
        results_path = os.path.join(workdir, rundir.RESULTS_NAME) if workdir else None
        if trained == epochs and results_path:
            finished = _read_results(results_path, epochs)
            if finished is not None:
                log(
                    f"{short_path(workdir)} already holds this run, finished after {epochs} "
                    f"epochs; nothing to do ({rundir.RESULTS_NAME} unchanged)"
                )
                return FitResult(state, finished)
        start_epoch = trained + 1
        notes = _resume_notes(meta, epochs, int(state.step), log)
        writer = _Writer(workdir, step=0 if meta is None else int(state.step), log=log)
        stack.enter_context(_closing(writer.close))
        if results_path and start_epoch <= epochs and os.path.exists(results_path):
            os.remove(results_path)  # it described the run before this resume
        fingerprint = None if config is None else rundir.fingerprint(config)
        wall_before = 0.0 if meta is None else float(meta.get("wall_seconds", 0.0))
        history = list(writer.kept)
        for epoch in range(start_epoch, epochs + 1):
            if stop is not None and stop():
                raise Interrupted(epoch, 0)
            state = _epoch_start(run, epoch, state)
            try:
                state, rec = _train_epoch(run, epoch, state, stop or (lambda: False))
            except FloatingPointError as e:
                kept = (
                    f"the checkpoint of epoch {epoch - 1} is kept"
                    if mgr is not None and epoch > 1
                    else "no checkpoint was saved"
                )
                raise FloatingPointError(f"{e}; {kept}") from None
            history.append(rec)
            writer.write(rec)
            log(f"epoch {epoch}: loss {rec['train_loss']:.4f}, {rec['images_per_s']:.1f} img/s")
            if mgr is not None:
                ckpt_meta = {
                    "epoch": epoch,
                    "data_position": {"epoch": epoch + 1, "step": 0},
                    "method": method.name,
                    "epochs": epochs,
                    "fingerprint": fingerprint,
                    "data": data_id,
                    "wall_seconds": wall_before + time.time() - t_start,
                }
                ckpt_lib.save(mgr, epoch, state, ckpt_meta)
            if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < epochs:
                log(f"stopping after epoch {epoch} (stop_after_epoch)")
                return FitResult(state, {"stopped_after_epoch": epoch, "history": history})
        results = _results(run, state, history, config)
        results["data"] = describe_source(source)
        results["data_identity"] = data_id
        results["precision"] = jnp.dtype(dtype).name
        results["input"] = input_kind
        results["resumed_from_epoch"] = start_epoch - 1 if start_epoch > 1 else None
        results.update(notes)
        _evaluate_into(run, state, eval_split, results)
        results["wall_seconds"] = wall_before + time.time() - t_start
        if results_path and jax.process_index() == 0:
            rundir.write_json_atomic(results_path, results)
        return FitResult(state, results)


def _read_results(path: str, epochs: int) -> dict | None:
    """The finished run's ``results.json`` if it is whole and records ``epochs`` epochs."""
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or res.get("epochs") != epochs:
        return None
    return res


@contextlib.contextmanager
def _closing(close: Callable[[], None]):
    """Calls ``close`` on the way out; when the block failed, a second failure of ``close``
    (a full disk fails the flush too) does not replace the first error."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            close()
        raise
    close()


def _quiet(line: str) -> None:
    """``log`` of the processes other than 0."""


def _stderr(line: str) -> None:
    """``warn``'s default: damage and fallback notices go to stderr."""
    print(line, file=sys.stderr, flush=True)


def mask_of(method: Method, state: TrainState):
    """The element-level optimizer mask of the method (``()`` if none), a copy."""
    if method.hooks.update_mask is None:
        return ()
    m = method.hooks.update_mask(state.method_state)
    # A copy: the mask's arrays live in the state, which the step donates.
    return () if m is None else jax.tree_util.tree_map(jnp.copy, m)
