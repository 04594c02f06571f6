"""GUFT — Gradual Unfreeze Fine-Tuning (docs: GUFT guide), and one-shot saliency masks.

At the start of each epoch of the schedule (1-indexed) a saliency pass sums ``|∇L|`` over the
training set at the current weights (:mod:`guft_jax.saliency`), the top
``k = round(ratio · N_eligible)`` entries become a new mask (:func:`guft_jax.masks.topk_mask`,
``allocation`` says how the budget is spread) and it is OR-merged into the mask so far. Only
masked entries (and the head) train.

Defaults, and why (each a documented choice):

- ``eligible="blocks"``: the encoder blocks' Dense kernels and biases, what GPS/SPT-style sparse
  fine-tuning selects from. ``"all"`` is the paper's literal rule (every backbone tensor); with it
  the patch embedding, whose gradient sums over every patch of every image, took 94% of the
  budget in our offline benchmark and GUFT fell below LoRA; restricted to the blocks it did not.
- ``recompute_epochs=None``: :func:`auto_schedule` of the run length, the rounds spread like the
  paper's E_list ``[1, 6, 11]`` of 100 epochs (which it equals at 100 epochs).
- ``head_warmup=True``: our task head starts at zero (as vit_jax's), so the backbone's gradient,
  and GUFT's saliency, is exactly zero until the head has trained. A recompute that meets an
  all-zero head takes its saliency through a head fitted on the frozen backbone first
  (:func:`warm_head`, one pass over the training set; the run's head is untouched). A round whose
  scores are still all zero is an error.
- ``ratios=(0.001,) * 3``: the paper's 0.1% per round.

Both paths parametrise the backbone as ``W = W0 + δ`` and train ``δ`` (so AdamW's decoupled
weight decay pulls toward the pretrained weights, and the two paths follow one trajectory):

- ``sparse=False`` — the dense reference path (:class:`DensePath`): ``δ`` is a dense tree of the
  eligible leaves, an element-level mask goes to the optimizer through ``update_mask``; entries
  outside it stay exactly 0, so the effective weights stay bitwise equal to ``W0`` there.
- ``sparse=True`` (default) — the efficient path (:class:`SparsePath`): per eligible leaf a
  fixed-capacity vector of flat indices (in the state) and values ``δ`` (trainable), padded with an
  out-of-range index. Linear kernels are intercepted at ``vit.Linear.matmul``, whose replacement
  (:func:`guft_jax.ops.sparse_delta_matmul`) computes the weight gradient only at the selected
  entries; other leaves use ``W0.ravel().at[idx].add(δ)``. Optimizer state ∝ the capacity.

Capacity (sparse path): sized at the first recompute for the whole schedule, so a run traces
its step once. The budget ``K = Σ k_i`` is known up front but not its split over tensors. A round
``i`` adds at most ``k_i`` entries (its top-``k_i``, merged), so a tensor holding ``c₁`` entries
after the first round never holds more than ``c₁ + K − k₁``: a proven bound, but ``K − k₁``
slots for every tensor, which the step's scatters and gathers all visit (DINOv2-S/14, 56 px,
10 epochs, 2 busy CPU cores, ``benchmarks/run_bench.py``: one trace, but train epochs of 126 s
and compiles of 65 s against 92 s and 52 s with the estimate below, also one trace). So
each tensor gets ``min(size, c₁ + K − k₁, max(floor, ⌈slack·c₁·K/k₁⌉, ⌈slack·K·size/N⌉))``:
the bound where it is the smaller (small tensors, biases), else ``slack`` times the first
round's split scaled to the budget; a later round overflowing that grows it (values and Adam
moments zero-padded; one retrace, logged). Per kernel, the row × column block is sized at the
first round for the growth the schedule allows (:func:`block_capacity`) and then fixed; a later
round whose rows or columns outgrow it switches that kernel's weight gradient to the block-free
SDDMM at run time (``lax.cond`` on :func:`guft_jax.ops.block_covers`, logged), without a
retrace. Resuming restores the capacities (``MethodHooks.resize``). Padding and unused slots
hold ``δ = 0`` with zero gradient and moments, so a newly selected entry starts with zero Adam
moments (Adam's bias correction uses the global step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import masks as masks_lib
from guft_jax import ops, paths, vit
from guft_jax import saliency as sal
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, register

ELIGIBLE = ("all", "blocks")
ALLOCATIONS = ("global", "per_tensor", "per_row")


class GuftState(NamedTuple):
    """GUFT's method state (checkpointed). Keys of the dicts are eligible leaves' keys
    (``paths.key_of`` of the param path).

    - ``selected``: dense path: bool masks shaped like the leaves; sparse path: int32 flat indices
      of fixed capacity, padded with the leaf's size.
    - ``count``: selected entries per leaf (int32 scalars).
    - ``round``: recomputes done.
    - ``history``: per round, ``epoch``, ``k``, ``selected`` (total after the round) and the
      saliency ``batch_size`` (the ranking depends on it).
    - ``size``: entries per leaf (int32 scalars; the sparse path's padding index).
    - ``blocks``: sparse path, per kernel: ``{"rows", "cols"}``, the sorted unique rows and
      columns (of the layer's ``(in, out)`` matrix) that its entries lie in, padded with
      ``in`` / ``out`` to a capacity of their own; the weight gradient is taken on that
      sub-block where it is small (:func:`guft_jax.ops.block_sddmm`). Dense path: empty.
    """

    selected: dict
    count: dict
    round: jax.Array
    history: dict
    size: dict
    blocks: dict


# ----------------------------------------------------------------------------- schedule


def validate_schedule(recompute_epochs: Sequence[int], ratios: Sequence[float]) -> None:
    """Raises ValueError naming the field unless the schedule is well-formed."""
    e, r = list(recompute_epochs), list(ratios)
    if not e:
        raise ValueError("guft.recompute_epochs: must name at least one epoch (1-indexed)")
    if len(e) != len(r):
        raise ValueError(
            f"guft.ratios: needs one ratio per recompute epoch ({len(e)}), got {len(r)}"
        )
    if any((not isinstance(x, int | np.integer)) or x < 1 for x in e):
        raise ValueError(f"guft.recompute_epochs: must be integers >= 1 (1-indexed), got {e}")
    if sorted(set(e)) != e:
        raise ValueError(f"guft.recompute_epochs: must be strictly increasing, got {e}")
    _validate_ratios(r)


def _validate_ratios(r: Sequence[float]) -> None:
    if not r:
        raise ValueError("guft.ratios: must name at least one round")
    if any(not 0 < x <= 1 for x in r):
        raise ValueError(f"guft.ratios: each must be in (0, 1], got {list(r)}")
    if sum(r) > 1 + 1e-12:
        raise ValueError(f"guft.ratios: total must be <= 1, got {sum(r)}")


def auto_schedule(epochs: int, rounds: int) -> list[int]:
    """The default recompute epochs of a run of ``epochs`` epochs with ``rounds`` rounds.

    The paper recomputes at epochs ``[1, 6, 11]`` of 100: rounds 5% of the run apart, starting at
    epoch 1. Here: start at epoch 1, ``gap = max(2, round(0.05 · epochs))`` (100 epochs:
    ``[1, 6, 11]``, the paper's E_list; 10 or 20 epochs: ``[1, 3, 5]``), the gap shrinking when the
    run is too short to hold the rounds (4 epochs, 3 rounds: ``[1, 2, 3]``).

    Raises:
      ValueError: fewer epochs than rounds.
    """
    if epochs < rounds:
        raise ValueError(
            f"guft.recompute_epochs: a {epochs}-epoch run cannot hold {rounds} rounds; give "
            "recompute_epochs explicitly or train longer"
        )
    gap = max(2, round(0.05 * epochs))
    if rounds > 1:
        gap = max(1, min(gap, (epochs - 1) // (rounds - 1)))
    return [1 + i * gap for i in range(rounds)]


_HEAD_STEP: dict = {}


def warm_head(ctx, dense_params, *, lr: float = 1e-2, epochs: int = 1):
    """A task head fitted on the frozen backbone (Adam, ``epochs`` passes over the training
    batches), for saliency only: a zero-initialised head gives the backbone exactly zero gradient,
    so a recompute before the head has trained would rank all-zero scores. The run's own head is
    not changed."""
    import optax

    tx = optax.adam(lr)
    key = (id(ctx.loss_fn), lr)
    if key not in _HEAD_STEP:

        def step(head, opt, params, x, y):
            def loss(h):
                return jnp.mean(ctx.loss_fn({"params": {**params, "head": h}}, x, y))

            u, opt = tx.update(jax.grad(loss)(head), opt)
            return optax.apply_updates(head, u), opt

        _HEAD_STEP[key] = jax.jit(step)
    step = _HEAD_STEP[key]
    head = dense_params["head"]
    opt = tx.init(head)
    for _ in range(epochs):
        for x, y in ctx.batches():
            head, opt = step(head, opt, dense_params, x, np.asarray(y, np.int32))
    return head


def _all_zero(tree) -> bool:
    # On the host: the head is small, and an eager op per leaf would compile one program each.
    return not any(np.any(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree)))


# ----------------------------------------------------------------------------- the two paths


def _linear_dims(key: str, shape: tuple) -> tuple[int, int]:
    """``(d_in, d_out)`` of the ``vit.Linear`` 2-D view of a kernel leaf."""
    parent = paths.path_of(key).split("/")[-2] if "/" in paths.path_of(key) else ""
    if len(shape) == 3 and parent == "out":
        return shape[0] * shape[1], shape[2]
    if len(shape) == 3 and parent in ("query", "key", "value"):
        return shape[0], shape[1] * shape[2]
    return math.prod(shape[:-1]), shape[-1]


def _is_kernel(key: str) -> bool:
    return paths.path_of(key).endswith("/kernel")


def _leaf(params, key):
    return paths.get(params, paths.path_of(key))


def _resize_host(tree: Any, sizes: dict[str, int], *, suffix: bool = False) -> Any:
    """:func:`guft_jax.optim.resize_leaves` done in numpy: zero-pads (or truncates) the 1-D
    leaves ``sizes`` names (by ``/``-joined path; ``suffix``: paths ending with one, as Adam's
    moments mirror the trainable tree) and leaves every other leaf untouched."""

    def fix(path, x):
        p = paths.key_to_str(path)
        hit = next(
            (n for q, n in sizes.items() if p == q or (suffix and p.endswith("/" + q))), None
        )
        if hit is None or getattr(x, "ndim", 0) != 1 or x.shape[0] == hit:
            return x
        out = np.zeros((hit,), x.dtype)
        n = min(hit, x.shape[0])
        out[:n] = np.asarray(x)[:n]
        return jax.device_put(out)

    return jax.tree_util.tree_map_with_path(fix, tree)


def _pad_host(arr, n: int, fill: int):
    """An int32 index vector at length ``n`` (built on the host): kept entries first, then
    ``fill``."""
    out = np.full((n,), fill, np.int32)
    m = min(n, arr.shape[0])
    out[:m] = np.asarray(arr)[:m]
    return jax.device_put(out)


def matrix_shape(key: str, shape) -> tuple[int, int]:
    """``(in, out)`` of the 2-D matrix a ViT kernel multiplies with (:func:`vit.kernel_as_matrix`),
    which is what the sparse path's flat indices are taken over."""
    path = paths.path_of(key)
    return tuple(jax.eval_shape(lambda k: vit.kernel_as_matrix(k, path), _spec(shape)).shape)


def _spec(shape):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


# Block capacities (sparse path), fixed at the first round: BLOCK_SLACK x its rows (columns) x
# sqrt(K / k₁), the growth the rest of the schedule allows (unique rows grow slower than entries),
# kept within ops.BLOCK_MAX_FRACTION of the matrix so the block SDDMM still pays. (A first-round
# slack of 2 without the schedule's growth was tried: two later rounds overflowed 41 and 26 of 72
# DINOv2-S/14 kernels.)
BLOCK_SLACK = 1.5


def block_capacity(
    need: tuple[int, int], dims: tuple[int, int], growth: float, floor: int = 16
) -> tuple[int, int]:
    """A kernel's block capacities ``(R, C)`` for the whole schedule, fixed at the first round.

    Args:
      need: the first round's unique rows and columns.
      dims: the matrix's ``(in, out)``.
      growth: ``K / k₁``, the budget over the first round's (1 for a single round).
      floor: the least capacity per axis (a kernel the first round leaves empty).

    Returns:
      ``min(dim, max(floor, ceil(BLOCK_SLACK · need · sqrt(growth))))`` per axis, scaled down toward
      ``need`` where ``R·C`` would exceed ``ops.BLOCK_MAX_FRACTION`` of the matrix.
    """
    caps = [
        min(d, max(n, floor, 1, math.ceil(BLOCK_SLACK * n * math.sqrt(growth))))
        for n, d in zip(need, dims, strict=True)
    ]
    limit = ops.BLOCK_MAX_FRACTION * dims[0] * dims[1]
    if caps[0] * caps[1] > limit:
        f = math.sqrt(limit / (caps[0] * caps[1]))
        caps = [max(n, math.floor(c * f)) for n, c in zip(need, caps, strict=True)]
    return caps[0], caps[1]


def _delta_matmul(x, w, idx, values, blk):
    """``x @ (w + δ)`` of one intercepted layer (:func:`guft_jax.ops.sparse_delta_matmul`). With a
    block that pays, the block SDDMM runs while the block holds every entry and the block-free one
    once a later round has outgrown it: a run-time switch, so the step keeps its one trace."""
    rows, cols = idx // w.shape[1], idx % w.shape[1]
    if blk is None or not ops.block_pays((blk["rows"], blk["cols"]), w):
        return ops.sparse_delta_matmul(x, w, rows, cols, values)
    block = (blk["rows"], blk["cols"])
    return jax.lax.cond(
        ops.block_covers(w.shape, rows, cols, *block),
        lambda a: ops.sparse_delta_matmul(*a, block=block),
        lambda a: ops.sparse_delta_matmul(*a),
        (x, w, rows, cols, values),
    )


@dataclasses.dataclass(frozen=True)
class DensePath:
    """The dense reference path: ``δ`` dense over eligible leaves, masks in the state."""

    eligible: dict  # {key: shape}

    def init_delta(self) -> dict:
        return {k: jnp.zeros(s, jnp.float32) for k, s in self.eligible.items()}

    def init_selected(self, delta) -> dict:
        return {k: jnp.zeros(s, bool) for k, s in self.eligible.items()}

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

    def update_mask(self, state):
        return {"head": True, "delta": state.selected}

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
class SparsePath:
    """The efficient path: per leaf fixed-capacity ``(indices, values)``."""

    eligible: dict
    floor: int = 16
    blocks: bool = True

    def init_delta(self) -> dict:
        return {k: jnp.zeros((self.floor,), jnp.float32) for k in self.eligible}

    def init_selected(self, delta) -> dict:
        return {
            k: jnp.full((delta[k].shape[0],), math.prod(s), jnp.int32)
            for k, s in self.eligible.items()
        }

    def effective(self, params, delta, state, *, dense=True) -> dict:
        """Params with the deltas folded in (``dense=False``: kernels are left to the
        interceptor)."""
        upd = {}
        for k, d in delta.items():
            if not dense and _is_kernel(k):
                continue
            w0 = _leaf(params, k)
            flat = w0.reshape(-1).at[state.selected[k]].add(d.astype(w0.dtype), mode="drop")
            upd[paths.path_of(k)] = flat.reshape(w0.shape)
        return paths.replaced(params, upd)

    @staticmethod
    def intercept(delta, state):
        """Replaces ``vit.Linear.matmul`` of every layer whose kernel has a delta."""
        blocks = getattr(state, "blocks", None) or {}
        table = {
            tuple(paths.path_of(k).split("/")[:-1]): (state.selected[k], d, blocks.get(k))
            for k, d in delta.items()
            if _is_kernel(k)
        }

        def icpt(next_fun, args, kwargs, context):
            hit = context.method_name == "matmul" and tuple(context.module.path) in table
            if not hit:
                return next_fun(*args, **kwargs)
            x, w = args
            idx, values, blk = table[tuple(context.module.path)]
            return _delta_matmul(x, w, idx, values.astype(w.dtype), blk)

        return icpt

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

    def update_mask(self, state):
        return None

    def adopt(self, trainable, opt_state, state, merged, capacities, log=print, growth=None):
        """Writes the merged mask's entries into the index vectors (old entries keep their slots
        and values), growing capacities where they overflow; ``growth`` (``K / k₁``, the first
        round only) sizes the blocks for the schedule. Host work in numpy: per-leaf eager
        ops would compile a small program for every distinct shape (hundreds a round)."""
        merged, sel, count = jax.device_get((merged, state.selected, state.count))
        caps = {k: int(v.shape[0]) for k, v in trainable["delta"].items()}
        plans = {}
        for k, s in self.eligible.items():
            old = np.asarray(sel[k])[: int(count[k])]
            fresh = np.setdiff1d(np.flatnonzero(np.asarray(merged[k]).reshape(-1)), old)
            plans[k] = (old, fresh, math.prod(s))
        new_caps = capacities(caps, {k: len(o) + len(f) for k, (o, f, _) in plans.items()})
        grown = [k for k in caps if new_caps[k] != caps[k]]
        if grown and int(state.round) > 0:
            log(f"guft: capacity grown for {len(grown)} tensors (one retrace): {grown[:4]}")
        trainable, opt_state, state = self.resize(trainable, opt_state, state, new_caps)
        idx, count = dict(state.selected), dict(state.count)
        blocks, outgrown = dict(state.blocks), []
        for k, (old, fresh, size) in plans.items():
            arr = np.full((new_caps[k],), size, np.int32)
            arr[: len(old)] = old
            arr[len(old) : len(old) + len(fresh)] = fresh
            idx[k] = jax.device_put(arr)
            count[k] = jax.device_put(np.int32(len(old) + len(fresh)))
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
        """The kernel's block (sorted unique rows and columns of ``idx``) and whether it holds
        them all. ``growth``: sized by :func:`block_capacity`; else the capacity stays (rows or
        columns past it are left out, and the step then skips the block)."""
        n_in, n_out = matrix_shape(key, self.eligible[key])
        ok = idx < n_in * n_out
        ur, uc = np.unique(idx[ok] // n_out), np.unique(idx[ok] % n_out)
        caps = (int(cur["rows"].shape[0]), int(cur["cols"].shape[0]))
        if growth is not None:
            caps = block_capacity((len(ur), len(uc)), (n_in, n_out), growth, self.floor)
        out = {}
        for f, u, cap, pad in (("rows", ur, caps[0], n_in), ("cols", uc, caps[1], n_out)):
            arr = np.full((cap,), pad, np.int32)
            arr[: min(cap, len(u))] = u[:cap]
            out[f] = jax.device_put(arr)
        return out, len(ur) <= caps[0] and len(uc) <= caps[1]

    def init_blocks(self) -> dict:
        """Empty blocks per kernel (every slot padding), of capacity ``min(dim, floor)`` like the
        entries' (a floor that holds every round never retraces). None with ``blocks=False``."""
        out = {}
        for k, s in (self.eligible if self.blocks else {}).items():
            if _is_kernel(k):
                n_in, n_out = matrix_shape(k, s)
                out[k] = {
                    "rows": jnp.full((min(n_in, self.floor),), n_in, jnp.int32),
                    "cols": jnp.full((min(n_out, self.floor),), n_out, jnp.int32),
                }
        return out

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
                    f: b[f] if b[f].shape[0] == n else _pad_host(b[f], n, int(np.max(b[f])))
                    for f, n in (("rows", r), ("cols", c))
                }
            state = state._replace(blocks=blocks)
        sizes = {f"delta/{k}": c for k, c in caps.items()}
        new_tr = _resize_host(trainable, sizes)
        new_opt = _resize_host(opt_state, sizes, suffix=True)
        idx = {
            k: v if v.shape[0] == caps[k] else _pad_host(v, caps[k], int(state.size[k]))
            for k, v in state.selected.items()
        }
        return new_tr, new_opt, state._replace(selected=idx)

    def indices(self, state, delta):
        out = {}
        for k in state.selected:
            n = int(state.count[k])
            out[k] = (np.asarray(state.selected[k])[:n], np.asarray(delta[k])[:n])
        return out


# ----------------------------------------------------------------------------- capacity


def capacity_rule(eligible: dict, total_budget: int, k1: int, *, slack: float, floor: int):
    """``capacities(current, needed, first) -> new`` for the sparse path (module docstring): at the
    first round ``min(size, max(c₁ + K − k₁, 1), max(floor, ⌈slack·c₁·K/k₁⌉,
    ⌈slack·K·size/N⌉))`` (at least one slot: orbax cannot save a zero-size array); later, a
    capacity that a round overflows grows to ``slack`` times its need (one retrace, logged)."""
    n_elig = sum(math.prod(s) for s in eligible.values())
    rest = max(total_budget - k1, 0)

    def capacities(current: dict, needed: dict, first: bool = False) -> dict:
        out = {}
        for k, s in eligible.items():
            size, need = math.prod(s), needed[k]
            if first:
                want = max(
                    floor,
                    math.ceil(slack * need * total_budget / max(k1, 1)),
                    math.ceil(slack * total_budget * size / n_elig),
                )
                # at least one slot: a zero-size array cannot be checkpointed (orbax refuses it)
                out[k] = max(need, min(size, max(need + rest, 1), want))
            elif need > current[k]:
                out[k] = min(size, max(need, math.ceil(slack * need)))
            else:
                out[k] = current[k]
        return out

    return capacities


# ----------------------------------------------------------------------------- recompute


_SALIENCY_ACC: dict = {}


def saliency_scores(ctx, theta_keys, dense_params, *, score, mode, chunk):
    """Saliency of the eligible leaves at ``dense_params`` over ``ctx.batches()``.

    One jitted accumulator per (loss, score, mode, chunk), kept across rounds, that takes the
    params as arguments: params closed over would be compiled in as constants, a fresh compile
    of the whole model every round."""
    theta = {k: _leaf(dense_params, k) for k in theta_keys}
    key = (id(ctx.loss_fn), score, mode, chunk)
    if key not in _SALIENCY_ACC:
        loss_fn = ctx.loss_fn

        def acc(g, th, base, x, y, w):
            def loss_per_example(t, xx, yy):
                p = paths.replaced(base, {paths.path_of(k): v for k, v in t.items()})
                return loss_fn({"params": p}, xx, yy)

            inner = sal.make_accumulator(loss_per_example, score=score, mode=mode, chunk=chunk)
            return inner(g, th, x, y, w)

        _SALIENCY_ACC[key] = jax.jit(acc, donate_argnums=(0,))
    acc = _SALIENCY_ACC[key]
    return sal.compute(
        None,
        theta,
        ctx.batches(),
        score=score,
        mode=mode,
        chunk=chunk,
        accumulator=lambda g, th, x, y, w: acc(g, th, dense_params, x, y, w),
    )


@functools.partial(jax.jit, static_argnames=("k", "exclude_selected"))
def _topk_merge_global(scores: dict, prev: dict, *, k: int, exclude_selected: bool):
    """``select(..., allocation="global", normalize=None)`` as one program, and whether any
    score is nonzero.

    The same entries as :func:`guft_jax.masks.topk_mask` (its order keys; ties to the lower flat
    position, as ``lax.top_k``) without its ``top_k`` over every entry, which takes 15-25 s for
    k = 21,275 of 21M on 2 CPU cores: the k-th largest key is found bit by bit (32 counting
    passes), then the entries above it and the first ``k - #above`` equal to it are chosen."""
    keys = sorted(scores)
    parts = [
        jnp.ravel(masks_lib.order_key(scores[key], prev[key] if exclude_selected else None))
        for key in keys
    ]
    # int32 -> uint32 with the same order (sign bit flipped), so the bisection is unsigned.
    u = jax.lax.bitcast_convert_type(jnp.concatenate(parts), jnp.uint32) ^ jnp.uint32(1 << 31)

    def bit(i, t):
        cand = t | jax.lax.shift_left(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(u >= cand, dtype=jnp.int32) >= k, cand, t)

    t = jax.lax.fori_loop(0, 32, bit, jnp.uint32(0))
    above = u > t
    ties = u == t
    need = k - jnp.sum(above, dtype=jnp.int32)
    chosen = above | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= need))
    if k == 0:
        chosen = jnp.zeros_like(above)
    out, off = {}, 0
    for key in keys:
        size = math.prod(np.shape(scores[key]))
        new = chosen[off : off + size].reshape(np.shape(scores[key]))
        out[key] = jnp.logical_or(prev[key], new)
        off += size
    nonzero = jnp.any(jnp.stack([jnp.any(v != 0) for v in scores.values()]))
    return out, nonzero


def select(
    scores: dict,
    prev: dict,
    k: int,
    *,
    exclude_selected: bool,
    allocation: str,
    normalize,
    quotas: dict | None = None,
    row_dims: dict | None = None,
) -> dict:
    """The new top-k mask OR-merged into ``prev`` (``quotas``/``row_dims``: see
    :func:`guft_jax.masks.topk_mask`)."""
    kw = {} if allocation == "global" and normalize is None else dict(allocation=allocation)
    if normalize is not None:
        kw["normalize"] = normalize
    if quotas is not None:
        kw.update(quotas=quotas, row_dims=row_dims)
    new = masks_lib.topk_mask(scores, k, exclude=prev if exclude_selected else None, **kw)
    return masks_lib.merge_masks(prev, new)


def _record(state: GuftState, i, epoch, k, selected, batch_size) -> dict:
    h = dict(state.history)
    for name, v in (("epoch", epoch), ("k", k), ("selected", selected), ("batch_size", batch_size)):
        arr = np.array(h[name])
        arr[i] = v
        h[name] = jax.device_put(arr)
    return h


# ----------------------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class GuftConfig:
    """GUFT's hyperparameters (validated by :func:`guft`); the method's functions take it."""

    recompute_epochs: tuple[int, ...] | None
    ratios: tuple[float, ...]
    mode: str
    score: str
    exclude_selected: bool
    eligible: str
    allocation: str
    normalize: str | None
    include: tuple[str, ...] | None
    exclude: tuple[str, ...] | None
    sparse: bool
    capacity_slack: float
    capacity_floor: int
    blocks: bool
    chunk: int
    head_warmup: bool
    name: str
    # One-shot methods with explicit per-tensor budgets (SHiRA, GPS; :func:`quota_oneshot`):
    # ("rank", r): r·(d_in + d_out) entries per tensor; ("row", K): K per output unit. None: the
    # ratios' budget. ``layout``: the (regex, n_in) rules of the tensors' (in, out) views there.
    quota: tuple[str, int] | None = None
    layout: tuple[tuple[str, int], ...] = ()
    seed: int = 0  # score "random": the permutation's seed

    def eligible_of(self, params) -> dict:
        return masks_lib.eligible_leaves(params, self.include, self.exclude, preset=self.eligible)

    def path(self, params):
        e = self.eligible_of(params)
        return SparsePath(e, self.capacity_floor, self.blocks) if self.sparse else DensePath(e)

    def schedule(self, epochs: int) -> list[int]:
        return list(self.recompute_epochs or auto_schedule(epochs, len(self.ratios)))

    def hparams(self) -> dict:
        out = dataclasses.asdict(self)
        for k in ("name", "quota", "layout", "seed"):  # quota methods state their own hparams
            del out[k]
        for k in ("recompute_epochs", "ratios", "include", "exclude"):
            out[k] = list(out[k]) if out[k] is not None else None
        return out


def _init(cfg: GuftConfig, rng, params):
    del rng
    return {"head": params["head"], "delta": cfg.path(params).init_delta()}


def _init_state(cfg: GuftConfig, params, trainable) -> GuftState:
    n = len(cfg.ratios)
    hist = {f: jnp.zeros((n,), jnp.int32) for f in ("epoch", "k", "selected", "batch_size")}
    sel = cfg.path(params).init_selected(trainable["delta"])
    count = {k: jnp.zeros((), jnp.int32) for k in sel}
    size = {k: jnp.asarray(math.prod(s), jnp.int32) for k, s in cfg.eligible_of(params).items()}
    path = cfg.path(params)
    blocks = path.init_blocks() if cfg.sparse else {}
    return GuftState(sel, count, jnp.zeros((), jnp.int32), hist, size, blocks)


def _apply(cfg: GuftConfig, params, trainable, state=None, rng=None):
    out = cfg.path(params).effective(params, trainable["delta"], state, dense=False)
    return {"params": {**out, "head": trainable["head"]}}


def _merge(cfg: GuftConfig, params, trainable, state=None):
    if state is None:
        raise ValueError(f"{cfg.name}.merge: needs the method state (the selected indices)")
    out = cfg.path(params).effective(params, trainable["delta"], state, dense=True)
    return {**out, "head": trainable["head"]}


def _epoch_start(cfg: GuftConfig, epoch: int, ctx):
    rounds = cfg.schedule(ctx.epochs or max(cfg.recompute_epochs or [0]))
    if epoch not in rounds:
        return ctx.trainable, ctx.opt_state, ctx.state
    return _recompute(cfg, rounds.index(epoch), epoch, ctx)


@functools.partial(jax.jit, static_argnums=(0,))
def _merged_leaves(cfg: GuftConfig, params, trainable, state) -> dict:
    """The eligible leaves of :func:`_merge`, as one program (not an eager scatter per leaf)."""
    out = _merge(cfg, params, trainable, state)
    return {k: _leaf(out, k) for k in trainable["delta"]}


def random_scores(seed: int, eligible: dict) -> dict:
    """Score ``"random"``: per tensor (``i``-th in sorted-key order) a random permutation
    ``π = jax.random.permutation(fold_in(key(seed), i), size)`` as scores ``size − j`` at
    ``π[j]``, so a top-``n`` selection is ``π[:n]``, a uniform random subset as PEFT's
    SHiRA ``random_mask`` (``randperm(numel)[:n]``). float32 ranks: exact up to 2**24 entries."""
    out = {}
    for i, key in enumerate(sorted(eligible)):
        shape = eligible[key]
        n = math.prod(shape)
        perm = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), i), n)
        ranks = jnp.zeros((n,), jnp.float32).at[perm].set(n - jnp.arange(n, dtype=jnp.float32))
        out[key] = ranks.reshape(shape)
    return out


