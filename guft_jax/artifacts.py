"""Adapter artifacts: only what a method trains, plus the head and JSON metadata.

An artifact is a directory with ``adapter.safetensors`` (the arrays) and ``adapter.json``
(method name, hyperparameters, seeds, base checkpoint id, the backbone's identity, guft_jax
version, array count), both written atomically. The backbone's identity is its name
(``base_id``) and a SHA-256 of its frozen weights (every leaf but the head, by path):
loading onto other weights, even of the same shapes, is refused unless ``check_base=False``.
Loading rebuilds the method from the metadata, checks the arrays strictly against the method's
own trainable template (one error naming the file and counting the missing, unexpected and
mis-shaped keys), and ``merge`` gives plain ViT params. Every load error is an
:class:`ArtifactError` (a ``ValueError``) whose one line names the file.

What is stored: the trainable tree (LoRA ``L·r·(d_in + d_out)`` numbers; FourierFT the ``L·n``
coefficients plus its ``2·n`` spectral entries once per weight shape, ``n·(2 + L)`` in all for
one shape); GUFT (both paths) per-tensor flat ``indices`` + ``values`` of the selected entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from guft_jax import paths
from guft_jax.checkpoint_import import CheckpointMismatchError
from guft_jax.errors import InputError, one_line
from guft_jax.methods import base as mbase
from guft_jax.methods import get_method, spec
from guft_jax.methods.base import Method, export_arrays, load_arrays
from guft_jax.version import __version__

WEIGHTS, META = "adapter.safetensors", "adapter.json"


class ArtifactError(InputError, CheckpointMismatchError):
    """An artifact cannot be loaded: unreadable file, other backbone, or arrays that do not match
    the method (``missing`` / ``unexpected`` / ``misshaped`` hold the full lists)."""

    def __init__(self, message: str, missing=(), unexpected=(), misshaped=()):
        ValueError.__init__(self, one_line(message, limit=800))  # long key paths: room for three
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), misshaped


def backbone_hash(params: Any) -> str:
    """SHA-256 over the frozen weights: every leaf but the head's, each as path, dtype, shape
    and bytes, in path order (the same weights give the same hash on any machine).

    >>> a = {"a": np.zeros(2, np.float32), "head": {"w": np.ones(1)}}
    >>> backbone_hash(a) == backbone_hash({**a, "head": {"w": np.zeros(1)}})  # head not counted
    True
    """
    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for key, leaf in sorted((paths.key_to_str(p), x) for p, x in flat):
        if key == mbase.HEAD or key.startswith(mbase.HEAD + "/"):
            continue
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


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
        "base_sha256": backbone_hash(params),
        "guft_jax_version": __version__,
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


def load_artifact(
    directory: str, params: Any, *, base_id: str | None = None, check_base: bool = True
) -> tuple[Any, dict]:
    """Loads an artifact onto base ``params``; returns ``(plain merged params, metadata)``.

    The method is rebuilt from the metadata through the registry (``get_method(name,
    **hparams)``), and its ``load`` hook checks the arrays strictly.

    Args:
      directory: the artifact's folder.
      params: the base weights to load onto.
      base_id: the backbone's name, checked against the stored ``base_id`` when both are set.
      check_base: refuse ``params`` whose frozen weights differ from the ones the artifact
        was trained on (:func:`backbone_hash`; the weights after the method's own base
        preparation, e.g. QLoRA's quantisation, are accepted too).

    Raises:
      ArtifactError: a missing, truncated or garbled file, another backbone, or arrays that do
        not match the method's trainable template (the counts of missing, unexpected and
        mis-shaped keys and the first of each); one line naming the file.
    """
    meta_path, weights_path = os.path.join(directory, META), os.path.join(directory, WEIGHTS)
    meta = _read_meta(meta_path)
    try:
        arrays = load_file(weights_path)
    except FileNotFoundError:
        raise ArtifactError(f"{weights_path}: file not found") from None
    except Exception as e:  # safetensors raises its own error type for a truncated file
        raise ArtifactError(
            f"{weights_path}: unreadable safetensors file, truncated or corrupt "
            f"({type(e).__name__}: {one_line(str(e), 160)})"
        ) from e
    method = get_method(meta["method"], **_hparams_for(meta["method"], meta.get("hparams", {})))
    if base_id is not None and meta.get("base_id") and meta["base_id"] != base_id:
        raise ArtifactError(
            f"{meta_path}: trained on backbone {meta['base_id']!r}, not {base_id!r}; load it onto "
            "the backbone it was trained on"
        )
    if check_base and meta.get("base_sha256"):
        _check_base(meta, params, method, meta_path)
    try:
        return load_arrays(method, params, arrays), meta
    except CheckpointMismatchError as e:
        raise _mismatch(method, params, arrays, weights_path, meta["method"], e) from None


def _read_meta(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found (not an artifact folder?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable artifact metadata ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
        raise ArtifactError(f"{path}: artifact metadata without a method name")
    return meta


def _check_base(meta: dict, params: Any, method: Method, where: str) -> None:
    want = meta["base_sha256"]
    if backbone_hash(params) == want:
        return
    if backbone_hash(mbase.prepare_base(method, params)) == want:
        return
    name = f" {meta['base_id']!r}" if meta.get("base_id") else ""
    raise ArtifactError(
        f"{where}: trained on backbone{name} with weights sha256 {want[:12]}, but the given "
        f"weights hash to {backbone_hash(params)[:12]}; load it onto the weights it was trained "
        "on (or pass check_base=False to transfer it on purpose)"
    )


def _mismatch(method: Method, params, arrays: dict, where: str, name: str, error) -> ArtifactError:
    """The load error with counts, when the method's template is the default one."""
    if method.hooks.load is not None:
        return ArtifactError(f"{where}: {error} (method {name})")
    template = jax.eval_shape(lambda p: method.init(jax.random.PRNGKey(0), p), params)
    want = {
        paths.key_to_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(template)[0]
    }
    have = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    misshaped = sorted(
        f"{k} {have[k]} vs {want[k]}" for k in set(want) & set(have) if have[k] != want[k]
    )
    groups = [
        (title, keys)
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped (stored vs expected)", misshaped),
        )
        if keys
    ]
    counts = ", ".join(f"{len(keys)} {title}" for title, keys in groups)
    first = "; ".join(
        f"{title.split()[0]}: {keys[0]}{f' (+{len(keys) - 1})' if len(keys) > 1 else ''}"
        for title, keys in groups
    )
    return ArtifactError(
        f"{where}: does not match method {name} on these params: {counts} keys ({first})",
        missing,
        unexpected,
        misshaped,
    )


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
