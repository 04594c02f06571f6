"""Run directories that cannot mix or lie: a lock, a config fingerprint, metrics cut on resume.

A run directory (``workdir``) holds::

    .lock            fcntl lock of the process using the directory (its pid inside)
    checkpoints/     orbax steps, one per epoch (guft_jax.checkpoint); the fingerprint in meta
    metrics.jsonl    one JSON record per epoch, each with its optimizer ``step``
    tb/              TensorBoard events
    results.json     written once at the end, atomically

The rules the training engine applies with these primitives:

- **One process per directory.** :func:`acquire_lock` takes an exclusive, non-blocking
  ``flock`` on ``workdir/.lock`` and writes the holder's pid into it; a second process fails at
  once with :class:`~guft_jax.errors.WorkdirLockedError` naming that pid. The kernel drops the
  lock when its holder dies (even by ``kill -9``), so a stale file never blocks a new run.
- **A resume continues the same run.** :func:`fingerprint` flattens the run's config
  (``method_kwargs.rank``); it is stored with every checkpoint and :func:`check_resume_config`
  refuses a resume whose config differs in anything but :data:`RESUMABLE_FIELDS` (``epochs``
  and the progress/stop options), naming each changed field with both values.
- **Each epoch is logged once.** On resume :func:`truncate_metrics` keeps only the records with
  ``step <= restored step`` (and drops a torn last line left by a kill), and
  :func:`rewrite_tensorboard` deletes ``tb/`` and writes those kept records again, so the
  events hold exactly the epochs in ``metrics.jsonl`` (earlier events' wall times are lost).
- **Files are whole or absent.** :func:`write_json_atomic` writes a temporary file in the same
  folder, fsyncs it and renames it over the target.
- **The same data.** :func:`check_resume_data` refuses a resume whose splits' image counts or
  content hashes (:func:`guft_jax.data.data_identity`, stored with every checkpoint) differ,
  naming each changed split.
- **The records describe the model.** ``results.json`` holds the whole ``metrics.jsonl``
  history and the epochs trained; rerunning a finished run leaves every file as it is, and
  fewer epochs than were trained is refused (:func:`guft_jax.train.fit`).
- **A refusal holds.** Damaged steps moved to ``<step>.damaged`` stay there: while no intact
  step is left, every rerun is refused until ``--fresh``
  (:func:`guft_jax.checkpoint.quarantined`).
- **Operating-system errors are one line.** The workdir is checked before any work (empty, a
  file, a path too long for the file system's limit with :data:`PATH_RESERVE` characters to
  spare) and an ``OSError`` on the lock or an atomic write names its path
  (:func:`guft_jax.errors.os_error_line`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from guft_jax.errors import (
    ConfigChangedError,
    DataChangedError,
    InputError,
    WorkdirLockedError,
    os_error_line,
    short_path,
)

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
TB_NAME = "tb"
CHECKPOINTS_NAME = "checkpoints"
# The longest path a run writes below its workdir: an orbax temporary step folder's chunk file
# (``checkpoints/<step>.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/...``).
PATH_RESERVE = 256
# Config fields a resume may change: the length of the run and what is printed.
RESUMABLE_FIELDS = ("epochs", "progress", "stop_after_epoch")
# Fields added to the fingerprint after checkpoints without them were written: such a checkpoint
# resumes (the field's value then was the only one there was: the per-backend default).
ADDED_FIELDS = ("kernels",)


# ----------------------------------------------------------------------------- lock


class WorkdirLock(NamedTuple):
    """A held lock: the lock file's path and its open descriptor."""

    path: str
    fd: int


def _check_workdir(workdir: str) -> None:
    if not str(workdir).strip():
        raise InputError("--workdir is empty; give a folder for the run's checkpoints and records")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise InputError(f"workdir {short_path(workdir)} is a file, not a folder")
    full = os.path.abspath(workdir)
    limit = _path_max(full)
    if len(full) + PATH_RESERVE > limit:
        raise InputError(
            f"workdir {short_path(full)} is {len(full)} characters long; the run's files add up "
            f"to {PATH_RESERVE} more and paths are limited to {limit} characters here: use a "
            "shorter --workdir"
        )


def _path_max(path: str) -> int:
    """The file system's path length limit at the nearest existing folder above ``path``."""
    probe = path
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        return int(os.pathconf(probe or "/", "PC_PATH_MAX"))
    except (OSError, ValueError):
        return 4096


