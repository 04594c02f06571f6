"""Adapter artifacts: only what a method trains, plus the head and JSON metadata.

An artifact is a directory with ``adapter.safetensors`` (the arrays) and ``adapter.json``
(method name, hyperparameters, seeds, base checkpoint id, guft_jax version, array count), both
written atomically. Loading rebuilds the method from the metadata, checks the arrays strictly
against the method's own trainable template (one error listing missing, unexpected and
mis-shaped keys), and ``merge`` gives plain ViT params.

What is stored: the trainable tree (LoRA ``L·r·(d_in + d_out)`` numbers; FourierFT the ``L·n``
coefficients plus its ``2·n`` spectral entries once per weight shape, ``n·(2 + L)`` in all for
one shape); GUFT (both paths) per-tensor flat ``indices`` + ``values`` of the selected entries.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from safetensors.numpy import load_file, save_file

import guft_jax
from guft_jax.checkpoint_import import CheckpointMismatchError
from guft_jax.methods import get_method, spec
from guft_jax.methods.base import Method, export_arrays, load_arrays

WEIGHTS, META = "adapter.safetensors", "adapter.json"


def _atomic(path: str, write) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def arrays_of(method: Method, params: Any, trainable: Any, state: Any = None) -> dict:
    """The ``{name: array}`` an artifact stores for ``method`` (its ``export`` hook)."""
    return export_arrays(method, params, trainable, state)


def save_artifact(
    directory: str,
    *,
    method: Method,
    params: Any,
    trainable: Any,
    state: Any = None,
    base_id: str = "",
    extra: dict | None = None,
) -> dict:
    """Writes the artifact; returns its metadata (with ``numbers``: stored array entries)."""
    os.makedirs(directory, exist_ok=True)
    arrays = arrays_of(method, params, trainable, state)
    head = sum(v.size for k, v in arrays.items() if k.startswith("head/"))
    meta = {
        "method": method.name,
        "hparams": method.hparams or {},
        "base_id": base_id,
        "guft_jax_version": guft_jax.__version__,
        "numbers": int(sum(v.size for v in arrays.values()) - head),
        "head_numbers": int(head),
        **(extra or {}),
    }
    _atomic(os.path.join(directory, WEIGHTS), lambda p: save_file(arrays, p))
    _atomic(
        os.path.join(directory, META),
        lambda p: open(p, "w").write(json.dumps(meta, indent=1, default=str)),
    )
    return meta


def load_artifact(directory: str, params: Any) -> tuple[Any, dict]:
    """Loads an artifact onto base ``params``; returns ``(plain merged params, metadata)``.

    The method is rebuilt from the metadata through the registry (``get_method(name,
    **hparams)``), and its ``load`` hook checks the arrays strictly.

    Raises:
      CheckpointMismatchError: the arrays do not match the method's trainable template.
    """
    with open(os.path.join(directory, META)) as f:
        meta = json.load(f)
    arrays = load_file(os.path.join(directory, WEIGHTS))
    method = get_method(meta["method"], **_hparams_for(meta["method"], meta["hparams"]))
    try:
        return load_arrays(method, params, arrays), meta
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{directory}: {e} (method {meta['method']})") from None


def _hparams_for(name: str, hp: dict) -> dict:
    """JSON round-trips tuples as lists; factories that take tuples get them back."""
    import inspect

    factory = spec(name).factory
    out = {}
    for k, v in hp.items():
        p = inspect.signature(factory).parameters.get(k)
        if isinstance(v, list) and p is not None and "tuple" in str(p.annotation):
            v = tuple(v)
        out[k] = v
    return out
