"""The benchmark harness (benchmarks/harness.py): carried state, round-robin, summaries, ratios."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness


def _counter_run(warmup=1):
    """A jitted step ``(count, inc) -> (count + inc, count * 2)``: the count is carried."""
    step = jax.jit(lambda c, inc: (c + inc, c * 2.0))
    return harness.jit_run("count", step, (jnp.float32(0), jnp.float32(1)), warmup=warmup)


def test_jit_run_carries_state_through_warmup_and_rounds():
    run = _counter_run(warmup=2)
    assert float(run.args[0]) == 2.0  # the warm-up steps ran and were carried
    other = harness.Run("other", lambda: jnp.zeros(()))
    harness.round_robin({"count": run, "other": other}, 3)
    assert float(run.args[0]) == 5.0
    assert len(run.times) == len(other.times) == 3
    assert all(t >= 0 for t in run.times)
    assert run.compile_s > 0
    assert run.peak_bytes is None or run.peak_bytes > 0


def test_back_to_back_runs_each_step():
    run = _counter_run()
    harness.back_to_back(run, 4)
    assert float(run.args[0]) == 5.0


def test_jit_run_reports_flops_of_a_matmul():
    a = jnp.ones((8, 16), jnp.float32)
    b = jnp.ones((16, 4), jnp.float32)
    run = harness.jit_run("mm", jax.jit(lambda u, v: u @ v), (a, b), carry=0)
    assert float(run.args[0][0, 0]) == 1.0  # nothing carried: the arguments are unchanged
    if run.flops:  # the CPU backend reports 2*m*k*n for a matmul
        assert run.flops == pytest.approx(2 * 8 * 16 * 4, rel=0.1)


def test_prepare_records_a_failing_case_and_keeps_the_others():
    def broken():
        raise ValueError("no such kernel")

    failed, lines = {}, []
    cases = [harness.Case("bad", broken), harness.Case("ok", _counter_run)]
    runs = harness.prepare(cases, lines.append, failed)
    assert list(runs) == ["ok"]
    assert failed == {"bad": "ValueError: no such kernel"}
    assert any("bad: FAILED" in s for s in lines)


def test_summary_and_ratios_against_the_reference():
    full = harness.Run("full", lambda: None, flops=100.0, peak_bytes=400, info={"x": 1})
    full.times = [2.0, 4.0, 3.0]
    lora = harness.Run("lora", lambda: None, flops=50.0, peak_bytes=100)
    lora.times = [1.0, 1.0, 6.0]
    rows = {k: harness.summary(r, batch=10) for k, r in {"full": full, "lora": lora}.items()}
    assert rows["full"]["step_s"] == 3.0 and rows["full"]["images_per_s"] == 10 / 3.0
    assert rows["full"]["x"] == 1 and rows["full"]["flops_per_s"] == 100.0 / 3.0
    harness.with_ratios(rows, "full")
    r = rows["lora"]
    assert r["step_vs_full"] == 1.0 / 3.0
    assert r["peak_vs_full"] == 0.25 and r["flops_vs_full"] == 0.5
    assert "opt_state_vs_full" not in r  # neither row holds optimizer-state bytes
    assert r["step_vs_full_per_rep"] == [0.5, 0.25, 2.0]
    assert r["step_vs_full_per_rep_median"] == 0.5
    assert r["step_vs_full_min"] == 0.5
    assert rows["full"]["step_vs_full"] == 1.0


def test_ratios_skip_a_missing_reference():
    rows = {"lora": dict(step_s=1.0, times_s=[1.0])}
    assert harness.with_ratios(rows, "full") == {"lora": dict(step_s=1.0, times_s=[1.0])}


def test_tree_bytes_counts_array_leaves():
    tree = {"a": np.zeros((3, 4), np.float32), "b": (jnp.zeros(5, jnp.bfloat16), None, "s")}
    assert harness.tree_bytes(tree) == 3 * 4 * 4 + 5 * 2


def test_apply_defaults_fills_only_unset_options():
    import argparse

    ns = argparse.Namespace(batch=None, reps=3)
    harness.apply_defaults(ns, dict(batch=50, reps=7))
    assert (ns.batch, ns.reps) == (50, 3)
