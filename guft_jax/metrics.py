"""A run's metrics writer: ``metrics.jsonl`` and TensorBoard events in the run directory, cut
back to the restored step on a resume so that every epoch is logged exactly once."""

from __future__ import annotations

import os
from collections.abc import Callable

import jax

from guft_jax import rundir


class MetricsWriter:
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
