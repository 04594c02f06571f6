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


def _epoch_batches(sources, data, epoch):
    its = [
        s.batches(
            data["train_split"],
            batch_size=data["batch_size"],
            image_size=data["image_size"],
            normalization=data["normalization"],
            shuffle=True,
            seed=seed,
            epoch=epoch,
            drop_remainder=True,
        )
        for s, seed in zip(sources, data["seeds"], strict=True)
    ]
    for batch in zip(*its, strict=True):
        xs = np.stack([b[0] for b in batch])
        ys = np.stack([np.asarray(b[1], np.int32) for b in batch])
        yield xs, ys


def _epoch_start_each(model, method, params, states, epoch, sources, data, epochs, log):
    if method.hooks.epoch_start is None:
        return states
    runs = unstack(states, len(sources))
    out = []
    for st, src in zip(runs, sources, strict=True):

        def batches(src=src):
            return src.batches(
                data["train_split"],
                batch_size=data["batch_size"],
                image_size=data["image_size"],
                normalization=data["normalization"],
            )

        out.append(
            train.epoch_start(
                model, method, params, st, epoch, batches=batches, epochs=epochs, log=log
            )
        )
    return stack(out)


def fit_packed(
    *,
    model,
    params,
    method: Method,
    sources: Sequence[Any],
    lrs: Sequence[float],
    head_lrs: Sequence[float],
    seeds: Sequence[int],
    image_size: int,
    batch_size: int,
    epochs: int,
    weight_decay: float = 1e-4,
    warmup_epochs: float = 0,
    clip_norm: float | None = None,
    normalization: str = "imagenet",
    train_split: str = "train800val200",
    eval_split: str | None = "test",
    log: Callable[[str], None] = lambda s: None,
) -> tuple[Any, list[dict]]:
    """Trains ``len(seeds)`` runs of ``method`` at once; returns ``(stacked state, results)``,
    one results dict per run with :func:`guft_jax.train.fit`'s keys.

    Raises:
      ValueError: the lists differ in length, or the runs' training splits differ in size.
    """
    n = len(seeds)
    if not (len(sources) == len(lrs) == len(head_lrs) == n) or n < 1:
        raise ValueError("fit_packed: sources, lrs, head_lrs and seeds need one entry per run")
    sizes = {s.size(train_split) for s in sources}
    if len(sizes) != 1:
        raise ValueError(f"fit_packed: runs' {train_split} sizes differ: {sorted(sizes)}")
    t_start = time.time()
    steps = sizes.pop() // batch_size
    backbone = count_params({k: v for k, v in params.items() if k != "head"})
    params = mbase.prepare_base(method, params)  # (may quantise: the backbone is counted before)
    labels: list = []
    runs = [train.init_state(method, params, None, seed=s, labels_out=labels) for s in seeds]
    tx = optim.make_optimizer(
        labels=labels[0],
        lr=1.0,
        head_lr=1.0,
        weight_decay=weight_decay,
        warmup_steps=int(round(warmup_epochs * steps)),
        total_steps=steps * epochs,
        clip_norm=clip_norm,
    )
    states = stack([r._replace(opt_state=tx.init(r.trainable)) for r in runs])
    traces = [0]
    step = make_packed_step(
        model,
        method,
        tx,
        labels[0],
        total_steps=steps * epochs,
        on_trace=lambda: traces.__setitem__(0, traces[0] + 1),
    )
    data = dict(
        train_split=train_split,
        batch_size=batch_size,
        image_size=image_size,
        normalization=normalization,
        seeds=list(seeds),
    )
    lr_arr, head_arr = jnp.asarray(lrs, jnp.float32), jnp.asarray(head_lrs, jnp.float32)
    history: list[list[dict]] = [[] for _ in range(n)]
    for epoch in range(1, epochs + 1):
        states = _epoch_start_each(model, method, params, states, epoch, sources, data, epochs, log)
        t0, losses = time.time(), []
        for x, y in _epoch_batches(sources, data, epoch):
            states, loss = step(states, params, x, y, lr_arr, head_arr)
            losses.append(loss)
        losses = np.asarray(jax.device_get(losses), np.float64)  # (steps, runs)
        dt = time.time() - t0
        for r in range(n):
            history[r].append(
                {
                    "epoch": epoch,
                    "step": int(states.step[r]),
                    "train_loss": float(losses[:, r].mean()),
                    "images_per_s": len(losses) * batch_size * n / dt,
                    "epoch_seconds": dt,
                    "traces": traces[0],
                }
            )
        log(f"epoch {epoch}: losses {np.round(losses.mean(0), 4).tolist()}")
    data["backbone"] = backbone
    results = _results(model, method, params, states, sources, data, history, traces, eval_split)
    for r in results:
        r["wall_seconds"] = time.time() - t_start
        r["packed_runs"] = n
    return states, results


def _results(model, method, params, states, sources, data, history, traces, eval_split):
    eval_fn = train.make_eval_step(model, method)
    backbone = data["backbone"]
    out = []
    for r, (st, src) in enumerate(zip(unstack(states, len(sources)), sources, strict=True)):
        trained = mbase.trained_counts(method, params, st.trainable, st.method_state)
        res = {
            "method": method.name,
            "hparams": method.hparams or {},
            "trainable_params": int(sum(trained.values())),
            "head_params": mbase.head_count(st.trainable),
            "backbone_params": backbone,
            "epochs": len(history[r]),
            "traces": traces[0],
            "history": history[r],
            "trained_per_tensor": trained,
        }
        if eval_split is not None:
            ev = train.evaluate(
                eval_fn,
                params,
                st,
                src,
                eval_split,
                batch_size=data["batch_size"],
                image_size=data["image_size"],
                normalization=data["normalization"],
            )
            res[f"{eval_split}_accuracy"] = ev["accuracy"]
            res[f"{eval_split}_loss"] = ev["loss"]
            res[f"{eval_split}_examples"] = ev["num_examples"]
        out.append(res)
    return out
