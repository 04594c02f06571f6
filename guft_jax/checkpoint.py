"""Train-state checkpoints with orbax: atomic saves every epoch, strict and verified restores.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact (leftover temporary directories are removed when
the next manager opens the directory). Next to the arrays we store the tree's ``/``-joined paths,
shapes and dtypes and a SHA-256 of every leaf's bytes, and after the commit a manifest of every
file's size and SHA-256 (``files.sha256.json``, checked before tensorstore reads a file):

- :func:`restore` compares the structure with the target state and raises one
  :class:`CheckpointStructureError` (one line) instead of restoring part of a state, and checks
  every restored leaf against its checksum (tensorstore checks its own index nodes with CRC-32C
  but not the compressed array chunks: bytes flipped in a chunk otherwise restore silently).
- Across topologies: orbax writes each process's shards; :func:`restore` reads into the
  target's shardings (any mesh shape, any process count): resharding happens on restore.
- :func:`restore_intact` restores the newest *intact* step: a step that fails to read or
  verify is named in one line with the check that failed, moved aside to ``<step>.damaged``,
  and the previous step is tried (said in the log); if none is intact,
  :class:`~guft_jax.errors.CheckpointDamagedError`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from guft_jax.errors import CheckpointDamagedError, one_line, short_path
from guft_jax.paths import key_to_str
from guft_jax.rundir import write_json_atomic  # noqa: F401  (kept importable from here)

MANIFEST = "files.sha256.json"  # written into each step directory after orbax commits it


class CheckpointStructureError(ValueError):
    """The checkpoint's tree differs from the state it is restored into (one-line message).

    Attributes:
      missing, unexpected, mismatched: the full lists of differing leaves.
    """

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(one_line(message, limit=600))
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


class _Damaged(Exception):
    """Internal: a step could not be read or verified; ``str`` is the failed check."""


def describe(tree: Any) -> dict[str, list]:
    """``{path: [shape, dtype]}`` of every leaf (the structure stored with a checkpoint)."""
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(x) if not hasattr(x, "shape") else x
        out[key_to_str(p)] = [list(x.shape), str(np.dtype(x.dtype))]
    return out


def checksums(tree: Any) -> dict[str, str | None]:
    """``{path: sha256 hex}`` of every leaf's bytes (``None`` for an array sharded over several
    processes: no process holds all of it; a replicated one is hashed from the local copy)."""
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                out[key_to_str(p)] = None
                continue
            x = x.addressable_data(0)
        a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
        out[key_to_str(p)] = hashlib.sha256(a.tobytes()).hexdigest()
    return out


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` keeping the last ``max_to_keep`` steps."""
    directory = os.path.abspath(directory)
    # Unfinished saves (a kill mid-write) leave orbax temporary folders: removed here with plain
    # os calls. Orbax's own asynchronous cleanup goes through epath, which tfds' mock file
    # system (tests on mock VTAB data) redirects into its fake root.
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=False
    )
    return ocp.CheckpointManager(
        directory, options=options, item_names=("state", "meta", "structure", "checksums")
    )


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (any pytree of arrays) and a JSON ``meta`` at ``step``; waits until done.

    ``meta`` may carry anything JSON-serialisable; the engine stores the epoch, the data
    position, the method name and the config fingerprint (:func:`guft_jax.rundir.fingerprint`).
    """
    try:
        mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                structure=ocp.args.JsonSave(describe(state)),
                checksums=ocp.args.JsonSave(checksums(state)),
            ),
        )
        mgr.wait_until_finished()
    except Exception as e:  # orbax / tensorstore report a full disk as several error types
        err = os_error_of(e)
        if err is None:
            raise
        err.filename = err.filename or _step_dir(mgr, step)
        raise err from e
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(_step_dir(mgr, step), MANIFEST), _file_sums(mgr, step))


_OS_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_of(error: BaseException) -> OSError | None:
    """The operating-system error behind an orbax / tensorstore failure, if there is one.

    Orbax raises a file system's refusal (no space, read-only, no permission) from its writer
    threads as a ``ValueError`` that quotes tensorstore's status and ``os_error_code``; this
    finds the ``OSError`` in the chain or rebuilds one from that code.

    Returns:
      An ``OSError`` (errno and reason set, ``filename`` empty), or ``None``.
    """
    x, seen = error, 0
    while x is not None and seen < 8:
        if isinstance(x, OSError) and x.errno:
            return OSError(x.errno, x.strerror or os.strerror(x.errno), x.filename)
        m = _OS_CODE.search(str(x))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        x, seen = x.__cause__ or x.__context__, seen + 1
    return None


def _step_dir(mgr, step) -> str:
    return os.path.join(str(mgr.directory), str(step))


def _file_sums(mgr, step) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file of a finished step (but the manifest)."""
    root = _step_dir(mgr, step)
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if rel == MANIFEST:
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = [os.path.getsize(path), h.hexdigest()]
    return out


