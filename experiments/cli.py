"""absl flag parsing for the experiment scripts that take an argument list (``main(argv)``).

``experiments.run`` defines its flags on absl's global ``FLAGS``; the benchmark and report scripts
define theirs on a :class:`absl.flags.FlagValues` of their own (built per call), so they can be
imported beside it (``--fresh`` exists in both) and called from tests with a list of arguments,
in the same ``--name=value`` / ``--name value`` / ``--[no]bool`` style.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags


def parse(
    define: Callable[[flags.FlagValues], None], argv: Sequence[str], *, prog: str, about: str
) -> tuple[flags.FlagValues, list[str]]:
    """``(flag values, positional arguments)`` of ``argv`` (without the program name).

    ``--help`` prints ``about`` and the flags' help and exits with code 0.

    Raises:
      ValueError: an unknown flag or a bad value, naming the flag.
    """
    fv = flags.FlagValues()
    define(fv)
    if "--help" in argv or "-h" in argv:
        print(f"{about}\n\nusage: python -m {prog} [flags]\n\n{fv.get_help()}")
        sys.exit(0)
    try:
        rest = fv([prog, *argv])
    except flags.Error as e:
        raise ValueError(f"{prog}: {e}") from None
    return fv, rest[1:]


def run_main(main: Callable[[list[str]], object]) -> None:
    """Calls ``main(sys.argv[1:])``; a bad flag or value (ValueError) prints one line
    ``error: <message>`` on stderr and exits with code 2, as ``experiments.run`` does."""
    try:
        main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