def _quotas(cfg: GuftConfig, eligible: dict):
    """``({key: k_t}, {key: (d_in, d_out)})`` of a quota method (``(None, None)`` otherwise).

    Raises:
      ValueError: a budget larger than a tensor (``r·(d_in + d_out) > d_in·d_out``, as PEFT's
        SHiRA) or ``K > d_in``.
    """
    if cfg.quota is None:
        return None, None
    from guft_jax.methods.weight_space import matrix_shape  # (methods import this module)

    rule, n = cfg.quota
    views = {k: matrix_shape(paths.path_of(k), s, cfg.layout) for k, s in eligible.items()}
    quotas = {}
    for k, (d_in, d_out) in views.items():
        quotas[k] = n * (d_in + d_out) if rule == "rank" else n * d_out
        if (rule == "rank" and quotas[k] > d_in * d_out) or (rule == "row" and n > d_in):
            field = "r" if rule == "rank" else "k"
            raise ValueError(
                f"{cfg.name}.{field}: {n} selects more than {paths.path_of(k)} "
                f"(d_in, d_out) = {(d_in, d_out)} holds"
            )
    return quotas, views


def _saliency_at(cfg: GuftConfig, epoch: int, ctx, eligible: dict):
    """Scores at the current weights (through a fitted head if the head is still all zero)."""
    if cfg.score == "random":
        return random_scores(cfg.seed, eligible), {}
    leaves = _merged_leaves(cfg, ctx.params, ctx.trainable, ctx.state)
    dense = paths.replaced(ctx.params, {paths.path_of(k): v for k, v in leaves.items()})
    dense["head"] = ctx.trainable["head"]
    if cfg.head_warmup and cfg.score != "magnitude" and _all_zero(dense["head"]):
        dense = {**dense, "head": warm_head(ctx, dense)}
        ctx.log(f"{cfg.name}: all-zero head at epoch {epoch}; saliency through a fitted head")
    return saliency_scores(ctx, eligible, dense, score=cfg.score, mode=cfg.mode, chunk=cfg.chunk)


