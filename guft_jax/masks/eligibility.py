"""Eligibility: which leaves of a param tree a selective method may edit (presets + regexes),
and the 2-D views of those leaves."""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from guft_jax import paths, vit

SEP = paths.SEP

# Preset name -> regex over ``/``-joined param paths (``re.search``) choosing the leaves it
# names; ``None`` names every leaf. The head is never eligible, whatever the preset.
ELIGIBILITY: dict[str, str | None] = {
    # The GUFT paper's literal rule: every backbone parameter.
    "all": None,
    # The encoder blocks' Dense kernels and biases: attention query/key/value/out and the MLP's
    # two Dense layers. Not the patch embedding, cls, position embedding, LayerScale, LayerNorm
    # or encoder_norm.
    "blocks": (
        r"^Transformer/encoderblock_\d+/"
        r"(MultiHeadDotProductAttention_\d+/(query|key|value|out)|MlpBlock_\d+/Dense_[01])"
        r"/(kernel|bias)$"
    ),
}


# Mask keys are the param paths as one dict key (``/`` -> ``.``): :mod:`guft_jax.paths`'s.
leaf_key, key_path = paths.key_of, paths.path_of


def eligible_leaves(
    params: Any,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
    *,
    preset: str = "all",
) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the eligible leaves: those the ``preset`` names, matching an
    ``include`` regex (all if None) and no ``exclude`` regex; never the head.

    Presets (:data:`ELIGIBILITY`): ``"all"``, every backbone leaf (the GUFT paper's literal rule;
    a global Σ|g| ranking over it is dominated by the patch embedding, whose gradient sums over
    every patch of every image); ``"blocks"``, the encoder blocks' Dense kernels and biases, what
    GPS (arXiv:2312.10136) and SPT (arXiv:2303.08566) select from (docs: GUFT guide). User regexes
    apply on top: the preset's leaves ∩ ``include`` − ``exclude``.

    Args:
      params: a Flax param tree (with or without a ``head``).
      include: regexes over ``/``-joined paths; a leaf must match one (all leaves if None).
      exclude: regexes over ``/``-joined paths; a leaf matching one is dropped.
      preset: a key of :data:`ELIGIBILITY`.

    Returns:
      ``{key: shape}`` in ``tree_leaves`` order.

    Raises:
      ValueError: an unknown preset (``guft.eligible``); a preset naming no leaf of ``params``; a
        regex matching no parameter, or an include regex matching no leaf of the preset
        (``guft.include`` / ``guft.exclude``); nothing eligible.

    >>> model = vit.build_model("ViT-tiny/4", num_classes=3)
    >>> params = vit.init_params(model, jax.random.key(0), 8)
    >>> sorted(eligible_leaves(params, preset="blocks"))[0]
    'Transformer.encoderblock_0.MlpBlock_3.Dense_0.bias'
    """
    if preset not in ELIGIBILITY:
        raise ValueError(
            f"guft.eligible: unknown preset {preset!r}; allowed: {sorted(ELIGIBILITY)}"
        )
    sel = paths.regex_mask(params, include, exclude, field="guft.include")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    all_paths = [paths.key_to_str(p) for p, _ in flat]
    rx = ELIGIBILITY[preset]
    named = [rx is None or re.search(rx, p) is not None for p in all_paths]
    if not any(n and not p.startswith("head/") for n, p in zip(named, all_paths, strict=True)):
        raise ValueError(
            f"guft.eligible: preset {preset!r} names no parameter of this model; "
            f"example paths: {all_paths[:6]}"
        )
    in_preset = [p for n, p in zip(named, all_paths, strict=True) if n]
    for pat in [include] if isinstance(include, str) else list(include or []):
        if not any(re.search(pat, p) for p in in_preset):
            raise ValueError(
                f"guft.include: regex {pat!r} matches no parameter of preset {preset!r}"
            )
    out = {}
    for (_, x), path, n, m in zip(
        flat, all_paths, named, jax.tree_util.tree_leaves(sel), strict=True
    ):
        if n and m and not path.startswith("head/"):
            out[leaf_key(path)] = tuple(x.shape)
    if not out:
        raise ValueError("guft.include: no eligible parameter (the head is never eligible)")
    return out


def row_view(key: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D ``(d_in, d_out)`` view of a leaf for ``allocation="per_row"``.

    A ``kernel`` is viewed as :func:`guft_jax.vit.kernel_as_matrix` multiplies it (attention
    query/key/value ``(d, h, hd)`` -> ``(d, h·hd)``, out ``(h, hd, d)`` -> ``(h·hd, d)``, others
    ``(prod(shape[:-1]), shape[-1])``), so a row (output unit) is one column of that view. Every
    other leaf (biases, scales, embeddings) has no input dimension: ``(1, size)``, each entry is
    its own output unit.
    """
    if key.split(SEP)[-1] == "kernel" and len(shape) >= 1:
        return kernel_view(key_path(key), tuple(shape))
    return 1, math.prod(shape)


@functools.lru_cache(maxsize=4096)
def kernel_view(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(in, out)`` of the matrix a ViT kernel at ``path`` multiplies with
    (:func:`guft_jax.vit.kernel_as_matrix`, evaluated abstractly: no array allocated)."""
    out = jax.eval_shape(
        lambda w: vit.kernel_as_matrix(w, path), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    return int(out.shape[0]), int(out.shape[1])
