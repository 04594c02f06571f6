"""Train one (dataset, method) run from an ml_collections config; resumes from --workdir.

    python -m experiments.run --config experiments/configs/offline.py:animal_mnist,guft \
        --workdir runs/animal_guft [--config.epochs=5 --config.seed=1 ...] [--fresh] [--debug]

Multi-process (one command per process, the same on each; JAX's multi-controller runtime)::

    python -m experiments.run --config ... --workdir /shared/run \
        --coordinator_address=host0:1234 --num_processes=2 --process_id=0 \
        --config.fsdp=4 --config.batch_size=64

(or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables;
``--coordinator_address=auto`` lets JAX detect a TPU pod slice or a SLURM job). Every process
meshes all devices, loads only its rows of each batch; process 0 writes logs, metrics and
results, all processes write their shards of each checkpoint (``workdir`` must be shared).

Writes ``workdir/metrics.jsonl``, TensorBoard events in ``workdir/tb``, orbax checkpoints in
``workdir/checkpoints`` (every epoch) and ``workdir/results.json`` (full config, the data's
classes, split sizes and notes, test accuracy, #trainable params, wall time). Re-running the same
command resumes from the newest intact checkpoint; only ``epochs`` and the progress options may
change on resume, ``--fresh`` starts over. The workdir is locked for the whole run, from before
any data is read.

A bad input (a data file, a config value, a workdir in use or holding another run or other
data, a damaged checkpoint, a NaN loss) and every operating-system error (read-only folder, no
space, a path too long, a folder where a file should be, no permission) prints one line
``error: <message>`` to stderr naming the path and the problem and exits with code 2; the
checkpoint library's background-thread reports are kept from the terminal. Ctrl-C stops after
the current step, keeps nothing of the unfinished epoch, prints ``interrupted at epoch E step
S; rerun the same command to resume`` and exits with code 130. ``--debug`` raises errors with
their traceback and leaves the library logs on instead.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import signal
import sys
import threading

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs.common import PRETRAINED, train_config, validate
from guft_jax import checkpoint_import, compile_cache, distributed, rundir, sharding, train, vit
from guft_jax.config import Hooks
from guft_jax.data import get_source
from guft_jax.errors import InputError, Interrupted, one_line, os_error_line
from guft_jax.methods import get_method
from guft_jax.pretrained import load_pretrained

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file:arg")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, results)")
_FRESH = flags.DEFINE_bool(
    "fresh",
    False,
    "delete the workdir's checkpoints, metrics, TensorBoard events and results first",
)
_DEBUG = flags.DEFINE_bool("debug", False, "raise errors with their Python traceback")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "multi-process: host:port of process 0's coordinator ('auto': JAX detects TPU / SLURM); "
    "default $JAX_COORDINATOR_ADDRESS",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "multi-process: how many (default $JAX_NUM_PROCESSES)"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "multi-process: this process's id (default $JAX_PROCESS_ID)"
)
_CACHE_DIR = flags.DEFINE_string(
    "compile_cache_dir",
    None,
    "JAX persistent compilation cache dir ('' off; default $GUFT_JAX_CACHE_DIR or "
    "~/.cache/guft_jax/xla)",
)

# What a user causes and can fix: one line on stderr, exit code 2. InputError (bad data files,
# a locked workdir, a changed config, damaged checkpoints) and CheckpointStructureError are
# ValueErrors; FloatingPointError is a NaN/Inf loss; the packaged datasets' install hints are
# FileNotFoundError / ModuleNotFoundError.
USER_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, FloatingPointError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


def error_line(e: BaseException) -> str:
    """The one line a user sees for an error: an ``OSError`` names its path and the reason
    (a library's own message for a missing file is kept), anything else its message."""
    if isinstance(e, OSError) and not isinstance(e, InputError) and e.errno:
        return f"error: {os_error_line(e)}"
    return f"error: {one_line(str(e))}"


def quiet_libraries() -> None:
    """Keeps the checkpoint library's background-thread reports off the terminal: its writer
    threads log each failure with a traceback before the failure reaches :func:`main`, which
    prints it once. Log records at FATAL level and the main thread's uncaught errors still
    show."""
    logging.set_verbosity(logging.FATAL)
    std_logging.getLogger().setLevel(std_logging.CRITICAL)
    for name in ("asyncio", "absl", "orbax", "jax"):
        std_logging.getLogger(name).setLevel(std_logging.CRITICAL)
    threading.excepthook = lambda args: None
    # tensorstore's native threads report callbacks into orbax's closed event loop through
    # sys.excepthook ("Event loop is closed"); the main thread's own errors still print.
    default = sys.excepthook

    def hook(kind, value, tb):
        if threading.current_thread() is threading.main_thread():
            default(kind, value, tb)

    sys.excepthook = hook
    # ...and some print straight to sys.stderr from their own threads: only the main thread's
    # lines (the notices, the progress bar, the error line) reach the terminal.
    sys.stderr = MainThreadOnly(sys.stderr)


class MainThreadOnly:
    """A text stream that passes on the main thread's writes and drops the other threads'."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def leave(line: str, code: int) -> None:
    """Prints ``line`` on stderr and ends the process at once with ``code``.

    Everything of the run is closed by then (the workdir's lock released, files whole); ending
    without the interpreter's shutdown keeps the checkpoint library's native threads from
    reporting callbacks into its closed event loop ("Event loop is closed") after the line.
    """
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(code)


class StopFlag:
    """Ctrl-C (SIGINT) sets the flag the training loop asks after every step; a second Ctrl-C
    interrupts at once (the default handler is back)."""

    def __init__(self):
        self.set = False

    def __call__(self) -> bool:
        return self.set

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


def source_for(c):
    """The config's data source: offline sets split with ``c.seed`` and the config's
    ``train_size`` / ``val_size`` / ``test_size`` (0 or absent: the dataset's default; counts
    or fractions) and ``skip_bad``; VTAB tasks read tfds' ``c.data_dir`` / ``c.version`` when
    the config has them."""
    if c.dataset.startswith("vtab/"):
        kw = {k: c.get(k) for k in ("data_dir", "version") if c.get(k)}
        return get_source(c.dataset, **kw)
    kw = {k: c.get(k) for k in ("train_size", "val_size", "test_size") if c.get(k)}
    if c.get("skip_bad"):
        kw["skip_bad"] = True
    return get_source(c.dataset, seed=c.seed, **kw)


def build(c):
    """``(model, params, source, method)`` for a validated config."""
    source = source_for(c)
    n = source.num_classes
    if c.model in PRETRAINED:
        model, params = load_pretrained(c.model, num_classes=n, image_size=c.image_size)
    else:
        model = vit.build_model(c.model, num_classes=n)
        if c.checkpoint.endswith(".npz"):
            params = checkpoint_import.load_vit_jax_npz(c.checkpoint, model, c.image_size)
        elif c.checkpoint.endswith(".safetensors"):
            params = checkpoint_import.load_hf_safetensors(c.checkpoint, model, c.image_size)
        else:
            params = vit.init_params(model, jax.random.PRNGKey(c.seed), c.image_size)
    if c.get("remat", False):
        model = model.clone(remat=True)
    method = get_method(c.method, **c.method_kwargs.to_dict())
    return model, params, source, method


def fit_config(
    c, workdir: str | None = None, *, source=None, log=print, fresh: bool = False, stop=None
) -> train.FitResult:
    """Trains the run a validated config describes (the one ``train.fit`` call of the experiment
    scripts); ``source`` overrides the config's dataset (same name and splits).

    The workdir's lock is taken before anything is read or built, so a second run on it fails
    at once (naming the holder's pid); ``fresh`` deletes the workdir's run files first;
    ``stop`` is ``train.fit``'s (a Ctrl-C flag).
    """
    validate(c)
    if workdir is not None and not str(workdir).strip():
        raise InputError("--workdir is empty; give a folder for the run's checkpoints and records")
    lock = rundir.acquire_lock(workdir) if workdir and jax.process_index() == 0 else None
    try:
        model, params, src, method = build(c)
        fsdp = int(c.get("fsdp", 1))
        mesh = None
        if c.num_devices or fsdp > 1 or jax.process_count() > 1:
            n = None if jax.process_count() > 1 else (c.num_devices or None)
            mesh = sharding.make_mesh(n, fsdp=fsdp)
        rules = sharding.FSDP_RULES if fsdp > 1 else ()
        return train.fit(
            model,
            params,
            method,
            source if source is not None else src,
            train_config(c, param_rules=rules, lock=False, fresh=fresh),  # lock: held here
            workdir=workdir,
            mesh=mesh,
            hooks=Hooks(log=log, stop=stop),
        )
    finally:
        if lock is not None:
            rundir.release_lock(lock)


def run(c, workdir: str | None, log=print, *, fresh: bool = False, stop=None) -> dict:
    """:func:`fit_config`'s JSON-able results."""
    return fit_config(c, workdir, log=log, fresh=fresh, stop=stop).results


def main(argv):
    del argv
    if _DEBUG.value:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    else:
        quiet_libraries()
    stop = StopFlag()
    stop.install()
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        compile_cache.enable(_CACHE_DIR.value)
        if _WORKDIR.value is None:
            raise InputError("--workdir is required")
        res = run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value, stop=stop)
    except Interrupted as e:
        leave(str(e), EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        leave("interrupted; rerun the same command to resume", EXIT_INTERRUPTED)
    except (*USER_ERRORS, OSError) as e:
        if _DEBUG.value:
            raise
        leave(error_line(e), EXIT_USER_ERROR)
    drop = ("history", "config", "trained_per_tensor", "tensor_sizes", "data")
    if jax.process_index() != 0:
        return
    print(json.dumps({k: v for k, v in res.items() if k not in drop}, default=str))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