def _check_nonzero(cfg: GuftConfig, epoch: int, nonzero) -> None:
    if not bool(nonzero):
        raise ValueError(
            f"{cfg.name}: all saliency scores are zero at epoch {epoch} (a zero-initialised head "
            "gives the backbone no gradient before it has trained); use head_warmup=True or "
            "recompute after at least one epoch"
        )


def _recompute(cfg: GuftConfig, i: int, epoch: int, ctx):
    path, state = cfg.path(ctx.params), ctx.state
    e = path.eligible
    n_elig = sum(math.prod(s) for s in e.values())
    quotas, views = _quotas(cfg, e)
    k = sum(quotas.values()) if quotas else masks_lib.budget(cfg.ratios[i], n_elig)
    scores, info = _saliency_at(cfg, epoch, ctx, e)
    prev = path.mask(state)
    if quotas is None and cfg.allocation == "global" and cfg.normalize is None:
        merged, nonzero = _topk_merge_global(
            scores, prev, k=k, exclude_selected=cfg.exclude_selected
        )
        _check_nonzero(cfg, epoch, nonzero)
    else:
        _check_nonzero(cfg, epoch, _any_nonzero(scores))
        merged = select(
            scores,
            prev,
            k,
            exclude_selected=cfg.exclude_selected,
            allocation=cfg.allocation,
            normalize=cfg.normalize,
            quotas=quotas,
            row_dims=views,
        )
    rep = masks_lib.mask_report(merged, top=5)
    share = f"{k / n_elig:.4g}" if quotas else f"{cfg.ratios[i]:g}"
    ctx.log(
        f"{cfg.name} recompute at epoch {epoch}: k={k:,} ({share} of {n_elig:,}), "
        f"{cfg.score}/{cfg.mode} saliency over {info.get('num_examples', 0)} examples "
        f"(batch {info.get('batch_size', 0)}); selected {rep['selected']:,} "
        f"= {100 * rep['density']:.4f}%; per module type {rep['per_module_type']}"
    )
    total = k if quotas else sum(masks_lib.budget(r, n_elig) for r in cfg.ratios)
    rule = capacity_rule(e, total, k, slack=cfg.capacity_slack, floor=cfg.capacity_floor)
    first = int(state.round) == 0
    caps = lambda cur, need: rule(cur, need, first=first)
    if quotas:  # one round whose per-tensor counts are known: capacity = count (no spare slots)
        caps = lambda cur, need: {key: max(need[key], 1) for key in cur}
    growth = total / max(k, 1) if first else None
    tr, opt, st = path.adopt(ctx.trainable, ctx.opt_state, state, merged, caps, ctx.log, growth)
    hist = _record(st, i, epoch, k, rep["selected"], info.get("batch_size", 0))
    return tr, opt, st._replace(round=state.round + 1, history=hist)


