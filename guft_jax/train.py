"""The training driver: :func:`fit` trains a method on a data source with a :class:`TrainConfig`.

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
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from guft_jax import checkpoint as ckpt_lib
from guft_jax import kernels, resume, rundir
from guft_jax import precision as precision_lib
from guft_jax import sharding as shard_lib
from guft_jax.config import INPUTS, Hooks, TrainConfig
from guft_jax.data import data_identity, describe_source, summary_line
from guft_jax.epochs import (
    RunParts,
    device_splits,
    divergence,
    divergence_line,
    epoch_start,
    evaluate,
    evaluate_into,
    resolve_input,
    run_epoch_start,
    steps_per_epoch,
    train_epoch,
)
from guft_jax.epochs import results as run_results
from guft_jax.errors import EpochsLoweredError, Interrupted, short_path
from guft_jax.methods import base as mbase
from guft_jax.methods.base import Method, trained_counts
from guft_jax.methods.report import trainable_report
from guft_jax.metrics import MetricsWriter
from guft_jax.step import (
    TrainState,
    cross_entropy,
    init_train_state,
    make_eval_step,
    make_loss_fn,
    make_step_body,
    make_train_step,
    mask_of,
    optimizer_for,
    optimizer_from,
)
from guft_jax.vit import count_params


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


def place(state, params, mesh, param_rules, state_rules):
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


def kernel_choices(model, method: Method) -> dict:
    """The resolved kernel choices a run traces with (recorded in ``results.json`` and in the
    resume fingerprint): the method's (``hparams["kernels"]``: GUFT's SDDMM, block forward and
    block fraction) and the model's attention implementation (``attention_impl``), each
    ``"auto"`` resolved for this backend (:func:`guft_jax.kernels.resolve`)."""
    out = dict((method.hparams or {}).get("kernels") or {})
    impl = getattr(model, "attention_impl", None)
    if impl is not None:
        out["attention"] = kernels.resolve({"attention": impl}).attention
    return out


def _fingerprinted(config: TrainConfig, kernels: dict) -> dict | None:
    """What a resume must match: the experiment's record and the kernel choices (``None``
    without a record: the checkpoint's method and shapes are still checked)."""
    if config.record is None:
        return None
    return dict(config.record, kernels=kernels)


def _build(model, params, method, source, config: TrainConfig, mesh, log):
    """``(run, state)``: the run's static parts and its initial (placed) train state."""
    steps = steps_per_epoch(config, mesh, source.size(config.train_split))
    log(summary_line(source))
    model = precision_lib.with_precision(model, config.precision)
    input_kind = resolve_input(config.input, source, mesh=mesh)
    dtype = getattr(model, "dtype", None) or jnp.float32
    log(f"precision: {jnp.dtype(dtype).name} compute, float32 weights; input: {input_kind}")
    backbone = count_params({k: v for k, v in params.items() if k != "head"})
    params = mbase.prepare_base(method, params)  # (may quantise: count the backbone before)
    tx, state = optimizer_from(method, params, config, steps)
    log(trainable_report(method, params, state.trainable, state.method_state, backbone=backbone))
    state_rules = config.param_rules if config.state_rules is None else config.state_rules
    state, params, shardings = place(state, params, mesh, config.param_rules, state_rules)
    traces = [0]
    step_fn = make_train_step(
        model,
        method,
        tx,
        total_steps=steps * config.epochs,
        shardings=shardings,
        on_trace=lambda: traces.__setitem__(0, traces[0] + 1),
    )
    splits = [config.train_split, config.eval_split]
    on_device = device_splits(source, splits, mesh=mesh, log=log) if input_kind == "device" else {}
    run = RunParts(
        model, method, source, params, step_fn, make_eval_step(model, method), mesh, shardings,
        traces, config, on_device, steps, backbone, log,
    )  # fmt: skip
    return run, state, dict(precision=jnp.dtype(dtype).name, input=input_kind)


