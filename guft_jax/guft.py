"""GUFT — Gradual Unfreeze Fine-Tuning (seed paper 000, SPEC.md §1), and one-shot saliency masks.

At the start of each epoch in ``recompute_epochs`` (1-indexed) a saliency pass sums ``|∇L|`` over
the training set at the current weights (:mod:`guft_jax.saliency`), the global top
``k = round(ratio · N_eligible)`` entries become a new mask (:func:`guft_jax.masks.topk_mask`)
and it is OR-merged into the mask so far. Only masked entries (and the head) train.

Both paths parametrise the backbone as ``W = W0 + δ`` and train ``δ`` (so AdamW's decoupled
weight decay pulls toward the pretrained weights, and the two paths follow the same trajectory):

- ``sparse=False`` — the dense reference path: ``δ`` is a dense tree of eligible leaves, an
  element-level mask (in the method state) is handed to the optimizer by
  ``MethodHooks.update_mask``; entries outside it stay exactly 0, so the effective weights stay
  bitwise equal to ``W0`` there. Its memory is that of full fine-tuning.
- ``sparse=True`` (default) — the efficient path: per eligible leaf a fixed-capacity vector of
  flat indices (in the state) and values ``δ`` (trainable), padded with an out-of-range index.
  Linear kernels go through ``vit.Linear``'s ``"sparse_delta"`` collection, whose custom VJP
  computes the weight gradient only at the selected entries; other leaves use
  ``W0.ravel().at[idx].add(δ)``. The optimizer state is proportional to the capacity.

Capacity (sparse path). The final budget ``K = Σ k_i`` is known up front but not its split over
tensors, and a global top-k concentrates in some tensors. Capacities are fixed at the first
recompute (before any step is compiled when ``recompute_epochs[0] == 1``): each tensor gets
``min(size, max(floor, ceil(slack · c₁ · K / k₁), ceil(slack · K · size / N)))`` where ``c₁``
is its count in the first round (extrapolated to the final budget) and the last term is its
proportional share (early rounds often favour LayerNorms and later ones kernels). A later
round that fits never changes a shape (no retrace); one that overflows a tensor
grows that tensor's capacity (values and Adam moments zero-padded), which retraces once and is
logged. Resuming a run restores these capacities (``MethodHooks.resize``).

Padding slots and not-yet-used slots hold ``δ = 0`` with zero gradient and zero moments, so a
newly selected entry starts with zero Adam moments (Adam's bias correction uses the global step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import masks as masks_lib
from guft_jax import paths
from guft_jax import saliency as sal
from guft_jax.methods.base import Method, MethodHooks, default_labels
from guft_jax.vit import SPARSE_COLLECTION

SEP = masks_lib.SEP


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
    if any(not 0 < x <= 1 for x in r):
        raise ValueError(f"guft.ratios: each must be in (0, 1], got {r}")
    if sum(r) > 1 + 1e-12:
        raise ValueError(f"guft.ratios: total must be <= 1, got {sum(r)}")


def _leaf(params, key):
    return paths.get(params, masks_lib.key_path(key))


def _is_linear_kernel(key: str, shape: tuple) -> bool:
    return key.endswith(SEP + "kernel") or key == "kernel"


def _linear_dims(key: str, shape: tuple) -> tuple[int, int]:
    """``(d_in, d_out)`` of the ``vit.Linear`` 2-D view of a kernel leaf."""
    parent = key.split(SEP)[-2] if SEP in key else ""
    if len(shape) == 3 and parent == "out":
        return shape[0] * shape[1], shape[2]
    if len(shape) == 3 and parent in ("query", "key", "value"):
        return shape[0], shape[1] * shape[2]
    return math.prod(shape[:-1]), shape[-1]


def guft(
    *,
    recompute_epochs: Sequence[int] = (1, 6, 11),
    ratios: Sequence[float] = (0.001, 0.001, 0.001),
    mode: str = "batch",
    score: str = "guft",
    exclude_selected: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sparse: bool = True,
    capacity_slack: float = 2.0,
    capacity_floor: int = 16,
    chunk: int = 8,
    name: str = "guft",
) -> Method:
    """GUFT as a :class:`~guft_jax.methods.base.Method` (paper setting: ``[1, 6, 11]``, 0.1% each).

    Args:
      recompute_epochs: 1-indexed epochs at whose start the mask is recomputed.
      ratios: fraction of eligible entries chosen at each recompute.
      mode: ``"batch"`` or ``"example"`` saliency (see :mod:`guft_jax.saliency`).
      score: ``"guft"`` (Σ|g|) or a one-shot score (``salun``, ``fisher``, ``snip``,
        ``magnitude``).
      exclude_selected: rank only entries not selected yet (budget grows by exactly k).
      include, exclude: regexes over ``/``-joined param paths choosing eligible leaves.
      sparse: the efficient sparse path (default) or the dense reference path.
      capacity_slack, capacity_floor: sparse capacities (module docstring).
      chunk: examples per ``vmap`` chunk in ``example`` mode.

    >>> method = guft(recompute_epochs=[1, 6, 11], ratios=[0.001] * 3)
    """
    recompute_epochs = [int(e) for e in recompute_epochs]
    ratios = [float(r) for r in ratios]
    validate_schedule(recompute_epochs, ratios)
    if mode not in sal.MODES:
        raise ValueError(f"guft.mode: {mode!r} not in {list(sal.MODES)}")
    if score not in sal.SCORES:
        raise ValueError(f"guft.score: {score!r} not in {list(sal.SCORES)}")
    if capacity_slack < 1:
        raise ValueError(f"guft.capacity_slack: must be >= 1, got {capacity_slack}")
    n_rounds = len(ratios)
    cache: dict = {}

    def elig(params):
        if "eligible" not in cache:
            cache["eligible"] = masks_lib.eligible_leaves(params, include, exclude)
        return cache["eligible"]

    # ---------------------------------------------------------------- trees
    def init(rng, params):
        del rng
        e = elig(params)
        if sparse:
            delta = {k: jnp.zeros((capacity_floor,), jnp.float32) for k in e}
        else:
            delta = {k: jnp.zeros(s, jnp.float32) for k, s in e.items()}
        return {"head": params["head"], "delta": delta}

    def init_state(params, trainable):
        e = elig(params)
        hist = {
            "epoch": jnp.zeros((n_rounds,), jnp.int32),
            "k": jnp.zeros((n_rounds,), jnp.int32),
            "selected": jnp.zeros((n_rounds,), jnp.int32),
            "batch_size": jnp.zeros((n_rounds,), jnp.int32),
        }
        if sparse:
            idx = {
                k: jnp.full((trainable["delta"][k].shape[0],), math.prod(s), jnp.int32)
                for k, s in e.items()
            }
            count = {k: jnp.zeros((), jnp.int32) for k in e}
            return {"idx": idx, "count": count, "round": jnp.zeros((), jnp.int32), "history": hist}
        mask = {k: jnp.zeros(s, bool) for k, s in e.items()}
        return {"mask": mask, "round": jnp.zeros((), jnp.int32), "history": hist}

    def effective(params, trainable, state, *, dense: bool):
        """``(params', sparse_collection)``; ``dense=True`` folds every delta into params."""
        out = paths.merge(params, {})
        coll: dict = {}
        for k, d in trainable["delta"].items():
            w0 = _leaf(params, k)
            if not sparse:
                new = jnp.where(state["mask"][k], w0 + d.astype(w0.dtype), w0)
                paths._set(out, masks_lib.key_path(k).split("/"), new)
                continue
            idx = state["idx"][k]
            if not dense and _is_linear_kernel(k, w0.shape):
                d_in, d_out = _linear_dims(k, w0.shape)
                mod = masks_lib.key_path(k).split("/")[:-1]
                paths._set(
                    coll,
                    mod + ["kernel"],
                    {"rows": idx // d_out, "cols": idx % d_out, "values": d},
                )
            else:
                flat = w0.reshape(-1).at[idx].add(d.astype(w0.dtype), mode="drop")
                paths._set(out, masks_lib.key_path(k).split("/"), flat.reshape(w0.shape))
        out["head"] = trainable["head"]
        return out, coll

    def apply(params, trainable, state=None):
        out, coll = effective(params, trainable, state, dense=False)
        return {"params": out, SPARSE_COLLECTION: coll} if coll else {"params": out}

    def merge(params, trainable, state=None):
        if state is None:
            raise ValueError("guft.merge: needs the method state (the selected indices)")
        return effective(params, trainable, state, dense=True)[0]

    def update_mask(state):
        if sparse:
            return None
        return {"head": True, "delta": state["mask"]}

    # ---------------------------------------------------------------- recompute
    def current_mask(state, e):
        if not sparse:
            return state["mask"]
        out = {}
        for k, s in e.items():
            size = math.prod(s)
            out[k] = jnp.zeros((size,), bool).at[state["idx"][k]].set(True, mode="drop").reshape(s)
        return out

    # Recomputes run a few compiled programs, not one eager op (and compile) per tensor.
    dense_j = jax.jit(lambda p, t, st: effective(p, t, st, dense=True)[0])
    current_mask_j = jax.jit(lambda st: current_mask(st, elig_shapes()))

    def epoch_start(epoch, ctx):
        if epoch not in recompute_epochs:
            return ctx.trainable, ctx.opt_state, ctx.state
        i = recompute_epochs.index(epoch)
        params, state = ctx.params, ctx.state
        e = elig(params)
        n_elig = sum(math.prod(s) for s in e.values())
        k = masks_lib.budget(ratios[i], n_elig)
        dense_params = dense_j(params, ctx.trainable, state)
        theta = {key: _leaf(dense_params, key) for key in e}

        def loss_per_example(th, x, y):
            p = paths.merge(dense_params, {})
            for key, v in th.items():
                paths._set(p, masks_lib.key_path(key).split("/"), v)
            return ctx.loss_fn({"params": p}, x, y)

        scores, info = sal.compute(
            loss_per_example, theta, ctx.batches(), score=score, mode=mode, chunk=chunk
        )
        if not bool(_any_nonzero(scores)):
            ctx.log(
                f"{name} WARNING: all saliency scores are zero at epoch {epoch} (a zero-initialised"
                " head gives the backbone no gradient before it has trained); the selection falls"
                " back to the lowest indices. Recompute after at least one epoch."
            )
        prev = current_mask_j(state)
        new = masks_lib.topk_mask(scores, k, exclude=prev if exclude_selected else None)
        merged = masks_lib.merge_masks(prev, new)
        rep = masks_lib.mask_report(merged, top=5)
        hist = dict(state["history"])
        hist["epoch"] = hist["epoch"].at[i].set(epoch)
        hist["k"] = hist["k"].at[i].set(k)
        hist["selected"] = hist["selected"].at[i].set(rep["selected"])
        hist["batch_size"] = hist["batch_size"].at[i].set(info.get("batch_size", 0))
        ctx.log(
            f"{name} recompute at epoch {epoch}: k={k:,} ({ratios[i]:g} of {n_elig:,}), "
            f"{score}/{mode} saliency over {info.get('num_examples', 0)} examples "
            f"(batch {info.get('batch_size', 0)}); selected {rep['selected']:,} "
            f"= {100 * rep['density']:.4f}%; per module type {rep['per_module_type']}"
        )
        if not sparse:
            new_state = dict(state, mask=merged, round=state["round"] + 1, history=hist)
            return ctx.trainable, ctx.opt_state, new_state
        trainable, opt_state, new_state = _fill_sparse(
            ctx.trainable, ctx.opt_state, state, merged, e, i, k, ctx.log
        )
        new_state["round"] = state["round"] + 1
        new_state["history"] = hist
        return trainable, opt_state, new_state

    def _fill_sparse(trainable, opt_state, state, merged, e, i, k, log):
        total_budget = sum(
            masks_lib.budget(r, sum(math.prod(s) for s in e.values())) for r in ratios
        )
        n_elig = sum(math.prod(s) for s in e.values())
        idx, count = dict(state["idx"]), dict(state["count"])
        caps = {key: int(trainable["delta"][key].shape[0]) for key in e}
        new_caps = dict(caps)
        plans = {}
        for key, s in e.items():
            size = math.prod(s)
            m = np.asarray(merged[key]).reshape(-1)
            old_n = int(count[key])
            old_idx = np.asarray(idx[key])[:old_n]
            fresh = np.setdiff1d(np.flatnonzero(m), old_idx, assume_unique=False)
            need = old_n + len(fresh)
            if i == 0 and int(state["round"]) == 0:
                c1 = need
                want = max(
                    math.ceil(capacity_slack * c1 * total_budget / max(k, 1)),
                    math.ceil(capacity_slack * total_budget * size / n_elig),
                )
                new_caps[key] = min(size, max(capacity_floor, want, need))
            elif need > caps[key]:
                new_caps[key] = min(size, max(need, math.ceil(capacity_slack * need)))
            plans[key] = (old_idx, fresh, size)
        grown = [key for key in e if new_caps[key] != caps[key]]
        if grown and int(state["round"]) > 0:
            log(f"guft: capacity grown for {len(grown)} tensors (one retrace): {grown[:4]}")
        trainable, opt_state, state = resize(trainable, opt_state, state, new_caps)
        idx, count = dict(state["idx"]), dict(state["count"])
        for key, (old_idx, fresh, size) in plans.items():
            cap = new_caps[key]
            arr = np.full((cap,), size, np.int32)
            arr[: len(old_idx)] = old_idx
            arr[len(old_idx) : len(old_idx) + len(fresh)] = fresh
            idx[key] = jnp.asarray(arr)
            count[key] = jnp.asarray(len(old_idx) + len(fresh), jnp.int32)
        return trainable, opt_state, dict(state, idx=idx, count=count)

    def resize(trainable, opt_state, state, caps: dict):
        """Zero-pads (or truncates) δ, its optimizer leaves and the indices to ``caps``."""
        if not sparse:
            return trainable, opt_state, state
        return jax.jit(lambda t, o, st: _resize(t, o, st, caps))(trainable, opt_state, state)

    def _resize(trainable, opt_state, state, caps: dict):
        old = {key: int(v.shape[0]) for key, v in trainable["delta"].items()}

        def fix(path, x):
            keys = [getattr(p, "key", None) for p in path]
            if "delta" in keys:
                j = keys.index("delta")
                key = keys[j + 1] if j + 1 < len(keys) else None
                if key in caps and getattr(x, "ndim", 0) == 1 and x.shape[0] == old[key]:
                    c = caps[key]
                    if c >= x.shape[0]:
                        return jnp.concatenate([x, jnp.zeros((c - x.shape[0],), x.dtype)])
                    return x[:c]
            return x

        trainable = jax.tree_util.tree_map_with_path(fix, trainable)
        opt_state = jax.tree_util.tree_map_with_path(fix, opt_state)
        idx = {}
        for key, v in state["idx"].items():
            size = math.prod(elig_shapes()[key])
            c = caps[key]
            idx[key] = (
                jnp.concatenate([v, jnp.full((c - v.shape[0],), size, jnp.int32)])
                if c >= v.shape[0]
                else v[:c]
            )
        return trainable, opt_state, dict(state, idx=idx)

    def elig_shapes():
        return cache["eligible"]

    def resize_from_structure(trainable, opt_state, state, structure: dict):
        """Adopts the capacities recorded in a checkpoint's structure (for resuming)."""
        if not sparse:
            return trainable, opt_state, state
        caps = {}
        for key in trainable["delta"]:
            shape = structure.get(f"trainable/delta/{key}")
            if shape is not None:
                caps[key] = int(shape[0][0])
        caps = {key: caps.get(key, int(v.shape[0])) for key, v in trainable["delta"].items()}
        return resize(trainable, opt_state, state, caps)

    hparams = dict(
        recompute_epochs=recompute_epochs,
        ratios=ratios,
        mode=mode,
        score=score,
        exclude_selected=exclude_selected,
        include=list(include) if include else None,
        exclude=list(exclude) if exclude else None,
        sparse=sparse,
        capacity_slack=capacity_slack,
        capacity_floor=capacity_floor,
    )
    return Method(
        name=name,
        init=init,
        apply=apply,
        labels=default_labels,
        hparams=hparams,
        merge=merge,
        hooks=MethodHooks(
            init_state=init_state,
            epoch_start=epoch_start,
            update_mask=update_mask,
            resize=resize_from_structure,
        ),
    )


def oneshot(
    *,
    score: str,
    ratio: float = 0.0034,
    mode: str = "batch",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sparse: bool = True,
) -> Method:
    """A one-shot saliency mask (``magnitude``, ``snip``, ``salun``, ``fisher``): GUFT's machinery
    with a single recompute at epoch 1 (SPEC.md §2). Default ratio: GUFT's final ~0.34%."""
    if score not in ("magnitude", "snip", "salun", "fisher"):
        raise ValueError(f"score: {score!r} not in ['magnitude', 'snip', 'salun', 'fisher']")
    return guft(
        recompute_epochs=[1],
        ratios=[ratio],
        mode=mode,
        score=score,
        include=include,
        exclude=exclude,
        sparse=sparse,
        capacity_slack=1.0,
        name=score,
    )


@jax.jit
def _any_nonzero(tree: dict) -> jax.Array:
    return jnp.any(jnp.stack([jnp.any(v != 0) for v in tree.values()]))


def selected_counts(state: Any) -> dict[str, int]:
    """Per-tensor selected counts from a GUFT method state (either path)."""
    if "count" in state:
        return {k: int(v) for k, v in state["count"].items()}
    return {k: int(jnp.sum(v)) for k, v in state["mask"].items()}


def export_artifact(method: Method, params: Any, trainable: Any, state: Any) -> dict[str, Any]:
    """The small GUFT artifact: per-tensor flat indices + values, the head, metadata.

    Works for both paths (the dense reference path is converted to indices/values).
    """
    tensors = {}
    for key, d in trainable["delta"].items():
        if "idx" in state:
            n = int(state["count"][key])
            idx = np.asarray(state["idx"][key])[:n]
            vals = np.asarray(d)[:n]
        else:
            m = np.asarray(state["mask"][key]).reshape(-1)
            idx = np.flatnonzero(m).astype(np.int32)
            vals = np.asarray(d).reshape(-1)[idx]
        if len(idx):
            tensors[key] = {"indices": idx.astype(np.int32), "values": vals.astype(np.float32)}
    return {"tensors": tensors, "head": jax.tree_util.tree_map(np.asarray, trainable["head"])}


def apply_artifact(params: Any, artifact: dict) -> Any:
    """Plain ViT params: ``W0.ravel().at[indices].add(values)`` per tensor, and the head."""
    out = paths.merge(params, {})
    for key, t in artifact["tensors"].items():
        w0 = _leaf(params, key)
        new = w0.reshape(-1).at[jnp.asarray(t["indices"])].add(jnp.asarray(t["values"]))
        paths._set(out, masks_lib.key_path(key).split("/"), new.reshape(w0.shape))
    out["head"] = jax.tree_util.tree_map(jnp.asarray, artifact["head"])
    return out