def _resize(cfg: GuftConfig, trainable, opt_state, state, structure: dict):
    """Adopts the capacities recorded in a checkpoint's structure (sparse path)."""
    caps, block_caps = {}, {}
    for k, v in trainable["delta"].items():
        shape = structure.get(f"trainable/delta/{k}")
        caps[k] = int(shape[0][0]) if shape is not None else int(v.shape[0])
    for k, b in state.blocks.items():
        got = [
            next((v[0][0] for p, v in structure.items() if p.endswith(f"blocks/{k}/{f}")), None)
            for f in ("rows", "cols")
        ]
        block_caps[k] = tuple(
            int(g) if g is not None else int(b[f].shape[0])
            for g, f in zip(got, ("rows", "cols"), strict=True)
        )
    return SparsePath({}, cfg.capacity_floor).resize(trainable, opt_state, state, caps, block_caps)


def _trained(params, trainable, state):
    return {paths.path_of(k): int(v) for k, v in state.count.items()}


def _method(cfg: GuftConfig) -> Method:
    f = functools.partial
    hooks = MethodHooks(
        init_state=f(_init_state, cfg),
        epoch_start=f(_epoch_start, cfg),
        update_mask=None if cfg.sparse else (lambda st: {"head": True, "delta": st.selected}),
        resize=f(_resize, cfg) if cfg.sparse else None,
        intercept=(lambda tr, st, rng=None: SparsePath.intercept(tr["delta"], st))
        if cfg.sparse
        else None,
        trained=_trained,
        export=lambda params, tr, st: export_arrays(cfg.path(params), params, tr, st),
        load=apply_arrays,
    )
    return Method(
        name=cfg.name,
        init=f(_init, cfg),
        apply=f(_apply, cfg),
        hparams=cfg.hparams(),
        merge=f(_merge, cfg),
        hooks=hooks,
    )


