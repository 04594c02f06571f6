"""Shared plumbing of weight-space methods: targets by regex, 2-D views, adding ΔW, one factory.

A weight-space method computes new kernels from the frozen ones and its trainable factors; its
``apply`` is its ``merge`` (``{"params": merge(params, trainable)}``), its artifact is its
trainable tree, and its per-tensor count is the size of the factors of each adapted kernel.
:func:`method` builds that :class:`Method` once for all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods.base import Method, MethodHooks
from guft_jax.vit import kernel_as_matrix

DEFAULT_TARGETS = (r"MultiHeadDotProductAttention_1/(query|value)/kernel$",)
key, path_of = paths.key_of, paths.path_of  # target keys inside trainable trees


def target_paths(params: Any, targets: tuple[str, ...] | list[str], *, field: str) -> list[str]:
    """Paths of the kernels to adapt; each regex must match at least one kernel."""
    mask = paths.regex_mask(params, list(targets), [r"^head/"], field=field)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    out = [paths.key_to_str(p) for p, m in flat if m]
    bad = [p for p in out if not p.endswith("kernel")]
    if bad:
        raise ValueError(f"{field}: targets must be kernels, got {bad[:4]}")
    return out


def matrix(params: Any, path: str) -> jax.Array:
    """The 2-D ``(in, out)`` view of the kernel at ``path``."""
    return kernel_as_matrix(paths.get(params, path), path)


# The guft_jax / vit_jax ViT's attention kernels as explicit layout rules: (regex, input dims).
VIT_LAYOUT = ((r"(^|/)(query|key|value)/kernel$", 1), (r"(^|/)out/kernel$", 2))


def matrix_shape(
    path: str, shape: tuple[int, ...], layout: Sequence[tuple[str, int]]
) -> tuple[int, int]:
    r"""The 2-D ``(in, out)`` view of a kernel of any model, by an explicit layout rule.

    A 2-D kernel is ``(in, out)`` (Flax ``Dense``). A kernel of more dimensions needs a rule in
    ``layout``: the first ``(regex, n_in)`` whose regex matches ``path`` says that its leading
    ``n_in`` dimensions are the input (``n_in < 0`` counts from the end): a conv kernel
    ``(kh, kw, cin, cout)`` is ``n_in=3`` (or ``-1``), an attention query/key/value kernel
    ``(d, heads, head_dim)`` ``n_in=1``, an attention out kernel ``(heads, head_dim, d)``
    ``n_in=2`` (:data:`VIT_LAYOUT`). The layout is never guessed from the shape (a 3-D kernel
    may be a conv or an attention kernel).

    Raises:
      ValueError: a kernel of fewer than 2 dimensions, a >2-D kernel no rule matches, or a rule
        leaving no input or no output dimension.

    >>> matrix_shape("Conv_0/kernel", (3, 3, 8, 16), [(r"Conv_\d+/kernel$", 3)])
    (72, 16)
    """
    nd = len(shape)
    if nd < 2:
        raise ValueError(f"targets: {path} has shape {shape}; only kernels (>= 2-D) are adapted")
    if nd == 2:  # (in, out) whatever the rules say (a kernel some view has already flattened)
        return int(shape[0]), int(shape[1])
    for rx, n_in in layout:
        if re.search(rx, path):
            n = n_in if n_in >= 0 else nd + n_in
            if not 1 <= n < nd:
                raise ValueError(f"layout: rule ({rx!r}, {n_in}) does not split {path} {shape}")
            return math.prod(shape[:n]), math.prod(shape[n:])
    raise ValueError(
        f"layout: {path} has shape {shape}; give its (regex, n_in) rule: e.g. "
        "(r'Conv_\\d+/kernel$', 3) for a conv kernel (kh, kw, cin, cout), "
        "(r'(query|key|value)/kernel$', 1) for attention (d, heads, head_dim), "
        "(r'out/kernel$', 2) for (heads, head_dim, d); see weight_space.VIT_LAYOUT"
    )


def add_deltas(params: Any, deltas: dict[str, jax.Array], head: Any) -> dict:
    """``params`` with ``kernel + ΔW`` at each path (ΔW given as ``(in, out)``) and a new head."""
    upd = {}
    for path, d in deltas.items():
        k = paths.get(params, path)
        upd[path] = k + d.reshape(k.shape).astype(k.dtype)
    return {**paths.replaced(params, upd), "head": head}


def replace_kernels(params: Any, kernels: dict[str, jax.Array], head: Any) -> dict:
    """``params`` with whole kernels replaced (given as ``(in, out)`` matrices) and a new head."""
    upd = {p: w.reshape(paths.get(params, p).shape) for p, w in kernels.items()}
    upd = {p: w.astype(paths.get(params, p).dtype) for p, w in upd.items()}
    return {**paths.replaced(params, upd), "head": head}


def kaiming_uniform(
    rng: jax.Array, shape: tuple[int, int], fan_in: int, *, a: float | None = None
) -> jax.Array:
    """PyTorch's ``kaiming_uniform_(w, a)``: U(±sqrt(6 / ((1 + a²)·fan_in))).

    ``a=None`` is PyTorch's default Linear init, ``a = sqrt(5)``: U(±1/sqrt(fan_in)); ``a=0.0``
    is ``kaiming_uniform_(w)``'s own default, U(±sqrt(6 / fan_in)) (AFLoRA's init).
    """
    bound = 1.0 / jnp.sqrt(fan_in) if a is None else math.sqrt(6.0 / ((1.0 + a * a) * fan_in))
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def trained_per_kernel(group: str) -> Callable:
    """``trained`` hook: numbers trained per adapted kernel, keyed by the kernel's param path."""

    def trained(params, trainable, state=None):
        del params, state
        return {
            path_of(k): int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(f)))
            for k, f in trainable[group].items()
        }

    return trained


def method(
    name: str,
    *,
    init: Callable,
    merge: Callable[[Any, Any], Any],
    hparams: dict,
    group: str | None = None,
    hooks: MethodHooks | None = None,
) -> Method:
    """A weight-space :class:`Method`: ``apply`` = ``merge``; ``trainable[group]`` holds one entry
    per adapted kernel (``group`` defaults to ``name``)."""
    hooks = hooks or MethodHooks()
    if hooks.trained is None:
        hooks = hooks._replace(trained=trained_per_kernel(group or name))
    return Method(
        name=name,
        init=init,
        apply=lambda params, trainable, state=None, rng=None: {"params": merge(params, trainable)},
        hparams=hparams,
        merge=lambda params, trainable, state=None: merge(params, trainable),
        hooks=hooks,
    )
