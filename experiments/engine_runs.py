"""Training an engine row's jobs (alone or packed into one program) and their records.

A final run's record also holds XLA's peak-memory estimate of its compiled train step
(:func:`step_peak_bytes`) and, for a method registered with a
:class:`guft_jax.methods.base.RankEval`, its accuracy at each truncated rank
(:func:`rank_accuracies`).
"""

from __future__ import annotations

import time

import numpy as np

from guft_jax.methods import spec


def rank_accuracies(model, params, method, state, source, rank_eval, *, split, **eval_kw) -> dict:
    """``{rank: {"accuracy", "trainable_params"}}``: one trained ``state`` evaluated on ``split``
    as the method each rank of ``rank_eval.ranks`` up to the run's own truncates it to (no
    retraining; ranks above the run's are skipped).

    ``eval_kw``: :func:`guft_jax.train.evaluate`'s ``batch_size``, ``image_size`` and
    ``normalization``.
    """
    from guft_jax import train
    from guft_jax.methods import base as mbase

    out = {}
    for b in rank_eval.ranks:
        if b > method.hparams[rank_eval.hparam]:
            continue
        m, tr = rank_eval.truncate(method, state.trainable, b)
        st = state._replace(trainable=tr, method_state=mbase.init_state(m, params, tr))
        ev = train.evaluate(train.make_eval_step(model, m), params, st, source, split, **eval_kw)
        n = sum(mbase.trained_counts(m, params, tr, st.method_state).values())
        out[b] = dict(accuracy=ev["accuracy"], trainable_params=int(n))
    return out


def _eval_kw(c) -> dict:
    return dict(batch_size=c.batch_size, image_size=c.image_size, normalization=c.normalization)


def step_peak_bytes(c) -> int | None:
    """XLA's peak-memory estimate of the run's compiled train step (arguments + outputs +
    temporaries - aliased, as ``benchmarks/step_bench.py``), at the run's batch and image size,
    after the method's epoch-1 hook (masks selected); ``None`` where the backend gives none."""
    from experiments.configs.common import train_config
    from experiments.run import build
    from guft_jax import memory_plan, train
    from guft_jax import precision as precision_lib
    from guft_jax.methods import base as mbase

    model, params, src, method = build(c)
    t = train_config(c)
    model = precision_lib.with_precision(model, t.precision)  # as the run's step
    params = mbase.prepare_base(method, params)
    x, y = next(iter(src.batches(c.train_split, **_eval_kw(c))))
    y = y.astype(np.int32)
    steps = src.size(c.train_split) // c.batch_size
    tx, state = train.optimizer_from(method, params, t, steps)
    state = train.epoch_start(model, method, params, state, 1, batches=lambda: [(x, y)],
                              epochs=c.epochs, log=lambda s: None)  # fmt: skip
    step = train.make_train_step(model, method, tx, total_steps=steps * c.epochs)
    return memory_plan.compiled_peak_bytes(step.lower(state, params, x, y, ()).compile())


def fit_one(c, final: bool) -> dict:
    """A run alone; a final run also gets its step's peak memory and its method's rank
    evaluation (when registered)."""
    from experiments.run import build, fit_config

    fr = fit_config(c, None, log=lambda s: None)
    res = dict(fr.results)
    if not final:
        return res
    rank_eval = spec(c.method).rank_eval
    if rank_eval is not None:
        model, params, src, method = build(c)
        ranks = rank_accuracies(model, params, method, fr.state, src, rank_eval,
                                split=c.eval_split, **_eval_kw(c))  # fmt: skip
        res["rank_accuracy"] = {str(b): r["accuracy"] for b, r in ranks.items()}
        res["rank_params"] = {str(b): r["trainable_params"] for b, r in ranks.items()}
    res["peak_bytes"] = step_peak_bytes(c)
    return res


def fit_group(configs: list, final: bool) -> list[dict]:
    """The results of runs of one (kind, task, row): alone, or packed into one program."""
    from experiments.configs.common import train_config
    from experiments.run import build, source_for
    from guft_jax.packing import fit_packed

    if len(configs) == 1:
        return [fit_one(configs[0], final)]
    c0 = configs[0]
    model, params, _, method = build(c0)
    _, results = fit_packed(
        model,
        params,
        method,
        [source_for(c) for c in configs],
        train_config(c0),  # progress off: the row config sets it
        lrs=[c.lr for c in configs],
        head_lrs=[c.head_lr for c in configs],
        seeds=[c.seed for c in configs],
    )
    return results


def record(job, row, c, res: dict, wall_s: float) -> dict:
    """The JSON record of an engine ``job`` of ``row`` run with config ``c``: a selection
    candidate's val200 score, or a final run's test accuracy, counts, timing and config."""
    if job.kind == "select":
        return {"task": job.task, "method": row.name, row.key: job.factor, "lr": row.tuned_lr(c),
                "val_accuracy": res["val200_accuracy"], "wall_s": wall_s}  # fmt: skip
    steady = res["history"][1:] or res["history"]
    return dict(
        task=job.task,
        method=row.name,
        seed=job.seed,
        test_accuracy=res["test_accuracy"],
        val_accuracy=job.val_accuracy,
        test_examples=res["test_examples"],
        trainable_params=res["trainable_params"],
        backbone_params=res["backbone_params"],
        step_s=float(np.mean([c.batch_size / h["images_per_s"] for h in steady])),
        wall_s=wall_s,
        traces=res["traces"],
        packed_runs=res.get("packed_runs", 1),
        config=c.to_dict(),
        trained_per_tensor=res["trained_per_tensor"],
        tensor_sizes=res.get("tensor_sizes", {}),
        **{k: res[k] for k in ("peak_bytes", "rank_accuracy", "rank_params") if k in res},
    )


def run(row, jobs: list, *, epochs: int, image_size: int, guft_path: str) -> list[dict]:
    """The records of ``jobs`` of one (kind, task, row). A diverged selection candidate is
    scored 0 on val200 and reported; a diverged final run raises."""
    t0 = time.time()
    configs = [row.config(j, epochs=epochs, image_size=image_size, guft_path=guft_path)
               for j in jobs]  # fmt: skip
    final = jobs[0].kind == "final"
    try:
        results = fit_group(configs, final)
    except FloatingPointError as e:
        if final:
            raise
        return [{"task": j.task, "method": row.name, row.key: j.factor, "lr": row.tuned_lr(c),
                 "val_accuracy": 0.0, "diverged": str(e)[:200]}
                for j, c in zip(jobs, configs, strict=True)]  # fmt: skip
    wall = (time.time() - t0) / len(jobs)
    return [record(j, row, c, r, wall) for j, c, r in zip(jobs, configs, results, strict=True)]