def acquire_lock(workdir: str) -> WorkdirLock:
    """Takes the exclusive lock on ``workdir`` (created if needed) or fails at once.

    Args:
      workdir: the run directory.

    Returns:
      The held :class:`WorkdirLock`; give it to :func:`release_lock`.

    Raises:
      WorkdirLockedError: another process holds it; the message names its pid.
      InputError: ``workdir`` is empty, a file, or cannot be created or written (read-only,
        no permission, a path too long, a ``.lock`` that is a folder): one line naming the
        path and the operating system's reason.

    >>> lock = acquire_lock("/tmp/run")  # doctest: +SKIP
    >>> release_lock(lock)  # doctest: +SKIP
    """
    _check_workdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        e.filename = workdir
        raise InputError(f"workdir cannot be created: {os_error_line(e)}") from e
    path = os.path.join(workdir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        e.filename = path
        raise InputError(f"workdir lock cannot be opened: {os_error_line(e)}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirLockedError(
            f"workdir {short_path(workdir)} is in use by process {holder} (lock "
            f"{short_path(path)}); wait for it to finish or use another --workdir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        e.filename = path
        raise InputError(f"workdir lock cannot be written: {os_error_line(e)}") from e
    return WorkdirLock(path, fd)


def release_lock(lock: WorkdirLock) -> None:
    """Releases a lock from :func:`acquire_lock` (the file stays, emptied)."""
    try:
        os.ftruncate(lock.fd, 0)
    finally:
        fcntl.flock(lock.fd, fcntl.LOCK_UN)
        os.close(lock.fd)


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[WorkdirLock]:
    """``with locked(workdir):`` holds :func:`acquire_lock` for the block."""
    lock = acquire_lock(workdir)
    try:
        yield lock
    finally:
        release_lock(lock)


# ----------------------------------------------------------------------------- fingerprint


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k in sorted(tree, key=str):
            out.update(_flatten(tree[k], f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def fingerprint(config: Mapping, *, ignore: Iterable[str] = RESUMABLE_FIELDS) -> dict[str, Any]:
    """The comparable form of a run's config: flat ``{"a.b": value}``, JSON values, sorted.

    Args:
      config: the run's config as a (nested) dict, e.g. ``ConfigDict.to_dict()``.
      ignore: top-level fields left out (those a resume may change).

    Returns:
      A JSON-serialisable dict (tuples become lists).

    >>> fingerprint({"lr": 0.1, "epochs": 3, "method_kwargs": {"rank": 8}})
    {'lr': 0.1, 'method_kwargs.rank': 8}
    """
    ignore = set(ignore)
    normal = json.loads(json.dumps(dict(config), default=str, sort_keys=True))
    return {k: v for k, v in _flatten(normal).items() if k.split(".")[0] not in ignore}


def config_changes(saved: Mapping, current: Mapping) -> list[str]:
    """``["lr: 0.01 -> 0.5", ...]`` for every field that differs between two fingerprints."""

    def show(d, k):
        return json.dumps(d[k]) if k in d else "(absent)"

    return [
        f"{k}: {show(saved, k)} -> {show(current, k)}"
        for k in sorted(set(saved) | set(current))
        if k not in saved or k not in current or saved[k] != current[k]
    ]


def check_resume_config(
    saved: Mapping | None,
    config: Mapping,
    *,
    workdir: str,
    ignore: Iterable[str] = RESUMABLE_FIELDS,
) -> None:
    """Refuses to resume ``workdir`` with a config that differs from the stored fingerprint.

    Args:
      saved: the fingerprint stored with the checkpoint (``None``: an older checkpoint without
        one, accepted).
      config: the config of the run about to resume.
      workdir: named in the message.
      ignore: fields that may change (default :data:`RESUMABLE_FIELDS`).

    Raises:
      ConfigChangedError: naming each changed field with its stored and new value.
    """
    if saved is None:
        return
    current = fingerprint(config, ignore=ignore)
    for added in ADDED_FIELDS:
        if not any(k.split(".")[0] == added for k in saved):
            current = {k: v for k, v in current.items() if k.split(".")[0] != added}
    changes = config_changes(saved, current)
    if changes:
        shown = "; ".join(changes[:8]) + (
            f"; and {len(changes) - 8} more" if len(changes) > 8 else ""
        )
        raise ConfigChangedError(
            f"workdir {short_path(workdir)} holds a run with a different config ({shown}); only "
            f"{', '.join(sorted(set(ignore)))} may change on resume: rerun with the original "
            "values, use another --workdir, or pass --fresh to start over"
        )


def check_resume_data(saved: Mapping | None, current: Mapping, *, workdir: str) -> None:
    """Refuses to resume ``workdir`` on other data than its checkpoints were trained on.

    Args:
      saved: the data identity stored with the checkpoint (``{split: {"count", "sha256"}}``,
        :func:`guft_jax.data.data_identity`); ``None`` (an older checkpoint) is accepted.
      current: the identity of the data the resume would read.
      workdir: named in the message.

    Raises:
      DataChangedError: naming each split that changed, with its stored and new image count
        and content hash.

    >>> check_resume_data({"test": {"count": 3, "sha256": "ab"}},
    ...                   {"test": {"count": 3, "sha256": "ab"}}, workdir="W")
    """
    if not saved:
        return
    changed = []
    for split in sorted(set(saved) & set(current)):
        a, b = saved[split], current[split]
        if a == b:
            continue

        def show(d):
            digest = d.get("sha256")
            return f"{d.get('count')} images" + (f" (sha256 {digest[:12]})" if digest else "")

        changed.append(f"split {split}: {show(a)} -> {show(b)}")
    if changed:
        raise DataChangedError(
            f"workdir {short_path(workdir)} was trained on other data: the data changed "
            f"({'; '.join(changed)}); resume on the original data, use another --workdir, or "
            "pass --fresh to start over"
        )


# ----------------------------------------------------------------------------- metrics


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file; a torn (unparseable) line from a kill is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def append_jsonl(path: str, record: Mapping) -> None:
    """Appends one record as a line and fsyncs it (a kill leaves at most a torn last line)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk fails in write or flush, which name no file
        e.filename = e.filename or path
        raise


def truncate_metrics(path: str, step: int) -> tuple[list[dict], int]:
    """Keeps the records with ``step <= step`` (and no torn lines); rewrites atomically.

    Args:
      path: ``metrics.jsonl``.
      step: the restored optimizer step (0 when starting from scratch).

    Returns:
      ``(kept records, number of lines dropped)``.
    """
    if not os.path.exists(path):
        return [], 0
    with open(path) as f:
        text = f.read()
    lines = [s for s in text.splitlines() if s.strip()]
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    dropped = len(lines) - len(kept)
    if dropped or (text and not text.endswith("\n")):  # a whole last line without its newline
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept, dropped


def rewrite_tensorboard(tb_dir: str, records: Iterable[Mapping], *, skip=("epoch", "step")):
    """Deletes ``tb_dir`` and writes ``records`` (the kept metrics) into a new event file.

    Args:
      tb_dir: the TensorBoard folder.
      records: metrics records; numeric fields other than ``skip`` become scalars at ``step``.
      skip: fields not written as scalars.

    Returns:
      The open ``tensorboardX.SummaryWriter`` to continue logging with.
    """
    from tensorboardX import SummaryWriter

    shutil.rmtree(tb_dir, ignore_errors=True)
    writer = SummaryWriter(tb_dir)
    for r in records:
        write_scalars(writer, r, skip=skip)
    writer.flush()
    return writer


def write_scalars(writer, record: Mapping, *, skip=("epoch", "step")) -> None:
    """Writes a record's numeric fields (not ``skip``) as scalars at ``record["step"]``."""
    for k, v in record.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in skip:
            writer.add_scalar(k, v, int(record.get("step", 0)))


# ----------------------------------------------------------------------------- files


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk fails in write or flush, which name no file
        if e.filename is None or e.filename == tmp:
            e.filename = path
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` so that ``path`` is always either old or new, whole.

    >>> write_json_atomic("/tmp/results.json", {"accuracy": 0.9})  # doctest: +SKIP
    """
    _write_atomic(path, json.dumps(obj, indent=1, default=str))


def remove_stale_tmp(workdir: str) -> list[str]:
    """Deletes the temporary files a killed :func:`write_json_atomic` left in ``workdir``.

    Call it while holding the lock (no other process writes there). Returns the names removed.
    """
    removed = []
    if os.path.isdir(workdir):
        for name in os.listdir(workdir):
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(workdir, name))
                removed.append(name)
    return removed


def clear_run(workdir: str) -> list[str]:
    """Deletes a run's checkpoints, metrics, TensorBoard events and results (``--fresh``).

    The lock file and anything else in ``workdir`` stay. Returns the names removed.
    """
    removed = []
    if not os.path.isdir(workdir):
        return removed
    for name in (CHECKPOINTS_NAME, TB_NAME, METRICS_NAME, RESULTS_NAME):
        p = os.path.join(workdir, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
            removed.append(name)
        elif os.path.exists(p):
            os.remove(p)
            removed.append(name)
    return removed


__all__ = [
    "RESUMABLE_FIELDS",
    "WorkdirLock",
    "acquire_lock",
    "append_jsonl",
    "check_resume_config",
    "check_resume_data",
    "clear_run",
    "config_changes",
    "fingerprint",
    "locked",
    "read_jsonl",
    "release_lock",
    "remove_stale_tmp",
    "rewrite_tensorboard",
    "truncate_metrics",
    "write_json_atomic",
    "write_scalars",
]
