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


__all__ = [
    "CheckpointDamagedError",
    "ConfigChangedError",
    "InputError",
    "MissingInputError",
    "WorkdirLockedError",
    "one_line",
]
