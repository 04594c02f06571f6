"""Rows of the bad-input and fault table (``docs/generated/faults.md``), recorded by the tests
that try each one: ``experiments/fault_table.py`` runs them with ``GUFT_FAULT_TABLE`` set to a
file and writes the table from what they recorded, so no row is typed by hand."""

import json
import os
import re

ENV = "GUFT_FAULT_TABLE"
# pytest's temporary folders, shortened in the table
_TMP = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s:]+")


def record(group: str, case: str, line: str, exit_code: int | None = 2) -> None:
    """Appends ``{group, case, exit, line}`` to ``$GUFT_FAULT_TABLE`` (nothing when unset).

    ``line`` is what the user sees: the CLI's one stderr line, the notice of a run that goes
    on, or a library error's message (``exit_code=None``); temporary paths become ``<tmp>``.
    """
    path = os.environ.get(ENV)
    if not path:
        return
    shown = _TMP.sub("<tmp>", line)
    shown = re.sub(r"x{60,}(…x*)?", "xxx…xxx", shown)  # the 4,000-character test path
    row = {"group": group, "case": case, "exit": exit_code, "line": shown}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
