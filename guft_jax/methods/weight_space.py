"""Shared plumbing of weight-space methods: targets by regex, 2-D views, adding ΔW."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.vit import kernel_as_matrix

DEFAULT_TARGETS = (r"MultiHeadDotProductAttention_1/(query|value)/kernel$",)
SEP = "."  # target keys in trainable trees: param path with "/" -> "." (checkpoint friendly)


def target_paths(params: Any, targets: tuple[str, ...] | list[str], *, field: str) -> list[str]:
    """Paths of the kernels to adapt; each regex must match at least one kernel."""
    mask = paths.select(params, list(targets), [r"^head/"], field=field)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    out = [paths.key_to_str(p) for p, m in flat if m]
    bad = [p for p in out if not p.endswith("kernel")]
    if bad:
        raise ValueError(f"{field}: targets must be kernels, got {bad[:4]}")
    return out


def key(path: str) -> str:
    return path.replace("/", SEP)


def path_of(k: str) -> str:
    return k.replace(SEP, "/")


def matrix(params: Any, path: str) -> jax.Array:
    """The 2-D ``(in, out)`` view of the kernel at ``path``."""
    return kernel_as_matrix(paths.get(params, path), path)


def add_deltas(params: Any, deltas: dict[str, jax.Array], head: Any) -> dict:
    """``params`` with ``kernel + ΔW`` at each path (ΔW given as ``(in, out)``) and a new head."""
    out = jax.tree_util.tree_map(lambda x: x, params)  # shallow structural copy
    out = paths.merge(out, {})
    for path, d in deltas.items():
        k = paths.get(params, path)
        paths._set(out, path.split("/"), k + d.reshape(k.shape).astype(k.dtype))
    out["head"] = head
    return out


def replace_kernels(params: Any, kernels: dict[str, jax.Array], head: Any) -> dict:
    """``params`` with whole kernels replaced (given as ``(in, out)`` matrices) and a new head."""
    out = paths.merge(params, {})
    for path, w in kernels.items():
        k = paths.get(params, path)
        paths._set(out, path.split("/"), w.reshape(k.shape).astype(k.dtype))
    out["head"] = head
    return out


def kaiming_uniform(rng: jax.Array, shape: tuple[int, int], fan_in: int) -> jax.Array:
    """PyTorch's default Linear init, ``kaiming_uniform_(a=sqrt(5))``: U(±1/sqrt(fan_in))."""
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)