def _finished(meta, config: TrainConfig, workdir, log) -> dict | None:
    """The stored results when the workdir already holds this run finished, else None.

    Raises:
      EpochsLoweredError: ``config.epochs`` is below the epochs the workdir's model was trained.
    """
    trained = 0 if meta is None else int(meta["epoch"])
    if trained > config.epochs:
        raise EpochsLoweredError(
            f"epochs={config.epochs} is fewer than the {trained} epochs the model in "
            f"{short_path(workdir)} has been trained; give epochs >= {trained} to continue it, "
            "or pass --fresh to start over"
        )
    if trained != config.epochs or not workdir:
        return None
    finished = resume.read_results(os.path.join(workdir, rundir.RESULTS_NAME), config.epochs)
    if finished is not None:
        log(
            f"{short_path(workdir)} already holds this run, finished after {config.epochs} "
            f"epochs; nothing to do ({rundir.RESULTS_NAME} unchanged)"
        )
    return finished


class _Saver(NamedTuple):
    """Saves each epoch's checkpoint with its meta (no-op without a workdir)."""

    mgr: Any
    meta: dict  # method, epochs, fingerprint, data
    t_start: float
    wall_before: float = 0.0  # the wall time of the run's earlier processes

    def save(self, epoch: int, state: TrainState) -> None:
        if self.mgr is None:
            return
        meta = dict(
            self.meta,
            epoch=epoch,
            data_position={"epoch": epoch + 1, "step": 0},
            wall_seconds=self.wall_before + time.perf_counter() - self.t_start,
        )
        ckpt_lib.save(self.mgr, epoch, state, meta)


def _epochs(run: RunParts, state, start_epoch: int, saver: _Saver, writer, hooks: Hooks):
    """Trains epochs ``start_epoch..config.epochs``; returns ``(state, history, stopped)``
    (``stopped``: the epoch ``stop_after_epoch`` ended the run after, else None)."""
    c = run.config
    history = list(writer.kept)
    for epoch in range(start_epoch, c.epochs + 1):
        if hooks.stop is not None and hooks.stop():
            raise Interrupted(epoch, 0)
        state = run_epoch_start(run, epoch, state)
        try:
            state, rec = train_epoch(run, epoch, state, hooks.stop or (lambda: False))
        except FloatingPointError as e:
            kept = (
                f"the checkpoint of epoch {epoch - 1} is kept"
                if saver.mgr is not None and epoch > 1
                else "no checkpoint was saved"
            )
            raise FloatingPointError(f"{e}; {kept}") from None
        history.append(rec)
        writer.write(rec)
        run.log(f"epoch {epoch}: loss {rec['train_loss']:.4f}, {rec['images_per_s']:.1f} img/s")
        line = divergence_line(history, c.lr, c.head_lr_or_lr)
        if line is not None:
            hooks.warn(line)
        saver.save(epoch, state)
        if c.stop_after_epoch is not None and c.stop_after_epoch <= epoch < c.epochs:
            run.log(f"stopping after epoch {epoch} (stop_after_epoch)")
            return state, history, epoch
    return state, history, None


def _quiet(line: str) -> None:
    """``log`` of the processes other than 0."""


def _hooks(hooks: Hooks | Callable | None) -> Hooks:
    if hooks is None:
        hooks = Hooks()
    elif not isinstance(hooks, Hooks):
        hooks = Hooks(log=hooks)  # a plain callable: the log
    if jax.process_index() != 0:
        hooks = dataclasses.replace(hooks, log=_quiet, warn=_quiet)
    return hooks


