"""Resuming a run: the workdir opened (lock, fresh start, stale temporaries), the newest intact
checkpoint restored after its method, config fingerprint and data were checked, the finished
run's ``results.json`` read back, and what a resume changed noted.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import jax

from guft_jax import checkpoint as ckpt_lib
from guft_jax import rundir
from guft_jax.methods.base import Method
from guft_jax.step import TrainState


def restore_run(
    mgr,
    state: TrainState,
    *,
    method: Method,
    config: dict | None,
    workdir: str | None,
    data: dict | None = None,
    shardings: tuple | None = None,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> tuple[TrainState, dict | None]:
    """``(state, meta)`` of the newest intact checkpoint (``meta`` None: nothing to resume).

    Refuses another method's checkpoint, other data (``data``: :func:`guft_jax.data.data_identity`
    of the splits the run reads) and (with ``config``, the mapping
    :func:`guft_jax.rundir.fingerprint` takes) a changed config before reading any
    array; damaged steps are named on ``warn``, moved aside and skipped.
    """
    if mgr is None:
        return state, None

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
    if shardings is not None:
        state = jax.device_put(state, shardings[0](state))
    log(f"resumed from {mgr.directory} at epoch {meta['epoch']}")
    return state, meta


def open_workdir(stack, workdir: str | None, *, lock: bool, fresh: bool, log) -> None:
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


def resume_notes(meta: dict | None, epochs: int, step: int, log) -> dict:
    """``{"epochs_changed_on_resume": [old, new]}`` when a resume changed ``epochs`` (logged)."""
    if meta is None or meta.get("epochs") in (None, epochs):
        return {}
    log(
        f"epochs changed on resume: {meta['epochs']} -> {epochs}; the learning-rate schedule "
        f"now spans {epochs} epochs, from step {step} on"
    )
    return {"epochs_changed_on_resume": [meta["epochs"], epochs]}


def read_results(path: str, epochs: int) -> dict | None:
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
def closing(close: Callable[[], None]):
    """Calls ``close`` on the way out; when the block failed, a second failure of ``close``
    (a full disk fails the flush too) does not replace the first error."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            close()
        raise
    close()
