"""The benchmark harness: cases compiled once, timed round-robin, summarised against a reference.

Every step benchmark (``benchmarks.step_bench``'s groups, ``benchmarks.fit_bench``'s bare step,
``benchmarks.own_loop_bench``) measures the same way:

1. each case is built (:class:`Case`: a name and a function returning a :class:`Run`); a jitted
   case is lowered and compiled once (:func:`jit_run`), which gives its compile seconds, XLA's
   peak-memory estimate (:func:`guft_jax.memory_plan.compiled_peak_bytes`) and its FLOPs
   (``cost_analysis``), then warmed up;
2. the cases run round-robin (:func:`round_robin`), so machine noise hits every case alike;
3. each case's median step (:func:`summary`) is divided by the reference case's of the same run
   (:func:`add_ratios`: ``step_vs_full``, ``peak_vs_full``, per-round ratios, ...).

Results go to JSON with the machine's description (:mod:`benchmarks.common`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from benchmarks import common
from guft_jax import memory_plan, train


@dataclasses.dataclass
class Run:
    """A prepared case: ``step()`` dispatches one step (its result is waited on by the timer).

    Attributes:
      name: the case's row name.
      step: ``() -> outputs``; the harness blocks on the outputs to time the step.
      compile_s: seconds to compile (0 where nothing was compiled here).
      peak_bytes: XLA's peak-memory estimate of the compiled step, or the peer's measured peak.
      flops: the step's FLOPs from ``cost_analysis`` (0.0 when unknown).
      info: extra fields copied into the case's summary row (trainable count, state bytes, ...).
      args: the step's current arguments (the carried state after the last step).
      times: seconds of each timed step, in order.
    """

    name: str
    step: Callable[[], Any]
    compile_s: float = 0.0
    peak_bytes: int | None = None
    flops: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)
    args: list = dataclasses.field(default_factory=list)
    times: list = dataclasses.field(default_factory=list)


class Case(NamedTuple):
    """A benchmark row: its name and a function building its :class:`Run` (may raise)."""

    name: str
    build: Callable[[], Run]


def tree_bytes(tree) -> int:
    """Bytes held by the array leaves of ``tree``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def cost_flops(compiled) -> float:
    """The FLOPs XLA's ``cost_analysis`` gives for a compiled program (0.0 when it gives none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def compile_lowered(lowered) -> tuple[Any, float]:
    """``(compiled, seconds)`` of ``lowered.compile()``."""
    t = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t


def jit_run(
    name: str, fn, args, *, carry: int = 1, warmup: int = 1, info: dict | None = None
) -> Run:
    """A jitted ``fn`` compiled for ``args``, warmed up, as a :class:`Run`.

    Each step feeds the first ``carry`` outputs back as the first ``carry`` arguments (a train
    step's donated state: ``(state, loss) = step(state, ...)``).

    Args:
      name: the case's row name.
      fn: a ``jax.jit``-wrapped function.
      args: its arguments.
      carry: how many leading outputs replace the leading arguments after each step.
      warmup: steps run before timing (the first one also checks the program runs).
      info: extra fields for the case's summary row.
    """
    compiled, compile_s = compile_lowered(fn.lower(*args))
    box = list(args)

    def step():
        out = compiled(*box)
        if carry:
            box[:carry] = out[:carry]
        return out

    for _ in range(warmup):
        jax.block_until_ready(step())
    return Run(
        name=name,
        step=step,
        compile_s=compile_s,
        peak_bytes=memory_plan.compiled_peak_bytes(compiled),
        flops=cost_flops(compiled),
        info=dict(info or {}),
        args=box,
    )


def prepare(cases: Iterable[Case], log: Callable[[str], None], failed: dict) -> dict[str, Run]:
    """Builds every case; one that raises is recorded in ``failed`` (name -> error) and skipped,
    so one row failing does not lose the others."""
    runs = {}
    for case in cases:
        try:
            runs[case.name] = case.build()
        except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others
            failed[case.name] = f"{type(e).__name__}: {str(e)[:500]}"
            log(f"  {case.name}: FAILED {failed[case.name]}")
            continue
        log(f"  {case.name}: compiled in {runs[case.name].compile_s:.1f}s")
    return runs


def timed(run: Run) -> float:
    """Seconds of one step of ``run``, its outputs waited on."""
    t = time.perf_counter()
    jax.block_until_ready(run.step())
    return time.perf_counter() - t


def round_robin(runs: dict[str, Run], reps: int, log: Callable[[str], None] | None = None):
    """``reps`` rounds of one step of every run, in turn; each step's seconds go to its ``times``.

    Interleaving makes machine noise hit every case alike, so ratios within a run hold even on
    a busy machine.
    """
    for i in range(reps):
        for r in runs.values():
            r.times.append(timed(r))
        if log is not None:
            log(
                f"  rep {i + 1}/{reps}: "
                + ", ".join(f"{k} {r.times[-1]:.3f}s" for k, r in runs.items())
            )


def back_to_back(run: Run, steps: int) -> float:
    """Seconds of ``steps`` steps of ``run`` dispatched back to back, waited on once at the end
    (what a perfect input pipeline would sustain)."""
    t = time.perf_counter()
    out = None
    for _ in range(steps):
        out = run.step()
    jax.block_until_ready(out)
    return time.perf_counter() - t


def summary(run: Run, *, batch: int | None = None) -> dict:
    """A run's row: median step seconds, the per-step times, compile seconds, FLOPs, peak bytes
    (and images/s and FLOP/s), followed by the run's ``info`` fields."""
    med = float(np.median(run.times))
    row = dict(
        step_s=med,
        times_s=list(run.times),
        compile_s=run.compile_s,
        flops=run.flops,
        flops_per_s=run.flops / med if run.flops else None,
        peak_bytes=run.peak_bytes,
    )
    if batch is not None:
        row["images_per_s"] = batch / med
    row.update(run.info)
    return row


# field of a row -> the prefix of its ratio's name (``step_s`` -> ``step_vs_full``)
RATIO_FIELDS = {
    "step_s": "step",
    "opt_state_bytes": "opt_state",
    "peak_bytes": "peak",
    "flops": "flops",
}


def add_ratios(row: dict, ref: dict, suffix: str) -> dict:
    """Adds ``<field>_vs_<suffix>`` to ``row`` for each of :data:`RATIO_FIELDS` both rows hold
    (non-zero), and the per-round step ratios when both rows hold their ``times_s``:
    ``step_vs_<suffix>_per_rep`` (round-robin pairs), its median, and ``step_vs_<suffix>_min``
    (the least disturbed steps: a shared machine only ever adds time). Returns ``row``."""
    for field, prefix in RATIO_FIELDS.items():
        if row.get(field) and ref.get(field):
            row[f"{prefix}_vs_{suffix}"] = row[field] / ref[field]
    mine, theirs = row.get("times_s"), ref.get("times_s")
    if mine and theirs and len(mine) == len(theirs):
        per = [a / b for a, b in zip(mine, theirs, strict=True)]
        row[f"step_vs_{suffix}_per_rep"] = per
        row[f"step_vs_{suffix}_per_rep_median"] = float(np.median(per))
        row[f"step_vs_{suffix}_min"] = min(mine) / min(theirs)
    return row


def with_ratios(rows: dict[str, dict], ref_name: str, suffix: str | None = None) -> dict:
    """:func:`add_ratios` of every row against ``rows[ref_name]`` (suffix: ``ref_name``); rows
    unchanged where the reference is missing (it failed or was not asked for)."""
    ref = rows.get(ref_name)
    if ref is not None:
        for row in rows.values():
            add_ratios(row, ref, suffix or ref_name)
    return rows


def timed_fit(model, params, method, source, config, *, log=lambda s: None) -> tuple[Any, float]:
    """``(FitResult, wall seconds)`` of one ``train.fit`` of ``method`` (progress bars off).

    Args:
      model: the Flax model.
      params: its params.
      method: the method to train.
      source: the data source.
      config: the run's :class:`guft_jax.config.TrainConfig`.
      log: receives the run's log lines.
    """
    t = time.perf_counter()
    r = train.fit(model, params, method, source, config.replace(progress=False), hooks=log)
    return r, time.perf_counter() - t


def apply_defaults(ns, defaults: dict) -> None:
    """Sets each attribute of ``ns`` (an ``argparse.Namespace``) that is still ``None`` to its
    entry in ``defaults`` (a benchmark's per-mode defaults)."""
    for k, v in defaults.items():
        if getattr(ns, k) is None:
            setattr(ns, k, v)


def write_each(results: Iterable[dict], out: str, log: Callable[[str], None] = print) -> dict:
    """Writes each result a benchmark yields to ``out`` (JSON, with ``wall_s`` since the first
    was asked for), so a long run keeps what it measured so far; returns the last one."""
    t0 = time.time()
    res = {}
    for res in results:
        res["wall_s"] = time.time() - t0
        common.write_json(out, res)
        log(f"wrote {out} ({res['wall_s']:.0f} s)")
    return res
