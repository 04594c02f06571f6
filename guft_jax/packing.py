"""Many small runs in one program: a run axis vmapped through the train step.

A benchmark row's runs (several learning rates, several seeds) share every shape, so they train
as one jitted program over a leading run axis of the train state, the batches, the seeds and
the learning rates (``jax.vmap``; learning rates are data: the optimizer is built with peak
learning rate 1 and each run's updates are scaled by its own lr / head lr, which is exactly
AdamW's update since optax's AdamW multiplies its whole direction, weight decay included, by the
scheduled lr). Each packed run follows the trajectory of the same run trained alone by
:func:`guft_jax.train.fit` (tested within 1e-5).

Runs may read different data sources (offline datasets are split per seed) as long as their
training splits have the same number of batches. Method hooks that run outside jit
(``epoch_start``, e.g. GUFT's recomputes) run per run on that run's data, and the results are
stacked again: their shapes must agree across runs (true of GUFT's dense reference path, not of
its sparse path, whose capacities depend on the selection).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import optim, train
from guft_jax.config import TrainConfig, warmup_steps
from guft_jax.epochs import (
    RunParts,
    epoch_record,
    evaluate_into,
    run_epoch_start,
    run_steps,
    steps_per_epoch,
)
from guft_jax.epochs import results as run_results
from guft_jax.methods import base as mbase
from guft_jax.methods.base import Method
from guft_jax.vit import count_params


def stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(n)]


def make_packed_step(model, method: Method, tx, labels, *, total_steps: int, on_trace=None):
    """``step(states, params, images, labels, lrs, head_lrs) -> (states, losses)`` over a
    leading run axis (``params`` shared); states donated."""
    body = train.make_step_body(model, method, tx, total_steps=total_steps)

    def one(state, params, x, y, lr, head_lr):
        scale = jax.tree_util.tree_map(lambda lab: head_lr if lab == mbase.HEAD else lr, labels)
        return body(state, params, x, y, (), scale)

    def step(states, params, x, y, lrs, head_lrs):
        if on_trace is not None:
            on_trace()
        return jax.vmap(one, in_axes=(0, None, 0, 0, 0, 0))(states, params, x, y, lrs, head_lrs)

    return jax.jit(step, donate_argnums=(0,))


def _epoch_batches(runs: Sequence[RunParts], epoch: int):
    """The runs' shuffled training batches of ``epoch``, stacked over a leading run axis."""
    its = [
        r.source.batches(
            r.config.train_split,
            batch_size=r.config.batch_size,
            image_size=r.config.image_size,
            normalization=r.config.normalization,
            shuffle=True,
            seed=r.config.seed,
            epoch=epoch,
            drop_remainder=True,
        )
        for r in runs
    ]
    for batch in zip(*its, strict=True):
        xs = np.stack([b[0] for b in batch])
        ys = np.stack([np.asarray(b[1], np.int32) for b in batch])
        yield xs, ys


def _check_runs(sources, lrs, head_lrs, seeds, split: str) -> int:
    n = len(seeds)
    if not (len(sources) == len(lrs) == len(head_lrs) == n) or n < 1:
        raise ValueError("fit_packed: sources, lrs, head_lrs and seeds need one entry per run")
    sizes = {s.size(split) for s in sources}
    if len(sizes) != 1:
        raise ValueError(f"fit_packed: runs' {split} sizes differ: {sorted(sizes)}")
    return n


def _packed_init(method: Method, params, seeds, config: TrainConfig, steps: int):
    """``(tx, stacked states, labels)``: AdamW at peak lr 1 (each run scales its updates)."""
    labels: list = []
    runs = [train.init_train_state(method, params, None, seed=s, labels_out=labels) for s in seeds]
    tx = optim.make_optimizer(
        labels=labels[0],
        lr=1.0,
        head_lr=1.0,
        weight_decay=config.weight_decay,
        warmup_steps=warmup_steps(
            warmup_epochs=config.warmup_epochs,
            steps_per_epoch=steps,
            total_steps=steps * config.epochs,
            floor=config.warmup_floor,
        ),
        total_steps=steps * config.epochs,
        clip_norm=config.clip_norm,
    )
    return tx, stack([r._replace(opt_state=tx.init(r.trainable)) for r in runs]), labels[0]


