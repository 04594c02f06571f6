"""Which leaves of any param pytree a transform edits: NNX-normalised ``/``-joined paths,
regex selection, the eligible leaves and the head."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import masks as masks_lib
from guft_jax import paths as paths_lib

PyTree = Any


class _DefaultHead(str):
    """The default ``head=``: the regex ``^head/`` where it matches, no head leaf where not."""

    __slots__ = ()


DEFAULT_HEAD = _DefaultHead(paths_lib.HEAD_PATTERN)

# ----------------------------------------------------------------------------- paths
# One set of path helpers (:mod:`guft_jax.paths`, NNX-normalised), under the names this package
# has always exported.
path_str, tree_paths, map_paths = paths_lib.key_to_str, paths_lib.leaf_paths, paths_lib.path_map


def _patterns(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def match_paths(tree: PyTree, patterns: str | Sequence[str] | None, *, field: str) -> list[str]:
    """Paths of ``tree`` matched (``re.search``) by any of ``patterns``.

    Raises:
      ValueError: a pattern matches no path (naming ``field`` and the pattern); not for the
        default head (:data:`DEFAULT_HEAD`), which then matches nothing.
    """
    all_paths = tree_paths(tree)
    out = []
    for pat in _patterns(patterns):
        hit = [p for p in all_paths if re.search(pat, p)]
        if not hit and not isinstance(patterns, _DefaultHead):
            raise ValueError(
                f"{field}: regex {pat!r} matches no parameter; example paths: {all_paths[:6]}"
            )
        out += hit
    return [p for p in all_paths if p in set(out)]


class Selection(NamedTuple):
    """Which leaves a selective method may edit (``eligible``: ``{key: shape}``, keys as in
    :class:`guft_jax.guft.GuftState`) and which always train in full (``full``: paths)."""

    eligible: dict
    full: frozenset


def _check_keys(all_paths: list[str]) -> None:
    seen: dict = {}
    for p in all_paths:
        key = masks_lib.leaf_key(p)
        if key in seen:
            raise ValueError(
                f"params: leaves {seen[key]!r} and {p!r} have the same mask key {key!r} (a '.' "
                "or '/' inside a key name); rename one of them"
            )
        seen[key] = p


def eligibility(
    tree: PyTree,
    *,
    eligible: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = DEFAULT_HEAD,
) -> Selection:
    """The eligible leaves of any param pytree (:func:`guft_jax.masks.eligible_leaves` rules on
    its NNX-normalised paths), minus the ``head`` leaves, which train in full (GUFT's
    selected entries are :func:`guft_jax.guft.selection`).

    Raises:
      ValueError: a regex matching nothing (``head`` when given explicitly, ``guft.include``,
        ``guft.exclude``), an unknown preset, nothing eligible, or two leaves whose paths give
        the same mask key.
    """
    all_paths = tree_paths(tree)
    _check_keys(all_paths)
    full = match_paths(tree, head, field="head") if head is not None else []
    view: dict = {}
    for p, (_, x) in zip(all_paths, jax.tree_util.tree_flatten_with_path(tree)[0], strict=True):
        if p not in full:
            paths_lib.set(view, p, jax.ShapeDtypeStruct(np.shape(x), jnp.float32))
    if not view:
        raise ValueError("head: every parameter is a head leaf; nothing is eligible")
    elig = masks_lib.eligible_leaves(view, _patterns(include) or None, exclude, preset=eligible)
    return Selection(elig, frozenset(full))


def full_mask(tree: PyTree, sel: Selection, partial: dict) -> PyTree:
    """A bool pytree shaped like ``tree``: ``partial[key]`` on eligible leaves, True on the
    ``full`` (head) leaves, False elsewhere."""

    def leaf(p, x):
        key = masks_lib.leaf_key(p)
        if key in partial:
            return partial[key]
        return jnp.full(np.shape(x), p in sel.full, bool)

    return map_paths(leaf, tree)