def fit(
    model,
    params,
    method: Method,
    source,
    config: TrainConfig | None = None,
    *,
    workdir: str | None = None,
    mesh=None,
    hooks: Hooks | Callable[[str], None] | None = None,
) -> FitResult:
    """Trains ``method`` on ``source``; returns a :class:`FitResult`.

    Args:
      model: the Flax model (e.g. :func:`guft_jax.vit.build_model`).
      params: its pretrained params (frozen; the method decides what trains).
      method: a :class:`~guft_jax.methods.base.Method` (:func:`guft_jax.methods.get_method`).
      source: a data source (:func:`guft_jax.data.get_source`).
      config: the run's :class:`~guft_jax.config.TrainConfig` (default: its defaults).
      workdir: the run directory (checkpoints, ``metrics.jsonl``, events, ``results.json``);
        ``None``: nothing is written.
      mesh: a :func:`guft_jax.sharding.make_mesh` mesh that splits every batch over its
        devices (``config.param_rules`` / ``state_rules`` shard params and state).
      hooks: a :class:`~guft_jax.config.Hooks` (log, warn, stop), or a plain ``log`` callable.

    With ``config.lr == "auto"`` the lr is chosen on the val split first
    (:mod:`guft_jax.lr_auto`) and ``results.json`` records the candidates as ``lr_auto``. The
    divergence guard (:func:`guft_jax.epochs.divergence`) says through ``hooks.warn``, in one
    line with the lr and the step, when the epochs' training loss stays well above the first
    epoch's; ``results.json``'s ``diverged_at_epoch`` holds the epoch it fired at (or null).

    The JSON-able results are also written to ``workdir/results.json``; the run resumes from
    ``workdir``'s newest intact checkpoint (see the module docstring for the run-directory
    rules). ``results.json`` describes the model beside it: ``history`` holds every epoch trained
    (read back from ``metrics.jsonl`` across resumes), ``wall_seconds`` the time of all the
    run's processes, ``data_identity`` the data's per-split counts and content hashes (a resume
    on other data is refused), ``kernels`` the kernel choices traced with. Rerunning a finished
    run with the same ``epochs`` changes nothing and returns the stored results; fewer epochs
    than were trained is refused; more continues the run. In a multi-process run
    (:mod:`guft_jax.distributed`) each process loads only its rows of every batch.

    Raises:
      FloatingPointError: a NaN/Inf loss (the last good checkpoint, if any, is kept).
      EpochsLoweredError: ``epochs`` is below the epochs the workdir's model was trained.
      DataChangedError: a resume on other data (the changed splits named).
      Interrupted: ``hooks.stop()`` said so (a ``KeyboardInterrupt``).
      WorkdirLockedError: another process holds ``workdir``.
      ConfigChangedError: a resume with a changed config (the fields named).
      CheckpointStructureError: the workdir holds another method's or another shape's run.
      CheckpointDamagedError: no intact checkpoint is left in the workdir.
    """
    config = TrainConfig() if config is None else config
    hooks = _hooks(hooks)
    with contextlib.ExitStack() as stack:
        resume.open_workdir(stack, workdir, lock=config.lock, fresh=config.fresh, log=hooks.log)
        t_start = time.perf_counter()
        config, auto = _resolve_lr(model, params, method, source, config, workdir, hooks)
        run, state, info = _build(model, params, method, source, config, mesh, hooks.log)
        info.update({} if auto is None else {"lr_auto": auto})
        info["kernels"] = kernel_choices(run.model, method)
        mgr = None
        if workdir:
            mgr = ckpt_lib.manager(os.path.join(workdir, rundir.CHECKPOINTS_NAME))
            stack.enter_context(resume.closing(mgr.close))
        data_id = data_identity(source, [config.train_split, config.eval_split])
        fingerprint = _fingerprinted(config, info["kernels"])
        state, meta = resume.restore_run(
            mgr, state, method=method, config=fingerprint, workdir=workdir, data=data_id,
            shardings=run.shardings, log=hooks.log, warn=hooks.warn,
        )  # fmt: skip
        finished = _finished(meta, config, workdir, hooks.log)
        if finished is not None:
            return FitResult(state, finished)
        saved = dict(
            method=method.name,
            epochs=config.epochs,
            fingerprint=None if fingerprint is None else rundir.fingerprint(fingerprint),
            data=data_id,
        )
        return _train(run, state, meta, _Saver(mgr, saved, t_start), stack, workdir, hooks, info)