@register(
    "guft",
    info=Info(
        "sparse",
        "`W0 + δ` on a mask grown in rounds: top-k of `Σ|∇W L|` over the training set",
        "Jeong, Cha and Kim, Kookmin University",
    ),
    defaults=Defaults(
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(ratios=[0.001] * 3),
        lr_grid=(0.1, 0.3, 1.0, 3.0, 10.0),
        dry_kwargs=dict(recompute_epochs=[1], ratios=[0.01]),
        step_cost=0.9,
    ),
)
def guft(
    *,
    recompute_epochs: Sequence[int] | None = None,
    ratios: Sequence[float] = (0.001, 0.001, 0.001),
    mode: str = "batch",
    score: str = "guft",
    exclude_selected: bool = False,
    eligible: str = "blocks",
    allocation: str = "global",
    normalize: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sparse: bool = True,
    capacity_slack: float = 2.0,
    capacity_floor: int = 16,
    blocks: bool = True,
    chunk: int = 8,
    head_warmup: bool = True,
    name: str = "guft",
) -> Method:
    """GUFT as a :class:`~guft_jax.methods.base.Method` (module docstring for the defaults).

    Args:
      recompute_epochs: 1-indexed epochs at whose start the mask is recomputed; None: the
        :func:`auto_schedule` of the run's length (one round per ratio).
      ratios: fraction of eligible entries chosen at each recompute.
      mode: ``"batch"`` or ``"example"`` saliency (see :mod:`guft_jax.saliency`).
      score: ``"guft"`` (Σ|g|) or a one-shot score (``salun``, ``fisher``, ``snip``,
        ``magnitude``).
      exclude_selected: rank only entries not selected yet (budget grows by exactly k).
      eligible: ``"blocks"`` (default) or ``"all"`` (the paper's literal rule).
      allocation: ``"global"`` (the paper: one ranking), ``"per_tensor"`` or ``"per_row"``.
      normalize: None or ``"mean"``: per-tensor score normalisation before a global ranking.
      include, exclude: regexes over ``/``-joined param paths, applied on top of ``eligible``.
      sparse: the efficient sparse path (default) or the dense reference path.
      capacity_slack, capacity_floor: sparse capacities, sized for the whole schedule at the
        first round (module docstring).
      blocks: sparse path: keep each kernel's row × column block of the selection and take its
        weight gradient there where the block is small (faster on clustered, saliency-chosen
        entries; sized at the first round, a kernel whose later rounds outgrow it skips it
        without a retrace). ``False``: the backend's SDDMM everywhere.
      chunk: examples per ``vmap`` chunk in ``example`` mode.
      head_warmup: take saliency through a fitted head when the head is still all zero.

    Raises:
      ValueError: a malformed schedule or an unknown option (naming the field).

    >>> method = guft(recompute_epochs=[1, 6, 11], ratios=[0.001] * 3)
    """
    ratios = tuple(float(r) for r in ratios)
    if recompute_epochs is not None:
        recompute_epochs = tuple(int(e) for e in recompute_epochs)
        validate_schedule(recompute_epochs, ratios)
    else:
        _validate_ratios(ratios)
    for field, v, allowed in (
        ("mode", mode, sal.MODES),
        ("score", score, sal.SCORES),
        ("eligible", eligible, ELIGIBLE),
        ("allocation", allocation, ALLOCATIONS),
        ("normalize", normalize, (None, "mean")),
    ):
        if v not in allowed:
            raise ValueError(f"guft.{field}: {v!r} not in {list(allowed)}")
    if capacity_slack < 1:
        raise ValueError(f"guft.capacity_slack: must be >= 1, got {capacity_slack}")
    cfg = GuftConfig(
        recompute_epochs=recompute_epochs,
        ratios=ratios,
        mode=mode,
        score=score,
        exclude_selected=exclude_selected,
        eligible=eligible,
        allocation=allocation,
        normalize=normalize,
        include=tuple(include) if include else None,
        exclude=tuple(exclude) if exclude else None,
        sparse=sparse,
        capacity_slack=float(capacity_slack),
        capacity_floor=int(capacity_floor),
        blocks=bool(blocks),
        chunk=int(chunk),
        head_warmup=head_warmup,
        name=name,
    )
    return _method(cfg)


