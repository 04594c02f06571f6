"""GUFT's delta stores behind one protocol: ``W = W0 + δ`` with ``δ`` dense over the eligible
leaves (:class:`DenseStore`, the reference) or fixed-capacity indices and values per leaf
(:class:`SparseStore`, the efficient form)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import kernels as kernels_lib
from guft_jax import ops, paths
from guft_jax.guft import blocks as blocks_lib
from guft_jax.guft.indices import pad_host, pad_indices, resize_host


def _leaf(params, key):
    return paths.get(params, paths.path_of(key))


class DeltaStore(Protocol):
    """What GUFT needs of a delta store (``eligible``: ``{key: shape}`` of the leaves it edits)."""

    eligible: dict

    def init_delta(self) -> dict:
        """The trainable ``δ`` before any round."""

    def init_selected(self, delta: dict) -> dict:
        """``GuftState.selected`` before any round."""

    def init_blocks(self) -> dict:
        """``GuftState.blocks`` before any round."""

    def effective(self, params, delta, state, *, dense: bool = True) -> dict:
        """``params`` with ``δ`` folded in (``dense=False``: kernels may be left to
        :meth:`intercept`)."""

    def intercept(self, delta, state) -> Callable | None:
        """A ``flax.linen.intercept_methods`` function, or None."""

    def mask(self, state) -> dict:
        """The selected entries as bool masks per eligible leaf."""

    def adopt(self, trainable, opt_state, state, merged, capacities, log=print, growth=None):
        """``(trainable, opt_state, state)`` holding the merged mask ``merged``."""

    def indices(self, state, delta) -> dict:
        """``{key: (flat indices, values)}`` of the selected entries (numpy)."""


@dataclasses.dataclass(frozen=True)
class DenseStore:
    """The dense reference store: ``δ`` dense over eligible leaves, bool masks in the state; the
    optimizer is masked element-wise (``MethodHooks.update_mask``)."""

    eligible: dict  # {key: shape}

    def init_delta(self) -> dict:
        return {k: jnp.zeros(s, jnp.float32) for k, s in self.eligible.items()}

    def init_selected(self, delta) -> dict:
        return {k: jnp.zeros(s, bool) for k, s in self.eligible.items()}

    def init_blocks(self) -> dict:
        return {}

    def effective(self, params, delta, state, *, dense=True) -> dict:
        upd = {}
        for k, d in delta.items():
            w0 = _leaf(params, k)
            upd[paths.path_of(k)] = jnp.where(state.selected[k], w0 + d.astype(w0.dtype), w0)
        return paths.replaced(params, upd)

    def intercept(self, delta, state):
        return None

    def mask(self, state) -> dict:
        return state.selected

    def adopt(self, trainable, opt_state, state, merged, capacities=None, log=print, growth=None):
        count = {k: jnp.sum(m, dtype=jnp.int32) for k, m in merged.items()}
        return trainable, opt_state, state._replace(selected=merged, count=count)

    def indices(self, state, delta):
        out = {}
        for k, m in state.selected.items():
            idx = np.flatnonzero(np.asarray(m).reshape(-1)).astype(np.int32)
            out[k] = (idx, np.asarray(delta[k]).reshape(-1)[idx])
        return out


@dataclasses.dataclass(frozen=True)
class SparseStore:
    """The efficient store: per eligible leaf a fixed-capacity vector of flat indices (in the
    state, padded with the leaf's size) and values ``δ`` (trainable); kernels also keep their
    row × column block (:mod:`guft_jax.guft.blocks`)."""

    eligible: dict
    floor: int = 16
    blocks: bool = True
    block_slack: float = blocks_lib.BLOCK_SLACK
    kernels: kernels_lib.KernelOptions = dataclasses.field(
        default_factory=kernels_lib.KernelOptions
    )

    def init_delta(self) -> dict:
        return {k: jnp.zeros((self.floor,), jnp.float32) for k in self.eligible}

    def init_selected(self, delta) -> dict:
        return {
            k: jnp.full((delta[k].shape[0],), math.prod(s), jnp.int32)
            for k, s in self.eligible.items()
        }

    def init_blocks(self) -> dict:
        """Empty blocks per kernel (:func:`guft_jax.guft.blocks.empty_blocks`); none with
        ``blocks=False``."""
        return blocks_lib.empty_blocks(self.eligible, self.floor) if self.blocks else {}

    def effective(self, params, delta, state, *, dense=True) -> dict:
        """Params with the deltas folded in (``dense=False``: kernels are left to the
        interceptor)."""
        upd = {}
        for k, d in delta.items():
            if not dense and blocks_lib.is_kernel(k):
                continue
            w0 = _leaf(params, k)
            flat = w0.reshape(-1).at[state.selected[k]].add(d.astype(w0.dtype), mode="drop")
            upd[paths.path_of(k)] = flat.reshape(w0.shape)
        return paths.replaced(params, upd)

    def intercept(self, delta, state):
        """Replaces ``vit.Linear.matmul`` of every layer whose kernel has a delta, with this
        store's kernel choices passed to the ops explicitly."""
        blocks = getattr(state, "blocks", None) or {}
        args = ops.kernel_arguments(self.kernels)
        return blocks_lib.interceptor(delta, state.selected, blocks, args)

    def mask(self, state) -> dict:
        """Boolean numpy masks of the selected entries (host work: no compile per shape)."""
        sel = jax.device_get(state.selected)
        out = {}
        for k, s in self.eligible.items():
            m = np.zeros((math.prod(s),), bool)
            idx = np.asarray(sel[k])
            m[idx[idx < m.size]] = True
            out[k] = m.reshape(s)
        return out

    def adopt(self, trainable, opt_state, state, merged, capacities, log=print, growth=None):
        """Writes the merged mask's entries into the index vectors (old entries keep their slots
        and values), growing capacities where they overflow; ``growth`` (``K / k₁``, the first
        round only) sizes the blocks for the schedule. Host work in numpy: per-leaf eager
        ops would compile a small program for every distinct shape (hundreds a round)."""
        merged, sel, count = jax.device_get((merged, state.selected, state.count))
        caps = {k: int(v.shape[0]) for k, v in trainable["delta"].items()}
        plans = {}
        for k in self.eligible:
            old = np.asarray(sel[k])[: int(count[k])]
            fresh = np.setdiff1d(np.flatnonzero(np.asarray(merged[k]).reshape(-1)), old)
            plans[k] = np.concatenate([old, fresh]).astype(np.int32)
        new_caps = capacities(caps, {k: len(v) for k, v in plans.items()})
        grown = [k for k in caps if new_caps[k] != caps[k]]
        if grown and int(state.round) > 0:
            log(f"guft: capacity grown for {len(grown)} tensors (one retrace): {grown[:4]}")
        trainable, opt_state, state = self.resize(trainable, opt_state, state, new_caps)
        idx, count = dict(state.selected), dict(state.count)
        blocks, outgrown = dict(state.blocks), []
        for k, entries in plans.items():
            arr = pad_host(entries, new_caps[k], math.prod(self.eligible[k]))
            idx[k] = jax.device_put(arr)
            count[k] = jax.device_put(np.int32(len(entries)))
            if k in blocks:
                blocks[k], fits = self._block(k, arr, blocks[k], growth)
                outgrown += [] if fits else [k]
        if outgrown:
            log(
                f"guft: {len(outgrown)} kernels outgrew their blocks; their weight gradient "
                f"skips the block from now on (no retrace): {outgrown[:4]}"
            )
        return trainable, opt_state, state._replace(selected=idx, count=count, blocks=blocks)

    def _block(self, key, idx, cur, growth=None):
        """The kernel's block of ``idx`` and whether it holds every entry; ``growth``: sized by
        :func:`guft_jax.guft.block_capacity`, else the current capacity stays."""
        dims = blocks_lib.store_dims(key, self.eligible[key])
        caps = (int(cur["rows"].shape[0]), int(cur["cols"].shape[0]))
        rows, cols = blocks_lib.rows_cols(idx, dims)
        if growth is not None:
            need = (len(rows), len(cols))
            frac = self.kernels.block_max_fraction
            caps = blocks_lib.block_capacity(
                need, dims, growth, self.floor, slack=self.block_slack, max_fraction=frac
            )
        return blocks_lib.padded_block(rows, cols, dims, caps)

    def resize(self, trainable, opt_state, state, caps: dict, block_caps: dict | None = None):
        """Zero-pads (or truncates) δ, its optimizer leaves and the indices to ``caps`` (on the
        host; leaves whose length does not change are kept as they are); ``block_caps``
        (``{key: (rows, cols)}``) re-pads the blocks (with ``in`` / ``out``)."""
        if block_caps:
            blocks = dict(state.blocks)
            for k, (r, c) in block_caps.items():
                b = blocks[k]
                # padding is in / out, the largest entry of a block vector
                blocks[k] = {
                    f: b[f] if b[f].shape[0] == n else pad_indices(b[f], n, int(np.max(b[f])))
                    for f, n in (("rows", r), ("cols", c))
                }
            state = state._replace(blocks=blocks)
        sizes = {f"delta/{k}": c for k, c in caps.items()}
        new_tr = resize_host(trainable, sizes)
        new_opt = resize_host(opt_state, sizes, suffix=True)
        idx = {
            k: v if v.shape[0] == caps[k] else pad_indices(v, caps[k], int(state.size[k]))
            for k, v in state.selected.items()
        }
        return new_tr, new_opt, state._replace(selected=idx)

    def indices(self, state, delta):
        out = {}
        for k in state.selected:
            n = int(state.count[k])
            out[k] = (np.asarray(state.selected[k])[:n], np.asarray(delta[k])[:n])
        return out


def store_of(eligible: dict, *, sparse: bool, **sparse_options: Any) -> DeltaStore:
    """The store of a configuration: :class:`SparseStore` (with ``sparse_options``) or
    :class:`DenseStore`."""
    return SparseStore(eligible, **sparse_options) if sparse else DenseStore(eligible)
