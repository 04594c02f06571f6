"""Hybrid methods: several methods applied together, optionally behind learned gates.

``combine(m1, m2, ...)`` trains every part at once (UniPELT-style hybrids are built on it): the
trainable tree is ``{"head": ..., "parts": {name_i: part_i without its head}}``, the method state
a tuple of the parts' states. ``apply`` feeds the params produced by one part's ``apply`` into the
next, so weight-space parts compose (``W0 + ΔW_1 + ΔW_2``) and variable collections are merged;
interceptors are nested (the first part's outermost). Extra losses run for each part and epoch
hooks in order; parts with per-step, resize or optimizer-mask hooks (adaptive methods, GUFT's
paths) are refused for now, since their optimizer state is not split per part. Parts must have
distinct names.
"""

from __future__ import annotations

import functools

import jax

from guft_jax.methods.base import (
    HEAD,
    Method,
    MethodHooks,
    default_labels,
    init_state,
    trained_counts,
)


def _part_tree(trainable, name, head):
    return {**trainable["parts"][name], HEAD: head}


def _nest(interceptors):
    """One interceptor that applies ``interceptors`` in order (first = outermost)."""

    def icpt(next_fun, args, kwargs, context):
        def call(i, *a, **kw):
            if i == len(interceptors):
                return next_fun(*a, **kw)
            return interceptors[i](lambda *a2, **kw2: call(i + 1, *a2, **kw2), a, kw, context)

        return call(0, *args, **kwargs)

    return icpt


def _states(parts, state):
    ok = isinstance(state, tuple) and len(state) == len(parts)
    return state if ok else (None,) * len(parts)


def _each(parts, trainable, state):
    """``(index, name, method, part trainable, part state)`` for every part."""
    for i, ((n, m), st) in enumerate(zip(parts.items(), _states(parts, state), strict=True)):
        yield i, n, m, _part_tree(trainable, n, trainable[HEAD]), st


def _init(parts, rng, params):
    out = {}
    for i, (n, m) in enumerate(parts.items()):
        out[n] = _drop_head(m.init(jax.random.fold_in(rng, i), params))
    return {HEAD: params[HEAD], "parts": out}


def _apply(parts, params, trainable, state=None, rng=None):
    variables = {"params": params}
    for i, _, m, tr, st in _each(parts, trainable, state):
        r = None if rng is None else jax.random.fold_in(rng, i)
        variables = {**variables, **m.apply(variables["params"], tr, st, r)}
    return variables


def _merge(parts, params, trainable, state=None):
    for _, n, m, tr, st in _each(parts, trainable, state):
        if m.merge is None:
            raise ValueError(f"combine: part {n} cannot be merged")
        params = m.merge(params, tr, st)
    return params


def _labels(parts, trainable):
    out = {HEAD: jax.tree_util.tree_map(lambda _: HEAD, trainable[HEAD]), "parts": {}}
    for _, n, m, tr, _ in _each(parts, trainable, None):
        out["parts"][n] = _drop_head((m.labels or default_labels)(tr))
    return out


def _init_state(parts, params, trainable):
    return tuple(init_state(m, params, tr) for _, _, m, tr, _ in _each(parts, trainable, None))


def _intercept(parts, trainable, state, rng=None):
    found = []
    for _, _, m, tr, st in _each(parts, trainable, state):
        f = m.hooks.intercept(tr, st, rng) if m.hooks.intercept is not None else None
        if f is not None:
            found.append(f)
    return _nest(found) if found else None


def _loss(parts, params, trainable, state, rng):
    total = 0.0
    for i, _, m, tr, st in _each(parts, trainable, state):
        if m.hooks.loss is not None:
            total = total + m.hooks.loss(params, tr, st, jax.random.fold_in(rng, i))
    return total


def _trained(parts, params, trainable, state):
    out: dict = {}
    for _, _, m, tr, st in _each(parts, trainable, state):
        for k, v in trained_counts(m, params, tr, st).items():
            out[k] = out.get(k, 0) + v
    return out


def _epoch_start(parts, epoch, ctx):
    tr, st = ctx.trainable, list(_states(parts, ctx.state))
    for i, (n, m) in enumerate(parts.items()):
        if m.hooks.epoch_start is None:
            continue
        sub = ctx._replace(trainable=_part_tree(tr, n, tr[HEAD]), opt_state=(), state=st[i])
        new_tr, _, st[i] = m.hooks.epoch_start(epoch, sub)
        tr = {HEAD: tr[HEAD], "parts": {**tr["parts"], n: _drop_head(new_tr)}}
    return tr, ctx.opt_state, tuple(st)


def combine(*methods: Method, name: str | None = None) -> Method:
    """All ``methods`` at once, sharing one task head.

    Raises:
      ValueError: repeated part names, or a part with a per-step, resize or mask hook.

    >>> from guft_jax.methods import get_method
    >>> m = combine(get_method("lora", rank=4), get_method("bitfit"))
    >>> m.name
    'lora+bitfit'
    """
    names = [m.name for m in methods]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"combine: needs distinct method names, got {names}")
    for m in methods:
        if m.hooks.step is not None or m.hooks.resize is not None or m.hooks.update_mask:
            raise ValueError(
                f"combine: part {m.name} has a per-step, resize or optimizer-mask hook, which "
                "combine does not route yet (their optimizer state is not split per part)"
            )
    parts = dict(zip(names, methods, strict=True))
    f = functools.partial
    hooks = MethodHooks(
        init_state=f(_init_state, parts),
        epoch_start=f(_epoch_start, parts) if any(m.hooks.epoch_start for m in methods) else None,
        intercept=f(_intercept, parts) if any(m.hooks.intercept for m in methods) else None,
        loss=f(_loss, parts) if any(m.hooks.loss for m in methods) else None,
        trained=f(_trained, parts),
    )
    return Method(
        name=name or "+".join(names),
        init=f(_init, parts),
        apply=f(_apply, parts),
        labels=f(_labels, parts),
        hparams={"parts": [{"method": m.name, "hparams": m.hparams or {}} for m in methods]},
        merge=f(_merge, parts),
        hooks=hooks,
    )


def _drop_head(tree):
    return {k: v for k, v in tree.items() if k != HEAD}