ONESHOT_SCORES = ("magnitude", "snip", "salun", "fisher")


def _oneshot_defaults(score: str) -> Defaults:
    epoch = 1
    return Defaults(
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(ratio=0.003, epoch=epoch),
        lr_grid=(0.1, 0.3, 1.0, 3.0, 10.0),
        vtab_kwargs=dict(ratio=0.0034, epoch=epoch),
        dry_kwargs=dict(epoch=1, ratio=0.01),
        step_cost=0.9,
    )


def oneshot(
    *,
    score: str,
    ratio: float = 0.0034,
    epoch: int = 1,
    mode: str = "batch",
    eligible: str = "blocks",
    allocation: str = "global",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sparse: bool = True,
) -> Method:
    """A one-shot saliency mask (``magnitude``, ``snip``, ``salun``, ``fisher``): GUFT's machinery
    with a single recompute at the start of ``epoch`` (docs: sparse methods). Default ratio:
    GUFT's final ~0.34%; gradient scores at epoch 1 go through a fitted head (``head_warmup``)."""
    if score not in ONESHOT_SCORES:
        raise ValueError(f"score: {score!r} not in {list(ONESHOT_SCORES)}")
    m = guft(
        recompute_epochs=[epoch],
        ratios=[ratio],
        mode=mode,
        score=score,
        eligible=eligible,
        allocation=allocation,
        include=include,
        exclude=exclude,
        sparse=sparse,
        capacity_slack=1.0,
        name=score,
    )
    hp = dict(ratio=ratio, epoch=epoch, mode=mode, eligible=eligible, allocation=allocation)
    hp.update(include=list(include) if include else None, sparse=sparse)
    hp.update(exclude=list(exclude) if exclude else None)
    return m._replace(hparams=hp)


