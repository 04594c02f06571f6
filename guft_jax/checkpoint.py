"""Train-state checkpoints with orbax: atomic saves every epoch, strict restores.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. Next to the arrays we store the tree's
``/``-joined paths, shapes and dtypes; :func:`restore` compares them with the target state and
raises one error listing every difference instead of restoring part of a state.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from guft_jax.paths import key_to_str


class CheckpointStructureError(ValueError):
    """The checkpoint's tree differs from the state it is restored into."""


def describe(tree: Any) -> dict[str, list]:
    """``{path: [shape, dtype]}`` of every leaf (the structure stored with a checkpoint)."""
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(x) if not hasattr(x, "shape") else x
        out[key_to_str(p)] = [list(x.shape), str(np.dtype(x.dtype))]
    return out


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` keeping the last ``max_to_keep`` steps."""
    directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        directory, options=options, item_names=("state", "meta", "structure")
    )


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (any pytree of arrays) and a JSON ``meta`` at ``step``; waits until done."""
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            structure=ocp.args.JsonSave(describe(state)),
        ),
    )
    mgr.wait_until_finished()


def saved_structure(mgr: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The ``{path: [shape, dtype]}`` stored with a checkpoint (latest by default)."""
    step = mgr.latest_step() if step is None else step
    out = mgr.restore(step, args=ocp.args.Composite(structure=ocp.args.JsonRestore()))
    return out["structure"]


def restore(mgr: ocp.CheckpointManager, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores the latest (or ``step``) checkpoint into the structure of ``target``.

    Raises:
      CheckpointStructureError: listing missing, unexpected and mismatched leaves.
      FileNotFoundError: no checkpoint in the directory.
    """
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    saved = mgr.restore(
        step,
        args=ocp.args.Composite(structure=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()),
    )
    want, have = describe(target), saved["structure"]
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = sorted(
        f"{k}: checkpoint {have[k]} vs state {want[k]}"
        for k in set(want) & set(have)
        if have[k] != want[k]
    )
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {mgr.directory}/{step} does not match the train state:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mismatched", mismatched),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]))
        raise CheckpointStructureError("\n".join(lines))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return out["state"], saved["meta"]


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
