"""LoSiA's step hook (arXiv:2507.04487): the per-layer re-warm, the importance EMA of the recording
layer and relocalisation at a slot's end (retired blocks into the ring, Adam moments reset)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods.base import StepInfo
from guft_jax.methods.losia_layout import (
    LosiaConfig,
    LosiaState,
    Target,
    kind_dims,
    layer_count,
    operands,
)
from guft_jax.methods.losia_ops import effective_matrix
from guft_jax.methods.losia_select import carry_retained, greedy_subnet, importance


def _is_block_leaf(path: str, key: str) -> bool:
    return path == f"blocks/{key}" or path.endswith(f"/blocks/{key}")


def reset_moments(opt_state, keys_reset: dict[str, jax.Array]):
    """``opt_state`` with every leaf that mirrors ``blocks/{key}`` (Adam's ``mu``, ``nu``; count
    scalars never match) set to exactly zero where ``keys_reset[key]`` (a traced bool) holds."""

    def fix(p, x):
        path = paths.key_to_str(p)
        for key, do in keys_reset.items():
            if getattr(x, "ndim", 0) == 2 and _is_block_leaf(path, key):
                return jnp.where(do, jnp.zeros_like(x), x)
        return x

    return jax.tree_util.tree_map_with_path(fix, opt_state)


def _rewarmed(cfg: LosiaConfig, lay: list[Target], info: StepInfo) -> dict:
    """The blocks after this step's update scaled by each layer's re-warm factor
    ``s = min(1, (t - restart) / T)``: ``prev + s·(new − prev)``."""
    st = info.state
    s = jnp.clip((st.count - st.restart).astype(jnp.float32) / cfg.period, 0.0, 1.0)
    blocks = {}
    for tg in lay:
        new, old = info.trainable["blocks"][tg.key], info.prev_trainable["blocks"][tg.key]
        sl = s[tg.pos]
        blocks[tg.key] = jnp.where(sl >= 1.0, new, old + (sl * (new - old)).astype(new.dtype))
    return blocks


def _smoothed_importance(cfg: LosiaConfig, lay: list[Target], info: StepInfo, rec):
    """``(Ī, Ū)`` per matrix type after this step: the recording layer's importance (θ before
    this update) from the probe's dense gradient."""
    st = info.state
    prev = info.prev_trainable["blocks"]
    imp, unc = {}, {}
    for kind in kind_dims(lay):
        members = sorted((tg for tg in lay if tg.kind == kind), key=lambda tg: tg.pos)
        pos_of = jnp.asarray([tg.pos for tg in members], jnp.int32)
        which = jnp.argmax(pos_of == rec)  # the member whose layer records
        # The switch only selects that layer's operands; one scatter builds its matrix.
        branches = [functools.partial(operands, info.params, tg, prev, st) for tg in members]
        ops = jax.lax.switch(which, branches) if len(branches) > 1 else branches[0]()
        theta = effective_matrix(*ops)
        i_now = importance(theta, info.grads["probe"][kind])
        ib = cfg.beta1 * st.imp[kind] + (1 - cfg.beta1) * i_now
        ub = cfg.beta2 * st.unc[kind] + (1 - cfg.beta2) * jnp.abs(i_now - ib)
        imp[kind], unc[kind] = ib, ub
    return imp, unc


def _chosen(lay: list[Target], imp: dict, unc: dict, is_end) -> dict:
    """Per matrix type the greedy subnet of ``Ī ⊙ Ū`` at a slot's last step (zeros otherwise,
    unused)."""
    subs = {tg.kind: tg.sub for tg in lay}

    def relocate():
        return {k: greedy_subnet(imp[k] * unc[k], *subs[k]) for k in imp}

    def keep():
        return {
            k: (jnp.zeros((subs[k][0],), jnp.int32), jnp.zeros((subs[k][1],), jnp.int32))
            for k in imp
        }

    return jax.lax.cond(is_end, relocate, keep)


def _relocalised(cfg: LosiaConfig, lay, st: LosiaState, blocks: dict, chosen: dict, do_layer):
    """The layers in ``do_layer`` move to their ``chosen`` subnets: the retired block goes into
    the ring (``history > 0``) or its retained values into the new block (``history = 0``).
    Returns ``(blocks, rows, cols, res_rows, res_cols, res_vals, resets)``."""
    rows, cols, rr, rc, rv = (
        dict(x) for x in (st.rows, st.cols, st.res_rows, st.res_cols, st.res_vals)
    )
    blocks, resets = dict(blocks), {}
    for tg in lay:
        k, do = tg.key, do_layer[tg.pos]
        new_r, new_c = chosen[tg.kind]
        old_r, old_c, b = st.rows[k], st.cols[k], blocks[k]
        if cfg.history > 0:
            slot = st.relocs[tg.pos] % cfg.history
            put = lambda ring, v, slot=slot, do=do: jnp.where(
                do, jax.lax.dynamic_update_index_in_dim(ring, v, slot, 0), ring
            )
            rr[k], rc[k], rv[k] = put(rr[k], old_r), put(rc[k], old_c), put(rv[k], b)
            fresh = jnp.zeros_like(b)
        else:
            fresh = carry_retained(old_r, old_c, b, new_r, new_c)
        blocks[k] = jnp.where(do, fresh, b)
        rows[k] = jnp.where(do, new_r, old_r)
        cols[k] = jnp.where(do, new_c, old_c)
        resets[k] = do
    return blocks, rows, cols, rr, rc, rv, resets


def step(cfg: LosiaConfig, info: StepInfo):
    """``MethodHooks.step`` of LoSiA (module docstring); traced inside the train step."""
    lay = cfg.layout(info.params)
    n, T = layer_count(lay), cfg.period
    st = info.state
    t = st.count  # the step the forward used (== info.step in the engine)
    rec = cfg.recording(t, n)
    blocks = _rewarmed(cfg, lay, info)
    trainable = {**info.trainable, "blocks": blocks}
    if not cfg.relocalize:
        return trainable, info.opt_state, st._replace(count=t + 1)
    imp, unc = _smoothed_importance(cfg, lay, info, rec)
    is_end = (t % T) == T - 1
    chosen = _chosen(lay, imp, unc, is_end)
    do_layer = is_end & (jnp.arange(n) == rec)  # (L,)
    blocks, rows, cols, rr, rc, rv, resets = _relocalised(cfg, lay, st, blocks, chosen, do_layer)
    opt_state = reset_moments(info.opt_state, resets)
    zero = lambda d: {k: jnp.where(is_end, jnp.zeros_like(v), v) for k, v in d.items()}
    restart = jnp.where(do_layer, t + 1, st.restart)
    relocs = st.relocs + do_layer.astype(jnp.int32)
    state = LosiaState(rows, cols, rr, rc, rv, zero(imp), zero(unc), restart, relocs, t + 1)
    return {**trainable, "blocks": blocks}, opt_state, state