ONESHOT_INFO = {
    "magnitude": Info("sparse", "`W0 + δ` on the top-k of `|W0|`, chosen once", "1506.02626"),
    "snip": Info("sparse", "`W0 + δ` on the top-k of `|∇W L ⊙ W0|`, chosen once", "1810.02340"),
    "salun": Info("sparse", "`W0 + δ` on the top-k of `|Σ_b ∇W L_b|`, chosen once", "2310.12508"),
    "fisher": Info("sparse", "`W0 + δ` on the top-k of `Σ_b (∇W L_b)²`, chosen once", "2111.09839"),
}
for _score in ONESHOT_SCORES:
    register(
        _score,
        defaults=_oneshot_defaults(_score),
        fixed={"score": _score},
        info=ONESHOT_INFO[_score],
    )(oneshot)


QUOTA_RULES = ("rank", "row")


def quota_oneshot(
    *,
    name: str,
    quota: tuple[str, int],
    score: str,
    targets: Sequence[str],
    layout: Sequence[tuple[str, int]],
    allocation: str,
    hparams: dict,
    seed: int = 0,
    epoch: int = 1,
    mode: str = "batch",
    sparse: bool = True,
) -> Method:
    """A one-shot sparse method with explicit per-tensor budgets (SHiRA, GPS): GUFT's machinery
    (saliency, sparse store, artifacts) with one selection at the start of ``epoch`` over the
    kernels that ``targets`` match, exactly ``quota``'s entries per tensor (:func:`_quotas`),
    chosen by ``allocation`` (``"per_tensor"``: the tensor's top ``k_t``; ``"per_row"``: the top
    ``K`` of every output unit). Trained counts are that closed form from the shapes.

    Raises:
      ValueError: an unknown ``score``, ``mode``, ``allocation`` or quota rule, a budget below 1,
        or a bad ``epoch`` (naming the field).
    """
    rule, n = quota
    for field, v, allowed in (
        ("score", score, (*sal.SCORES, "random")),
        ("mode", mode, sal.MODES),
        ("allocation", allocation, ("per_tensor", "per_row")),
        ("quota", rule, QUOTA_RULES),
    ):
        if v not in allowed:
            raise ValueError(f"{name}.{field}: {v!r} not in {list(allowed)}")
    if int(n) < 1:
        raise ValueError(f"{name}.{'r' if rule == 'rank' else 'k'}: must be >= 1, got {n}")
    validate_schedule((int(epoch),), (1.0,))
    cfg = GuftConfig(
        recompute_epochs=(int(epoch),),
        ratios=(1.0,),  # (unused: the quotas set the budget)
        mode=mode,
        score=score,
        exclude_selected=False,
        eligible="all",
        allocation=allocation,
        normalize=None,
        include=tuple(targets),
        exclude=None,
        sparse=sparse,
        capacity_slack=1.0,
        capacity_floor=16,
        blocks=True,
        chunk=8,
        head_warmup=True,
        name=name,
        quota=(rule, int(n)),
        layout=tuple((str(rx), int(d)) for rx, d in layout),
        seed=int(seed),
    )

    def trained(params, trainable=None, state=None):
        quotas, _ = _quotas(cfg, cfg.eligible_of(params))
        return {paths.path_of(k): q for k, q in quotas.items()}

    m = _method(cfg)
    return m._replace(hparams=hparams, hooks=m.hooks._replace(trained=trained))