def fit_packed(
    model,
    params,
    method: Method,
    sources: Sequence[Any],
    config: TrainConfig,
    *,
    lrs: Sequence[float],
    head_lrs: Sequence[float],
    seeds: Sequence[int],
    log: Callable[[str], None] = lambda s: None,
) -> tuple[Any, list[dict]]:
    """Trains ``len(seeds)`` runs of ``method`` at once; returns ``(stacked state, results)``,
    one results dict per run with :func:`guft_jax.train.fit`'s keys.

    ``config`` holds the runs' common settings (its ``lr``, ``head_lr`` and ``seed`` are
    replaced by each run's ``lrs``, ``head_lrs`` and ``seeds``); the epoch loop, records and
    results are the engine's (:mod:`guft_jax.epochs`).

    Raises:
      ValueError: the lists differ in length, or the runs' training splits differ in size.
    """
    n = _check_runs(sources, lrs, head_lrs, seeds, config.train_split)
    t_start = time.perf_counter()
    steps = steps_per_epoch(config, None, sources[0].size(config.train_split))
    backbone = count_params({k: v for k, v in params.items() if k != "head"})
    params = mbase.prepare_base(method, params)  # (may quantise: the backbone is counted before)
    tx, states, labels = _packed_init(method, params, seeds, config, steps)
    traces = [0]
    step = make_packed_step(
        model,
        method,
        tx,
        labels,
        total_steps=steps * config.epochs,
        on_trace=lambda: traces.__setitem__(0, traces[0] + 1),
    )
    common = dict(model=model, method=method, params=params, step_fn=step, traces=traces,
                  steps_per_epoch=steps, backbone=backbone, log=log)  # fmt: skip
    runs = _run_parts(common, sources, config, lrs, head_lrs, seeds)
    lr_arr, head_arr = jnp.asarray(lrs, jnp.float32), jnp.asarray(head_lrs, jnp.float32)
    history: list[list[dict]] = [[] for _ in range(n)]
    for epoch in range(1, config.epochs + 1):
        if method.hooks.epoch_start is not None:
            each = zip(runs, unstack(states, n), strict=True)
            states = stack([run_epoch_start(r, epoch, st) for r, st in each])
        states, losses, timing = run_steps(
            states,
            _epoch_batches(runs, epoch),
            lambda st, x, y: step(st, params, x, y, lr_arr, head_arr),
            desc=f"epoch {epoch}/{config.epochs}",
            total=steps,
            batch_size=config.batch_size * n,
            progress=False,
        )
        images = len(losses) * config.batch_size * n
        for r in range(n):
            loss = float(losses[:, r].mean())
            history[r].append(
                epoch_record(epoch, int(states.step[r]), loss, images, timing, traces[0])
            )
        log(f"epoch {epoch}: losses {np.round(losses.mean(0), 4).tolist()}")
    return states, _packed_results(runs, states, history, t_start)


def _run_parts(common: dict, sources, config: TrainConfig, lrs, head_lrs, seeds) -> list:
    """One :class:`~guft_jax.epochs.RunParts` per packed run (its source, seed and lrs)."""
    eval_fn = train.make_eval_step(common["model"], common["method"])
    return [
        RunParts(
            source=src,
            eval_fn=eval_fn,
            mesh=None,
            shardings=None,
            config=config.replace(seed=s, lr=lr, head_lr=h),
            device_splits={},
            **common,
        )
        for src, s, lr, h in zip(sources, seeds, lrs, head_lrs, strict=True)
    ]


def _packed_results(runs: list, states, history, t_start: float) -> list[dict]:
    """Each run's results (:func:`guft_jax.epochs.results` and its evaluation)."""
    out = []
    for r, st, hist in zip(runs, unstack(states, len(runs)), history, strict=True):
        res = run_results(r, st, hist, None)
        evaluate_into(r, st, r.config.eval_split, res)
        out.append(dict(res, wall_seconds=time.perf_counter() - t_start, packed_runs=len(runs)))
    return out