def _resolve_lr(model, params, method, source, config: TrainConfig, workdir, hooks: Hooks):
    """``(config, lr_auto record)``: ``lr="auto"`` resolved on the val split
    (:func:`guft_jax.lr_auto.choose`), or the choice of the finished run the workdir holds;
    ``(config, None)`` for a numeric lr. A resumed run chooses again (the same choice: the
    candidates' training is deterministic for a seed)."""
    if not config.lr_is_auto:
        return config, None
    from guft_jax import lr_auto  # lr_auto trains through packing, which imports this module

    path = os.path.join(workdir, rundir.RESULTS_NAME) if workdir else None
    done = resume.read_results(path, config.epochs) if path and os.path.exists(path) else None
    if done is not None and isinstance(done.get("lr_auto"), dict):
        auto = done["lr_auto"]
        return config.replace(lr=auto["chosen"], head_lr=auto["chosen_head_lr"]), auto
    return lr_auto.choose(model, params, method, source, config, log=hooks.log, warn=hooks.warn)


def _train(run: RunParts, state, meta, saver, stack, workdir, hooks, info):
    """The epochs left, the evaluation and ``results.json`` (the second half of :func:`fit`)."""
    c = run.config
    start_epoch = 1 if meta is None else int(meta["epoch"]) + 1
    notes = resume.resume_notes(meta, c.epochs, int(state.step), hooks.log)
    writer = MetricsWriter(workdir, step=0 if meta is None else int(state.step), log=hooks.log)
    stack.enter_context(resume.closing(writer.close))
    results_path = os.path.join(workdir, rundir.RESULTS_NAME) if workdir else None
    if results_path and start_epoch <= c.epochs and os.path.exists(results_path):
        os.remove(results_path)  # it described the run before this resume
    wall_before = 0.0 if meta is None else float(meta.get("wall_seconds", 0.0))
    saver = saver._replace(wall_before=wall_before)
    state, history, stopped = _epochs(run, state, start_epoch, saver, writer, hooks)
    if stopped is not None:
        return FitResult(state, {"stopped_after_epoch": stopped, "history": history})
    results = run_results(run, state, history, c.record)
    at = divergence([h["train_loss"] for h in history])
    results["diverged_at_epoch"] = at  # the divergence guard (guft_jax.epochs.divergence)
    results["train_config"] = _json_config(c)
    results["data"] = describe_source(run.source)
    results["data_identity"] = saver.meta["data"]
    results.update(info)
    results["resumed_from_epoch"] = start_epoch - 1 if start_epoch > 1 else None
    results.update(notes)
    evaluate_into(run, state, c.eval_split, results)
    results["wall_seconds"] = wall_before + time.perf_counter() - saver.t_start
    if results_path and jax.process_index() == 0:
        rundir.write_json_atomic(results_path, results)
    return FitResult(state, results)


def _json_config(c: TrainConfig) -> dict:
    """The config's fields as JSON values (sharding rules as text)."""
    out = {}
    for k, v in dataclasses.asdict(c).items():
        if k == "record":
            continue
        out[k] = str(v) if k.endswith("_rules") and v else v
    return out


__all__ = [
    "INPUTS",
    "FitResult",
    "Hooks",
    "Interrupted",
    "TrainConfig",
    "TrainState",
    "cross_entropy",
    "epoch_start",
    "evaluate",
    "fit",
    "init_train_state",
    "kernel_choices",
    "make_eval_step",
    "make_loss_fn",
    "make_step_body",
    "make_train_step",
    "mask_of",
    "optimizer_for",
    "optimizer_from",
    "place",
    "resolve_input",
    "trained_counts",
]
