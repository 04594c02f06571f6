"""Selecting params by regex over ``/``-joined key paths (big_vision style)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax

HEAD_PATTERN = r"^head/"
SEP = "."  # a param path used as one dict key inside a method's tree: "/" -> "."


def key_of(path: str) -> str:
    """The dict key standing for param ``path`` inside a method's tree (``a/b/c`` -> ``a.b.c``)."""
    return path.replace("/", SEP)


def path_of(key: str) -> str:
    """The param path of a key made by :func:`key_of` (``a.b.c`` -> ``a/b/c``)."""
    return key.replace(SEP, "/")


def key_to_str(path: Sequence[Any]) -> str:
    """``(DictKey('a'), DictKey('b'))`` -> ``"a/b"``; a Flax NNX ``Variable``'s trailing
    ``.value`` attribute is dropped, so linen and NNX params are named by the same paths."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
    """The ``/``-joined paths of all leaves, in ``tree_leaves`` order."""
    return [key_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def path_map(fn, tree: Any, *rest: Any) -> Any:
    """``tree_map`` whose function receives the ``/``-joined path first (keeps the tree's type:
    a Flax NNX ``State`` stays a ``State``)."""
    return jax.tree_util.tree_map_with_path(lambda p, *x: fn(key_to_str(p), *x), tree, *rest)


def _as_list(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def regex_mask(
    tree: Any,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    *,
    field: str = "include",
) -> Any:
    """A leaf-level bool tree: True where the path matches any ``include`` regex (all leaves if
    ``include`` is None) and no ``exclude`` regex (``re.search`` semantics).

    Raises:
      ValueError: if a pattern matches no leaf (naming ``field`` and the pattern): a selector that
        silently selects nothing hides bugs.
    """
    paths = leaf_paths(tree)
    inc, exc = _as_list(include), _as_list(exclude)
    for name, pats in ((field, inc), (field.replace("include", "exclude"), exc)):
        for pat in pats:
            rx = re.compile(pat)
            if not any(rx.search(p) for p in paths):
                raise ValueError(
                    f"{name}: regex {pat!r} matches no parameter; example paths: {paths[:6]}"
                )

    def keep(path: str) -> bool:
        ok = True if not inc else any(re.search(p, path) for p in inc)
        return ok and not any(re.search(p, path) for p in exc)

    return path_map(lambda p, _: keep(p), tree)


def split(tree: Any, mask: Any) -> tuple[dict, dict]:
    """Splits a nested-dict tree by a leaf-level bool mask into (selected, rest) nested dicts."""
    sel, rest = {}, {}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    mflat = jax.tree_util.tree_leaves(mask)
    for (p, x), m in zip(flat, mflat, strict=True):
        _set_keys(sel if m else rest, [key_to_str([k]) for k in p], x)
    return sel, rest


def merge(*trees: dict) -> dict:
    """Deep-merges nested dicts (later trees win on conflicting leaves)."""
    out: dict = {}
    for t in trees:
        for p, x in jax.tree_util.tree_flatten_with_path(t)[0]:
            _set_keys(out, [key_to_str([k]) for k in p], x)
    return out


def get(tree: dict, path: str) -> Any:
    """The node at ``/``-joined ``path`` of a nested dict."""
    node = tree
    for k in path.split("/"):
        node = node[k]
    return node


def _set_keys(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def set(tree: dict, path: str | Sequence[str], value: Any) -> None:  # noqa: A001
    """Sets the node at ``path`` (``/``-joined, or a list of keys) of a nested dict in place,
    creating intermediate dicts."""
    _set_keys(tree, path.split("/") if isinstance(path, str) else list(path), value)


def replaced(tree: dict, updates: dict[str, Any]) -> dict:
    """A structural copy of a nested dict with the nodes at the ``/``-joined paths replaced."""
    out = merge(tree, {})
    for path, value in updates.items():
        set(out, path, value)
    return out


def unflatten(flat: dict[str, Any], template: Any) -> Any:
    """``template``'s structure with each leaf taken from ``flat[path]`` (``/``-joined paths of
    the template; keys may themselves hold ``/``).

    Raises:
      KeyError: a template path is missing from ``flat``.
    """
    return path_map(lambda p, _: flat[p], template)
