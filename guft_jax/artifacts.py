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

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

import guft_jax
from guft_jax import paths
from guft_jax.checkpoint_import import CheckpointMismatchError
from guft_jax.methods import get_method
from guft_jax.methods.base import Method

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


def _flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        prefix + paths.key_to_str(p): np.ascontiguousarray(np.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _is_guft(method: Method) -> bool:
    return method.hooks is not None and "recompute_epochs" in method.hparams


def arrays_of(method: Method, params: Any, trainable: Any, state: Any = None) -> dict:
    """The ``{name: array}`` an artifact stores for ``method``."""
    if _is_guft(method):
        from guft_jax.guft import export_artifact

        art = export_artifact(method, params, trainable, state)
        out = _flat(art["head"], "head/")
        for key, t in art["tensors"].items():
            out[f"guft/{key}/indices"] = t["indices"]
            out[f"guft/{key}/values"] = t["values"]
        return out
    out = _flat(trainable)
    if method.name == "fourierft":
        from guft_jax.methods import fourierft as ff
        from guft_jax.methods import weight_space as ws

        hp = method.hparams
        for k in trainable["fourierft"]:
            d_in, d_out = ws.matrix(params, ws.path_of(k)).shape
            out[f"fourierft_entries/{d_out}x{d_in}"] = ff.spectral_entries(
                (d_out, d_in),
                hp["n"],
                seed=hp["seed"],
                frequency_bias=hp["frequency_bias"],
                fc=hp["fc"],
                bandwidth=hp["bandwidth"],
            )
    return out


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
        "hparams": method.hparams,
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


def _rebuild(meta: dict) -> Method:
    hp = dict(meta["hparams"])
    name = meta["method"]
    if name in ("magnitude", "snip", "salun", "fisher"):
        return get_method(
            name,
            ratio=hp["ratios"][0],
            mode=hp["mode"],
            include=hp["include"],
            exclude=hp["exclude"],
            sparse=hp["sparse"],
        )
    if name == "vera" or name in ("lora", "dora", "fourierft"):
        hp["targets"] = tuple(hp["targets"])
    return get_method(name, **hp)


def load_artifact(directory: str, params: Any) -> tuple[Any, dict]:
    """Loads an artifact onto base ``params``; returns ``(plain merged params, metadata)``.

    Raises:
      CheckpointMismatchError: the arrays do not match the method's trainable template.
    """
    with open(os.path.join(directory, META)) as f:
        meta = json.load(f)
    arrays = load_file(os.path.join(directory, WEIGHTS))
    method = _rebuild(meta)
    if _is_guft(method):
        from guft_jax.guft import apply_artifact

        head = {k[len("head/") :]: v for k, v in arrays.items() if k.startswith("head/")}
        tensors: dict = {}
        for k, v in arrays.items():
            if k.startswith("guft/"):
                _, key, what = k.split("/")
                tensors.setdefault(key, {})[what] = v
        head_tree = {}
        for k, v in head.items():
            paths._set(head_tree, k.split("/"), v)
        return apply_artifact(params, {"tensors": tensors, "head": head_tree}), meta
    template = jax.eval_shape(lambda p: method.init(jax.random.PRNGKey(0), p), params)
    want = {
        paths.key_to_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(template)[0]
    }
    have = {k: tuple(v.shape) for k, v in arrays.items() if not k.startswith("fourierft_entries")}
    problems = sorted(set(want) ^ set(have)) + sorted(
        f"{k}: {have[k]} vs {want[k]}" for k in set(want) & set(have) if have[k] != want[k]
    )
    if problems:
        raise CheckpointMismatchError(
            f"{directory}: artifact does not match method {meta['method']}: {problems[:10]}"
        )
    trainable: dict = {}
    for k in want:
        paths._set(trainable, k.split("/"), jnp.asarray(arrays[k]))
    return method.merge(params, trainable), meta
