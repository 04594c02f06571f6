"""Errors about what a user handed us: a data file, a folder, a run directory, a checkpoint.

Each carries a one-line message that names the path (or config field) and the problem, so a
command-line tool can print ``error: <message>`` and exit without a traceback. They subclass
``ValueError`` (a bad input is a bad value), so callers that already catch ``ValueError`` keep
working.

>>> try:
...     raise InputError("/data/cats.npz: not an .npz archive (it is a text file)")
... except ValueError as e:
...     print(f"error: {e}")
error: /data/cats.npz: not an .npz archive (it is a text file)
"""

from __future__ import annotations


def one_line(message: str, limit: int = 400) -> str:
    """Collapses whitespace (newlines included) and caps the length at ``limit`` characters.

    >>> one_line("a\\n  b")
    'a b'
    """
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_path(path, limit: int = 160) -> str:
    """A path cut in the middle to at most ``limit`` characters (so a message keeps its reason).

    >>> short_path("/a" * 100, limit=20)
    '/a/a/a/a/…/a/a/a/a/a'
    """
    text = str(path)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def os_error_line(error: OSError) -> str:
    """One line for an operating-system error: the path it names, the problem, what to do.

    >>> import errno
    >>> os_error_line(OSError(errno.ENOSPC, "No space left on device", "/runs/a/results.json"))
    '/runs/a/results.json: no space left on device (ENOSPC); free space or use another --workdir'
    """
    import errno as errno_lib

    code = errno_lib.errorcode.get(error.errno or 0, "")
    hints = {
        "ENOSPC": "free space or use another --workdir",
        "EDQUOT": "free space or use another --workdir",
        "EROFS": "use another --workdir",
        "EACCES": "check the permissions or use another --workdir",
        "EPERM": "check the permissions or use another --workdir",
        "ENAMETOOLONG": "use a shorter path",
        "EISDIR": "a folder stands where a file is expected; remove or rename it",
        "ENOTDIR": "a file stands where a folder is expected; remove or rename it",
    }
    problem = (error.strerror or str(error) or type(error).__name__).strip()
    problem = problem[:1].lower() + problem[1:]
    where = error.filename if error.filename is not None else None
    text = f"{short_path(where)}: {problem}" if where is not None else problem
    if code:
        text += f" ({code})"
    if code in hints:
        text += f"; {hints[code]}"
    return one_line(text)


class InputError(ValueError):
    """A bad user input; ``str(error)`` is one line naming the path or field and the problem."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class MissingInputError(InputError, FileNotFoundError):
    """A named file or folder does not exist (also a ``FileNotFoundError``)."""


class WorkdirLockedError(InputError):
    """Another process holds the run directory's lock."""


class ConfigChangedError(InputError):
    """A resume would continue a run directory with a different config."""


class CheckpointDamagedError(InputError):
    """No intact checkpoint is left in a checkpoint directory that has some."""


class DataChangedError(InputError):
    """A resume would continue a run on other data than it was trained on."""


class EpochsLoweredError(InputError):
    """A rerun asks for fewer epochs than the run directory's model has been trained."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training after a step; nothing half-written was saved.

    Attributes:
      epoch: the epoch that was running (1-indexed).
      step: the steps of that epoch that had run (its partial work is not kept).
    """

    def __init__(self, epoch: int, step: int):
        super().__init__(
            f"interrupted at epoch {epoch} step {step}; rerun the same command to resume"
        )
        self.epoch, self.step = epoch, step


__all__ = [
    "CheckpointDamagedError",
    "ConfigChangedError",
    "DataChangedError",
    "EpochsLoweredError",
    "InputError",
    "Interrupted",
    "MissingInputError",
    "WorkdirLockedError",
    "one_line",
    "os_error_line",
    "short_path",
]
