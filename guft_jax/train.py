"""The training engine: one jitted, donated train step per run, for every method.

Only the method's ``trainable`` tree is differentiated: the frozen pretrained ``params`` are an
argument of the step, receive no gradient and no optimizer state. A method with element-level
masks (GUFT's reference path) supplies them through ``MethodHooks.update_mask``; the mask is a
traced argument, so growing it never retraces (``fit`` reports the trace count).

``fit`` runs epochs (1-indexed), calls ``MethodHooks.epoch_start`` at the start of each, saves an
orbax checkpoint of the whole train state (trainable, optimizer, method state, RNG, step) after
each epoch, resumes from the latest one, writes metrics as JSON lines and TensorBoard events, and
finally evaluates once on the evaluation split (the last epoch's weights: never selected on test).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from guft_jax import checkpoint as ckpt_lib
from guft_jax import optim
from guft_jax import paths as paths_lib
from guft_jax import sharding as shard_lib
from guft_jax.methods.base import EpochContext, Method
from guft_jax.methods.report import count_trainable, per_tensor, trainable_report
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
    """``loss(trainable, params, method_state, images, labels, rng=None)``; ``rng=None`` runs the
    model deterministically (no dropout/drop-path)."""

    def loss(trainable, params, method_state, images, labels, rng=None):
        variables = method.apply(params, trainable, method_state)
        if rng is None:
            logits = model.apply(variables, images, deterministic=True)
        else:
            logits = model.apply(variables, images, deterministic=False, rngs={"dropout": rng})
        return cross_entropy(logits, labels)

    return loss


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def make_train_step(
    model,
    method: Method,
    tx: optax.GradientTransformation,
    *,
    shardings: tuple | None = None,
    on_trace: Callable[[], None] | None = None,
) -> Callable:
    """The jitted train step ``step(state, params, images, labels, mask) -> (state, loss)``.

    ``state`` is donated. ``mask`` is ``()`` or an element-level bool tree shaped like
    ``state.trainable`` (see :func:`guft_jax.optim.masked_step`). ``shardings`` is
    ``(state, params, batch, mask)`` NamedShardings for ``jax.jit``; ``on_trace`` is called each
    time the step is traced (for tests and logs).
    """
    loss_fn = make_loss_fn(model, method)

    def step(state: TrainState, params, images, labels, mask):
        if on_trace is not None:
            on_trace()
        rng, drop = jax.random.split(state.rng)
        loss, grads = jax.value_and_grad(loss_fn)(
            state.trainable, params, state.method_state, images, labels, drop
        )
        trainable, opt_state = optim.masked_step(
            tx, grads, state.opt_state, state.trainable, mask if _has_leaves(mask) else None
        )
        new = TrainState(state.step + 1, trainable, opt_state, state.method_state, rng)
        return new, loss

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    state_sh, params_sh, batch_sh, mask_sh = shardings
    repl = shard_lib.replicated(batch_sh.mesh)
    return jax.jit(
        step,
        donate_argnums=(0,),
        in_shardings=(state_sh, params_sh, batch_sh, batch_sh, mask_sh),
        out_shardings=(state_sh, repl),
    )


def make_eval_step(model, method: Method) -> Callable:
    """``eval(params, trainable, method_state, images, labels, weights) -> (correct, loss_sum)``."""

    def ev(params, trainable, method_state, images, labels, weights):
        logits = model.apply(method.apply(params, trainable, method_state), images)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(correct * weights), jnp.sum(losses * weights)

    return jax.jit(ev)


def _padded(x: np.ndarray, y: np.ndarray, batch_size: int):
    n = len(x)
    w = np.ones(batch_size, np.float32)
    if n < batch_size:
        pad = batch_size - n
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros((pad,), y.dtype)])
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
) -> dict:
    """Accuracy and mean loss over a whole split (the last batch is padded and masked)."""
    correct = loss = 0.0
    n = 0
    for x, y in source.batches(
        split, batch_size=batch_size, image_size=image_size, normalization=normalization
    ):
        m = len(x)
        x, y, w = _padded(x, y.astype(np.int32), batch_size)
        x, y, w = shard_lib.put_batch((x, y, w), mesh)
        c, lsum = eval_step(params, state.trainable, state.method_state, x, y, w)
        correct += float(c)
        loss += float(lsum)
        n += m
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "num_examples": n}


def init_state(method: Method, params, tx, *, seed: int) -> TrainState:
    rng = jax.random.PRNGKey(seed)
    rng, init_rng = jax.random.split(rng)
    # A copy: the step donates the state, and a method may start from the very arrays of params.
    trainable = jax.tree_util.tree_map(jnp.copy, method.init(init_rng, params))
    mstate = method.hooks.init_state(params, trainable) if method.hooks else ()
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), mstate, rng)


class _Writer:
    """JSON lines + TensorBoard events in ``workdir`` (process 0 only)."""

    def __init__(self, workdir: str | None):
        self.workdir = workdir if jax.process_index() == 0 else None
        self.tb = None
        if self.workdir:
            os.makedirs(self.workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.workdir, "tb"))

    def write(self, step: int, record: dict) -> None:
        if not self.workdir:
            return
        with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, int | float) and k not in ("epoch", "step"):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()


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
    progress: bool = True,
    log: Callable[[str], None] = print,
    config: dict | None = None,
) -> dict:
    """Trains ``method`` on ``source`` and returns the results dict (also written to
    ``workdir/results.json``). Resumes from ``workdir``'s latest checkpoint if there is one.

    ``stop_after_epoch`` ends the run early after that epoch's checkpoint (to test resuming).
    Raises ``FloatingPointError`` on a NaN/Inf loss (the last good checkpoint is kept).
    """
    if epochs < 1:
        raise ValueError(f"epochs: must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if mesh is not None and batch_size % mesh.devices.size:
        raise ValueError(f"batch_size: {batch_size} not divisible by {mesh.devices.size} devices")
    t_start = time.time()
    n_train = source.size(train_split)
    steps_per_epoch = n_train // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size: {batch_size} exceeds the {n_train} training examples")
    total = steps_per_epoch * epochs
    tx_labels = method.labels(method.init(jax.random.PRNGKey(0), params))
    tx = optim.make_optimizer(
        labels=tx_labels,
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
        total_steps=total,
        clip_norm=clip_norm,
    )
    state = init_state(method, params, tx, seed=seed)
    log(trainable_report(method, params, state.trainable, state.method_state))

    traces = [0]
    shardings = None
    if mesh is not None:
        # The train state (small for PEFT methods, and its shapes may change when a method grows
        # its capacity) is replicated as a whole; the frozen params follow the rules.
        state_sh = shard_lib.replicated(mesh)
        params_sh = shard_lib.tree_shardings(params, mesh, param_rules)
        mask_sh = shard_lib.replicated(mesh)
        shardings = (state_sh, params_sh, shard_lib.batch_sharding(mesh), mask_sh)
        params = jax.device_put(params, params_sh)
        state = jax.device_put(state, state_sh)
    step_fn = make_train_step(
        model,
        method,
        tx,
        shardings=shardings,
        on_trace=lambda: traces.__setitem__(0, traces[0] + 1),
    )
    eval_fn = make_eval_step(model, method)

    mgr = ckpt_lib.manager(os.path.join(workdir, "checkpoints")) if workdir else None
    start_epoch = 1
    if mgr is not None and mgr.latest_step() is not None:
        if method.hooks is not None and method.hooks.resize is not None:
            tr, opt, ms = method.hooks.resize(
                state.trainable, state.opt_state, state.method_state, ckpt_lib.saved_structure(mgr)
            )
            state = state._replace(trainable=tr, opt_state=opt, method_state=ms)
        state, meta = ckpt_lib.restore(mgr, state)
        if shardings is not None:
            state = jax.device_put(state, shardings[0])
        start_epoch = int(meta["epoch"]) + 1
        log(f"resumed from {mgr.directory} at epoch {meta['epoch']}")
    writer = _Writer(workdir)
    det_loss = jax.jit(
        lambda variables, x, y: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(variables, x, deterministic=True).astype(jnp.float32), y
        )
    )

    def train_batches():
        return source.batches(
            train_split,
            batch_size=batch_size,
            image_size=image_size,
            normalization=normalization,
        )

    history = []
    for epoch in range(start_epoch, epochs + 1):
        if method.hooks is not None and method.hooks.epoch_start is not None:
            ctx = EpochContext(
                params=params,
                trainable=state.trainable,
                opt_state=state.opt_state,
                state=state.method_state,
                loss_fn=det_loss,
                batches=train_batches,
                log=log,
            )
            tr, opt, ms = method.hooks.epoch_start(epoch, ctx)
            state = state._replace(trainable=tr, opt_state=opt, method_state=ms)
            if shardings is not None:
                state = jax.device_put(state, shardings[0])
        mask = _mask_of(method, state)
        t0 = time.time()
        losses = []
        it = source.batches(
            train_split,
            batch_size=batch_size,
            image_size=image_size,
            normalization=normalization,
            shuffle=True,
            seed=seed,
            epoch=epoch,
            drop_remainder=True,
        )
        bar = tqdm(
            it,
            total=steps_per_epoch,
            disable=not progress or jax.process_index() != 0,
            desc=f"epoch {epoch}/{epochs}",
            leave=False,
        )
        for x, y in bar:
            x, y = shard_lib.put_batch((x, y.astype(np.int32)), mesh)
            state, loss = step_fn(state, params, x, y, mask)
            losses.append(loss)
            if len(losses) % 5 == 0:
                bar.set_postfix(
                    loss=f"{float(loss):.4f}",
                    img_s=f"{len(losses) * batch_size / (time.time() - t0):.1f}",
                )
        losses = np.asarray(jax.device_get(losses), np.float64)
        if not np.all(np.isfinite(losses)):
            bad = int(np.argmax(~np.isfinite(losses)))
            where = f" in {mgr.directory}" if mgr else ""
            raise FloatingPointError(
                f"non-finite training loss in epoch {epoch} (step {bad} of the epoch); stopping. "
                f"The last good checkpoint (epoch {epoch - 1}) is kept{where}."
            )
        dt = time.time() - t0
        rec = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": float(losses.mean()),
            "images_per_s": len(losses) * batch_size / dt,
            "epoch_seconds": dt,
            "traces": traces[0],
        }
        history.append(rec)
        writer.write(int(state.step), rec)
        log(f"epoch {epoch}: loss {rec['train_loss']:.4f}, {rec['images_per_s']:.1f} img/s")
        if mgr is not None:
            ckpt_lib.save(
                mgr,
                epoch,
                state,
                {"epoch": epoch, "data_position": {"epoch": epoch + 1, "step": 0}},
            )
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < epochs:
            log(f"stopping after epoch {epoch} (stop_after_epoch)")
            return {"stopped_after_epoch": epoch, "history": history, "state": state}

    results = {
        "method": method.name,
        "hparams": method.hparams,
        "trainable_params": count_trainable(state.trainable, state.method_state)[0],
        "head_params": count_trainable(state.trainable, state.method_state)[1],
        "backbone_params": count_params({k: v for k, v in params.items() if k != "head"}),
        "epochs": epochs,
        "traces": traces[0],
        "history": history,
        "config": config or {},
    }
    if eval_split is not None:
        ev = evaluate(
            eval_fn,
            params,
            state,
            source,
            eval_split,
            batch_size=batch_size,
            image_size=image_size,
            normalization=normalization,
            mesh=mesh,
        )
        results.update(
            {
                f"{eval_split}_accuracy": ev["accuracy"],
                f"{eval_split}_loss": ev["loss"],
                f"{eval_split}_examples": ev["num_examples"],
            }
        )
    results["trained_per_tensor"] = per_tensor(state.trainable, state.method_state)
    if method.hooks is not None:  # sizes of the tensors a mask method selects from (for plots)
        results["tensor_sizes"] = {
            k: int(np.size(paths_lib.get(params, k.replace(".", "/"))))
            for k in results["trained_per_tensor"]
        }
    results["wall_seconds"] = time.time() - t_start
    if workdir and jax.process_index() == 0:
        ckpt_lib.write_json_atomic(os.path.join(workdir, "results.json"), results)
    results["state"] = state
    return results


def _mask_of(method: Method, state: TrainState):
    if method.hooks is None or method.hooks.update_mask is None:
        return ()
    m = method.hooks.update_mask(state.method_state)
    # A copy: the mask's arrays live in the state, which the step donates.
    return () if m is None else jax.tree_util.tree_map(jnp.copy, m)
