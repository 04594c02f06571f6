"""LoSiA's adapter artifact (arXiv:2507.04487): per target kernel its retired blocks and current
block as ``losia/{kernel path}/rows``, ``cols`` and ``values`` arrays, and the strict reload.

``layout`` below is ``LosiaConfig.layout(params)`` of :mod:`guft_jax.methods.losia`: targets with
``key``, ``path``, ``dims = (in, out)`` and ``sub = (kr, kc)``; ``state`` a ``LosiaState``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths
from guft_jax.methods.base import ArtifactMismatchError
from guft_jax.methods.losia_ops import effective_matrix
from guft_jax.vit import kernel_as_matrix

PREFIX = "losia/"  # artifact array names: losia/{kernel path}/{rows,cols,values}
_NEED = {"rows", "cols", "values"}


def losia_payload(layout, trainable, state) -> dict[str, np.ndarray]:
    """``head/...`` and per target ``losia/{path}/rows (n, kr)``, ``cols (n, kc)``, ``values
    (n, kr, kc)``: the non-empty retired blocks in ring order, then the current block.

    Args:
      layout: the targets (module docstring).
      trainable: the trainable tree (``head`` and ``blocks``).
      state: the method state holding the indices and the ring of retired blocks.
    """
    out = {
        f"head/{paths.key_to_str(p)}": np.ascontiguousarray(np.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(trainable["head"])[0]
    }
    for t in layout:
        k = t.key
        rr, rc, rv = (
            np.asarray(a) for a in (state.res_rows[k], state.res_cols[k], state.res_vals[k])
        )
        used = [h for h in range(rr.shape[0]) if rr[h, 0] < t.dims[0]]
        rows = [rr[h] for h in used] + [np.asarray(state.rows[k])]
        cols = [rc[h] for h in used] + [np.asarray(state.cols[k])]
        vals = [rv[h] for h in used] + [np.asarray(trainable["blocks"][k])]
        out[f"{PREFIX}{t.path}/rows"] = np.stack(rows).astype(np.int32)
        out[f"{PREFIX}{t.path}/cols"] = np.stack(cols).astype(np.int32)
        out[f"{PREFIX}{t.path}/values"] = np.stack(vals).astype(np.float32)
    return out


def _problem(path: str, t, a: dict) -> str | None:
    """What is wrong with one target's arrays ``a`` (None: nothing)."""
    if set(a) != _NEED:
        return f"{path}: missing {sorted(_NEED - set(a))}, unexpected {sorted(set(a) - _NEED)}"
    n = a["rows"].shape[0] if a["rows"].ndim == 2 else -1
    want = {"rows": (n, t.sub[0]), "cols": (n, t.sub[1]), "values": (n, *t.sub)}
    bad = [f"{w} {a[w].shape} vs {s}" for w, s in want.items() if a[w].shape != s]
    if n < 1 or bad:
        return f"{path}: {bad or 'no blocks'}"
    if (
        (a["rows"] >= t.dims[0]).any()
        or (a["cols"] >= t.dims[1]).any()
        or ((a["rows"] < 0).any() or (a["cols"] < 0).any())
    ):
        return f"{path}: indices out of range {t.dims}"
    return None


def losia_load(name: str, layout, params, arrays: dict) -> dict:
    """Plain merged params from an :func:`losia_payload` payload (strict: every target present,
    nothing unexpected, consistent shapes, indices in range).

    Args:
      name: the method's name, for the error.
      layout: the targets (module docstring).
      params: the frozen base params.
      arrays: the payload.

    Raises:
      ArtifactMismatchError: the payload does not match ``layout`` (up to ten problems listed).
    """
    lay = {t.path: t for t in layout}
    tensors: dict = {}
    problems = []
    for key, v in arrays.items():
        if key.startswith(PREFIX):
            path, what = key[len(PREFIX) :].rsplit("/", 1)
            tensors.setdefault(path, {})[what] = np.asarray(v)
        elif not key.startswith("head/"):
            problems.append(f"unexpected {key}")
    problems += [f"missing {PREFIX}{p}" for p in sorted(set(lay) - set(tensors))]
    problems += [f"unexpected {PREFIX}{p}" for p in sorted(set(tensors) - set(lay))]
    upd = {}
    for path, a in tensors.items():
        if path not in lay:
            continue
        problem = _problem(path, lay[path], a)
        if problem is not None:
            problems.append(problem)
            continue
        w0 = paths.get(params, path)
        r, c, v = (jnp.asarray(a[w]) for w in ("rows", "cols", "values"))
        w = effective_matrix(
            kernel_as_matrix(w0, path), r[-1], c[-1], v[-1], r[:-1], c[:-1], v[:-1]
        )
        upd[path] = w.reshape(w0.shape)
    head = {k[len("head/") :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("head/")}
    want_head = set(paths.leaf_paths(params["head"]))
    if set(head) != want_head:
        problems.append(f"head arrays {sorted(head)} vs {sorted(want_head)}")
    if problems:
        raise ArtifactMismatchError(f"{name} artifact does not match: {problems[:10]}")
    out = paths.replaced(params, upd)
    out["head"] = paths.unflatten(head, params["head"])
    return out