def _verify_files(mgr, step) -> None:
    """Checks a step's files against its manifest before tensorstore reads them (a damaged
    file found by tensorstore itself also makes its background threads print tracebacks)."""
    path = os.path.join(_step_dir(mgr, step), MANIFEST)
    if not os.path.exists(path):
        return  # killed between orbax's commit and the manifest, or an older checkpoint
    try:
        with open(path) as f:
            want = json.load(f)
    except (OSError, ValueError) as e:
        raise _Damaged(f"its {MANIFEST} cannot be read ({e})") from e
    have = _file_sums(mgr, step)
    for rel, (size, digest) in sorted(want.items()):
        if rel not in have:
            raise _Damaged(f"file {rel} is missing")
        if have[rel][0] != size:
            raise _Damaged(f"file {rel} has {have[rel][0]} bytes, {size} were written")
        if have[rel][1] != digest:
            raise _Damaged(f"file {rel} fails its SHA-256 check")


def _read_json_items(mgr, step, names) -> dict:
    """Reads JSON items of a step; a missing or unreadable item is damage."""
    out = {}
    for name in names:
        if not os.path.isdir(os.path.join(_step_dir(mgr, step), name)):
            if name == "checksums":  # checkpoints written before checksums existed
                out[name] = None
                continue
            raise _Damaged(f"its {name!r} item is missing")
        try:
            got = mgr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
        except Exception as e:  # orbax wraps JSON and file errors in several types
            raise _Damaged(f"its {name!r} item cannot be read ({_reason(e)})") from e
        out[name] = got[name]
    return out


def _check_method(meta: dict, method: str | None, where: str) -> None:
    saved_method = meta.get("method")
    if method is not None and saved_method is not None and saved_method != method:
        raise CheckpointStructureError(
            f"{where} holds a {saved_method} run, not {method}; use another workdir or start "
            "over (--fresh)"
        )


def _compare(have: dict, want: dict, where: str) -> None:
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = sorted(
        f"{k} (checkpoint {have[k]} vs state {want[k]})"
        for k in set(want) & set(have)
        if have[k] != want[k]
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{len(keys)} {title} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
            for title, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mismatched", mismatched),
            )
            if keys
        ]
        raise CheckpointStructureError(
            f"{where} does not match the train state: {'; '.join(parts)}",
            missing,
            unexpected,
            mismatched,
        )


_NOISE = re.compile(
    r'Error (opening "[^"]*" driver|reading "[^"]*" in OCDBT|reading Byte range|'
    r"decoding local file|reading local file)"
)


def _reason(e: BaseException) -> str:
    """The failed check of a tensorstore / orbax read error, in one short phrase."""
    chain, x = [], e
    while x is not None and len(chain) < 6:
        chain.append(x)
        x = x.__cause__ or x.__context__
    texts = [re.sub(r"\s*\[tensorstore_spec.*", "", str(c), flags=re.S) for c in chain]
    status = [t for t in texts if re.match(r"[A-Z_]{4,}: ", t)]
    segments = (status[-1] if status else texts[0]).split(": ")
    code = segments.pop(0) if re.fullmatch(r"[A-Z_]{4,}", segments[0]) else None
    body = ": ".join(s for s in segments if not _NOISE.match(s)) or ": ".join(segments)
    return one_line(f"{code}: {body}" if code else body, limit=200)


def restore(
    mgr: ocp.CheckpointManager,
    target: Any,
    step: int | None = None,
    *,
    method: str | None = None,
) -> tuple[Any, dict]:
    """Restores the latest (or ``step``) checkpoint into the structure of ``target``.

    Args:
      mgr: from :func:`manager`.
      target: a pytree of arrays shaped like the saved state.
      step: the step to restore (default: the latest).
      method: the method name the caller trains; a checkpoint whose meta names another method
        is refused in one line ("holds a guft run, not lora").

    Returns:
      ``(state, meta)``.

    Raises:
      CheckpointStructureError: another method, or missing / unexpected / mismatched leaves
        (one line; the full lists are attributes).
      CheckpointDamagedError: the step cannot be read or fails its checksums (one line naming
        the step directory and the failed check).
      FileNotFoundError: no checkpoint in the directory.
    """
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    try:
        return _restore_step(mgr, target, step, method)
    except _Damaged as e:
        raise CheckpointDamagedError(f"checkpoint {_step_dir(mgr, step)} is damaged: {e}") from e