@jax.jit
def _any_nonzero(tree: dict) -> jax.Array:
    return jnp.any(jnp.stack([jnp.any(v != 0) for v in tree.values()]))


# ----------------------------------------------------------------------------- what a run selected


def selected_counts(state: GuftState) -> dict[str, int]:
    """Per-tensor selected counts, keyed by ``/``-joined param path."""
    return {paths.path_of(k): int(v) for k, v in state.count.items()}


def selected_indices(state: GuftState) -> dict[str, np.ndarray]:
    """``{param path: sorted flat indices}`` of the selected entries (either path)."""
    out = {}
    for k, sel in state.selected.items():
        sel = np.asarray(sel)
        if sel.dtype == bool:
            idx = np.flatnonzero(sel.reshape(-1))
        else:
            idx = np.sort(sel[: int(state.count[k])])
        out[paths.path_of(k)] = idx.astype(np.int32)
    return out


def selection(state: GuftState, params: Any) -> dict:
    """The selected entries as a nested boolean pytree over the eligible leaves (True = trained),
    shaped like those leaves of ``params``."""
    out: dict = {}
    for path, idx in selected_indices(state).items():
        shape = paths.get(params, path).shape
        m = np.zeros(math.prod(shape), bool)
        m[idx] = True
        paths.set(out, path, m.reshape(shape))
    return out


def export_arrays(path, params, trainable, state) -> dict[str, np.ndarray]:
    """The artifact payload: ``guft/{param path}/indices`` and ``/values`` per tensor with
    selected entries, and ``head/...``."""
    out = {
        f"head/{paths.key_to_str(p)}": np.ascontiguousarray(np.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(trainable["head"])[0]
    }
    for k, (idx, vals) in path.indices(state, trainable["delta"]).items():
        if len(idx):
            out[f"guft/{paths.path_of(k)}/indices"] = idx.astype(np.int32)
            out[f"guft/{paths.path_of(k)}/values"] = vals.astype(np.float32)
    return out


def apply_arrays(params: Any, arrays: dict) -> Any:
    """Plain ViT params: ``W0.ravel().at[indices].add(values)`` per tensor, and the head.

    Raises:
      ValueError: a tensor path that ``params`` lacks, or indices without values.
    """
    tensors: dict = {}
    for name, v in arrays.items():
        if name.startswith("guft/"):
            path, what = name[len("guft/") :].rsplit("/", 1)
            tensors.setdefault(path, {})[what] = v
    upd = {}
    for path, t in tensors.items():
        if set(t) != {"indices", "values"}:
            raise ValueError(f"guft artifact: {path} needs indices and values, has {sorted(t)}")
        try:
            w0 = paths.get(params, path)
        except KeyError:
            raise ValueError(f"guft artifact: {path} is not a parameter of the base") from None
        new = w0.reshape(-1).at[jnp.asarray(t["indices"])].add(jnp.asarray(t["values"]))
        upd[path] = new.reshape(w0.shape)
    head = {k[len("head/") :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("head/")}
    out = paths.replaced(params, upd)
    out["head"] = paths.unflatten(head, params["head"])
    return out
