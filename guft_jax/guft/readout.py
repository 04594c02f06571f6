"""What a GUFT run selected, read out of its state, and its artifact format: ``guft/{param
path}/indices`` and ``/values`` per tensor, and ``head/...``."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths
from guft_jax.guft.state import GuftState


def selected_counts(state: GuftState) -> dict[str, int]:
    """Per-tensor selected counts, keyed by ``/``-joined param path."""
    return {paths.path_of(k): int(v) for k, v in state.count.items()}


def selected_indices(state: GuftState) -> dict[str, np.ndarray]:
    """``{param path: sorted flat indices}`` of the selected entries (either path)."""
    out = {}
    for k, sel in state.selected.items():
        sel = np.asarray(sel)
        if sel.dtype == bool:
            idx = np.flatnonzero(sel.reshape(-1))
        else:
            idx = np.sort(sel[: int(state.count[k])])
        out[paths.path_of(k)] = idx.astype(np.int32)
    return out


def selection(state: GuftState, params: Any) -> dict:
    """The selected entries as a nested boolean pytree over the eligible leaves (True = trained),
    shaped like those leaves of ``params``."""
    out: dict = {}
    for path, idx in selected_indices(state).items():
        shape = paths.get(params, path).shape
        m = np.zeros(math.prod(shape), bool)
        m[idx] = True
        paths.set(out, path, m.reshape(shape))
    return out


def store_payload(store, params, trainable, state) -> dict[str, np.ndarray]:
    """The artifact payload: ``guft/{param path}/indices`` and ``/values`` per tensor with
    selected entries, and ``head/...``."""
    out = {
        f"head/{paths.key_to_str(p)}": np.ascontiguousarray(np.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(trainable["head"])[0]
    }
    for k, (idx, vals) in store.indices(state, trainable["delta"]).items():
        if len(idx):
            out[f"guft/{paths.path_of(k)}/indices"] = idx.astype(np.int32)
            out[f"guft/{paths.path_of(k)}/values"] = vals.astype(np.float32)
    return out


def apply_arrays(params: Any, arrays: dict) -> Any:
    """Plain ViT params: ``W0.ravel().at[indices].add(values)`` per tensor, and the head.

    Raises:
      ValueError: a tensor path that ``params`` lacks, or indices without values.
    """
    tensors: dict = {}
    for name, v in arrays.items():
        if name.startswith("guft/"):
            path, what = name[len("guft/") :].rsplit("/", 1)
            tensors.setdefault(path, {})[what] = v
    upd = {}
    for path, t in tensors.items():
        if set(t) != {"indices", "values"}:
            raise ValueError(f"guft artifact: {path} needs indices and values, has {sorted(t)}")
        try:
            w0 = paths.get(params, path)
        except KeyError:
            raise ValueError(f"guft artifact: {path} is not a parameter of the base") from None
        new = w0.reshape(-1).at[jnp.asarray(t["indices"])].add(jnp.asarray(t["values"]))
        upd[path] = new.reshape(w0.shape)
    head = {k[len("head/") :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("head/")}
    out = paths.replaced(params, upd)
    out["head"] = paths.unflatten(head, params["head"])
    return out