def _restore_step(mgr, target, step, method, check_meta=None):
    where = f"checkpoint {_step_dir(mgr, step)}"
    _verify_files(mgr, step)
    items = _read_json_items(mgr, step, ["meta", "structure", "checksums"])
    _check_method(items["meta"], method, where)
    if check_meta is not None:
        check_meta(items["meta"])
    if callable(target):
        target = target(items["structure"])
    _compare(items["structure"], describe(target), where)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    try:
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # tensorstore / orbax raise several types for unreadable data
        raise _Damaged(_reason(e)) from e
    state = out["state"]
    saved_sums = items["checksums"]
    if saved_sums:
        got = checksums(state)
        bad = sorted(k for k, v in saved_sums.items() if v is not None and got.get(k) != v)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise _Damaged(f"array {bad[0]} fails its SHA-256 checksum{more}")
    return state, items["meta"]


def _collect_quietly() -> None:
    # A failed tensorstore read leaves un-awaited coroutines in the dropped exception's frames;
    # collect them now so Python's "never awaited" warnings do not reach the user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gc.collect()


def quarantine(mgr: ocp.CheckpointManager, step: int) -> str:
    """Moves a damaged step aside to ``<step>.damaged[.n]`` (kept for inspection); the path."""
    src = _step_dir(mgr, step)
    dst, n = f"{src}.damaged", 1
    while os.path.exists(dst):
        dst, n = f"{src}.damaged.{n}", n + 1
    os.replace(src, dst)
    mgr.reload()
    return dst


def quarantined(mgr: ocp.CheckpointManager) -> list[str]:
    """The names of the damaged steps moved aside in ``mgr``'s directory (``3.damaged``...).

    They are the run directory's memory of a refusal: while they are there and no intact step
    is, :func:`restore_intact` refuses again (``--fresh`` deletes them with the checkpoints).
    """
    d = str(mgr.directory)
    if not os.path.isdir(d):
        return []
    names = [n for n in os.listdir(d) if re.fullmatch(r"\d+\.damaged(\.\d+)?", n)]
    return sorted(names, key=lambda n: [int(p) for p in n.replace("damaged", "0").split(".")])


def restore_intact(
    mgr: ocp.CheckpointManager,
    target: Any | Callable[[dict], Any],
    *,
    method: str | None = None,
    check_meta: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, dict, int] | None:
    """Restores the newest intact checkpoint, moving damaged newer ones aside.

    Args:
      mgr: from :func:`manager`.
      target: the state to restore into, or a function ``structure -> state`` (for methods
        whose trainable shapes are read from the checkpoint's stored structure).
      method: see :func:`restore`.
      check_meta: called with each step's meta (after the method check, before its arrays are
        read); raise from it to refuse the resume (e.g.
        :func:`guft_jax.rundir.check_resume_config`).
      log: receives one line per damaged step and one for the fallback.

    Returns:
      ``(state, meta, step)``, or ``None`` when the directory holds no checkpoint (and no
      damaged step moved aside earlier).

    Raises:
      CheckpointStructureError: as :func:`restore` (not damage: nothing is moved).
      CheckpointDamagedError: every step is damaged; one line naming the directory and each
        step's failed check. Raised again on every later call while only damaged steps
        (:func:`quarantined`) are left.
    """
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        damaged = quarantined(mgr)
        if damaged:
            raise CheckpointDamagedError(
                f"no intact checkpoint in {short_path(mgr.directory)}: every step was found "
                f"damaged earlier and moved aside ({', '.join(damaged)}); rerun with --fresh to "
                "start over"
            )
        return None
    failures = []
    for i, step in enumerate(steps):
        try:
            state, meta = _restore_step(mgr, target, step, method, check_meta)
        except _Damaged as e:
            failures.append(f"step {step}: {e}")
            moved = quarantine(mgr, step)
            nxt = f"; trying step {steps[i + 1]}" if i + 1 < len(steps) else ""
            log(f"checkpoint {_step_dir(mgr, step)} is damaged ({e}); moved to {moved}{nxt}")
            _collect_quietly()
            continue
        if failures:
            log(f"resuming from the intact checkpoint {_step_dir(mgr, step)} (step {step})")
        return state, meta, step
    raise CheckpointDamagedError(
        f"no intact checkpoint in {mgr.directory}: {'; '.join(failures)}; the damaged steps were "
        "moved to <step>.damaged; rerun with --fresh to start over"
    )
