"""The one interface every fine-tuning method implements, and the registry.

A method is a :class:`Method` NamedTuple of pure functions built by a factory with keyword-only
hyperparameters (``lora(rank=8, alpha=16.0)``). The engine, the reports and the artifacts only
call these functions; none of them looks at a method's name or the shape of its trees.

Required fields:

- ``init(rng, params) -> trainable``: the pytree that trains (always holds the task ``head``).
- ``apply(params, trainable, state=None, rng=None) -> variables``: the variables dict for
  ``model.apply`` (at least ``{"params": effective_params}``). ``params`` are the frozen
  pretrained params (with a zero head), never modified; ``state`` is the method state of
  ``MethodHooks.init_state`` (None for stateless methods); ``rng`` is a PRNG key during training
  and None in deterministic passes (evaluation, saliency), for methods that sample (DyLoRA's rank,
  hard-concrete gates).

Optional fields (each has a default that costs nothing):

- ``labels(trainable) -> pytree of str``: optimizer group of every trainable leaf, ``"head"`` or
  ``"method"`` (separate learning rates). Default :func:`default_labels`.
- ``hparams``: the hyperparameters, for artifacts and results metadata (JSON-able).
- ``merge(params, trainable, state=None) -> params``: plain ViT params giving the same logits, or
  None where the method cannot be merged.
- ``hooks``: :class:`MethodHooks`, every hook optional.

Add a method in one file: write its factory, decorate it with :func:`register` (name, defaults
and the val grid live there), and import the module once (built-in ones are imported by
``guft_jax.methods``). See ``guft_jax/methods/README.md`` for the smallest complete example.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths
from guft_jax.checkpoint_import import CheckpointMismatchError

PyTree = Any

from guft_jax.optim import HEAD, METHOD  # noqa: E402  (re-exported: the optimizer groups)


class MethodHooks(NamedTuple):
    """Optional pure hooks. ``None`` means "not used" and costs nothing; the step stays one trace.

    - ``init_state(params, trainable) -> state``: the method's own state pytree (a NamedTuple or
      ``flax.struct`` dataclass; checkpointed with the train state).
    - ``epoch_start(epoch, ctx) -> (trainable, opt_state, state)``: outside jit, at the start of
      every 1-indexed epoch, with an :class:`EpochContext`; returns trees of the same structure
      (or of grown shapes, which retraces once and should be rare).
    - ``update_mask(state) -> pytree of bool | None``: element-level mask of the trainable tree
      (True = trainable; a bool leaf may stand for a subtree) that the optimizer applies;
      evaluated inside the jitted step from the traced state, so a mask that changes every step
      (adaptive freezing) never retraces. Masked-out entries stay bitwise unchanged and their
      optimizer moments stay zero.
    - ``resize(trainable, opt_state, state, structure) -> (trainable, opt_state, state)``: adopt
      the array shapes recorded in a checkpoint's ``structure`` (``{path: [shape, dtype]}``)
      before restoring into them.
    - ``step(info: StepInfo) -> (trainable, opt_state, state)``: inside the jitted train step,
      after the optimizer update (schedules, adaptive freezing, rank pruning, relocalisation).
      Must be traceable: no Python branching on traced values.
    - ``loss(params, trainable, state, rng) -> scalar``: an extra loss term added to the task loss
      in training (orthogonality regularisers, expected-L0 penalties).
    - ``prepare_base(params) -> params``: once, before training, on the frozen base (e.g. NF4
      quantisation); its output is what ``apply`` receives as ``params``.
    - ``intercept(trainable, state, rng) -> interceptor | None``: a ``flax.linen.intercept_methods``
      interceptor active around ``model.apply`` (the single interception point for additive
      methods and GUFT's sparse weight gradient; see :mod:`guft_jax.vit`).
    - ``trained(params, trainable, state) -> {path: count}``: numbers trained per backbone tensor
      (default: every non-head trainable leaf's size, keyed by its path).
    - ``export(params, trainable, state) -> {name: np.ndarray}``: the artifact payload (default:
      the flattened trainable tree).
    - ``load(params, arrays) -> params``: plain merged params from an artifact payload (default:
      rebuild the trainable tree from the payload and call ``merge``).
    """

    init_state: Callable[[PyTree, PyTree], PyTree] | None = None
    epoch_start: Callable[..., tuple[PyTree, PyTree, PyTree]] | None = None
    update_mask: Callable[[PyTree], PyTree | None] | None = None
    resize: Callable[..., tuple[PyTree, PyTree, PyTree]] | None = None
    step: Callable[..., tuple[PyTree, PyTree, PyTree]] | None = None
    loss: Callable[..., jax.Array] | None = None
    prepare_base: Callable[[PyTree], PyTree] | None = None
    intercept: Callable[..., Callable | None] | None = None
    trained: Callable[..., dict[str, int]] | None = None
    export: Callable[..., dict[str, np.ndarray]] | None = None
    load: Callable[..., PyTree] | None = None


class EpochContext(NamedTuple):
    """What ``MethodHooks.epoch_start`` may use: current trees plus a way to compute losses."""

    params: PyTree  # frozen base params
    trainable: PyTree
    opt_state: PyTree
    state: PyTree
    loss_fn: Callable  # (variables, images, labels) -> per-example losses (B,), deterministic
    batches: Callable  # () -> iterator over (images, labels) numpy batches of the train set
    log: Callable[[str], None]
    epochs: int = 0  # the run's number of epochs (0 = unknown)
    forward: Callable | None = None  # (params, trainable, state, images) -> logits, deterministic


class StepInfo(NamedTuple):
    """What ``MethodHooks.step`` receives inside the jitted step (all traced)."""

    step: jax.Array  # the step count *before* this update (0 on the first step)
    total_steps: int  # static: the run's number of steps
    trainable: PyTree  # after the optimizer update
    prev_trainable: PyTree  # before it (to rescale or undo an update)
    opt_state: PyTree
    state: PyTree
    grads: PyTree  # this step's gradients w.r.t. the trainable tree
    params: PyTree  # the frozen base


class Method(NamedTuple):
    name: str
    init: Callable[[jax.Array, PyTree], PyTree]
    apply: Callable[..., dict]
    labels: Callable[[PyTree], PyTree] | None = None
    hparams: dict | None = None
    merge: Callable[..., PyTree] | None = None
    hooks: MethodHooks = MethodHooks()


def default_labels(trainable: PyTree) -> PyTree:
    """``"head"`` for leaves under the top-level ``head`` key, ``"method"`` otherwise."""
    return {
        k: jax.tree_util.tree_map(lambda _, k=k: HEAD if k == HEAD else METHOD, v)
        for k, v in trainable.items()
    }


def labels_of(method: Method, trainable: PyTree) -> PyTree:
    return (method.labels or default_labels)(trainable)


def init_state(method: Method, params: PyTree, trainable: PyTree) -> PyTree:
    """The method state (``()`` for stateless methods)."""
    f = method.hooks.init_state
    return () if f is None else f(params, trainable)


def prepare_base(method: Method, params: PyTree) -> PyTree:
    f = method.hooks.prepare_base
    return params if f is None else f(params)


def forward(
    model: nn.Module,
    method: Method,
    params: PyTree,
    trainable: PyTree,
    state: PyTree,
    images: jax.Array,
    *,
    rng: jax.Array | None = None,
    **kwargs: Any,
) -> jax.Array:
    """``model.apply`` with the method's variables and interceptor; ``rng=None`` is deterministic
    (no dropout / drop-path, no sampling in the method)."""
    variables = method.apply(params, trainable, state, rng)
    icpt = method.hooks.intercept(trainable, state, rng) if method.hooks.intercept else None
    if rng is None:
        call = lambda: model.apply(variables, images, deterministic=True, **kwargs)
    else:
        drop = jax.random.fold_in(rng, 1)
        call = lambda: model.apply(
            variables, images, deterministic=False, rngs={"dropout": drop}, **kwargs
        )
    if icpt is None:
        return call()
    with nn.intercept_methods(icpt):
        return call()


# ------------------------------------------------------------------------------ accounting


def _size(x) -> int:
    return int(np.prod(getattr(x, "shape", ()), dtype=np.int64))


def trained_counts(method: Method, params: PyTree, trainable: PyTree, state=None) -> dict:
    """``{param path: numbers trained}`` for the backbone (the head is counted apart)."""
    if method.hooks.trained is not None:
        return dict(method.hooks.trained(params, trainable, state))
    return {
        paths.key_to_str(p): _size(x)
        for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]
        if not paths.key_to_str(p).startswith(HEAD + "/")
    }


def head_count(trainable: PyTree) -> int:
    return sum(_size(x) for x in jax.tree_util.tree_leaves(trainable.get(HEAD, {})))


# ------------------------------------------------------------------------------ artifacts


def flat_arrays(tree: PyTree, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"/"-joined path: contiguous numpy array}`` of every leaf."""
    return {
        prefix + paths.key_to_str(p): np.ascontiguousarray(np.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def default_export(params: PyTree, trainable: PyTree, state: PyTree = None) -> dict:
    """The default artifact payload: the trainable tree, flattened by path."""
    del params, state
    return flat_arrays(trainable)


class ArtifactMismatchError(CheckpointMismatchError):
    """An artifact's arrays do not match the method's trainable template."""


def default_load(init: Callable, merge: Callable, params: PyTree, arrays: dict) -> PyTree:
    """Rebuilds the trainable tree from ``arrays`` strictly against ``init``'s template (one error
    listing missing, unexpected and mis-shaped names) and merges it into ``params``."""
    template = jax.eval_shape(lambda p: init(jax.random.PRNGKey(0), p), params)
    want = {
        paths.key_to_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(template)[0]
    }
    have = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    problems = sorted(set(want) ^ set(have)) + sorted(
        f"{k}: {have[k]} vs {want[k]}" for k in set(want) & set(have) if have[k] != want[k]
    )
    if problems:
        raise ArtifactMismatchError(f"artifact does not match the method: {problems[:10]}")
    trainable = paths.unflatten({k: jnp.asarray(v) for k, v in arrays.items()}, template)
    return merge(params, trainable)


def export_arrays(method: Method, params: PyTree, trainable: PyTree, state=None) -> dict:
    f = method.hooks.export or default_export
    return f(params, trainable, state)


def load_arrays(method: Method, params: PyTree, arrays: dict) -> PyTree:
    """Plain merged params from an artifact payload."""
    if method.hooks.load is not None:
        return method.hooks.load(params, arrays)
    if method.merge is None:
        raise ValueError(f"method.{method.name}: cannot be merged into plain params")
    return default_load(method.init, method.merge, params, arrays)


# ------------------------------------------------------------------------------ registry


class Defaults(NamedTuple):
    """Per-method defaults that configs, the offline benchmark and the VTAB configs read.

    - ``lr``, ``head_lr``, ``kwargs``: the offline configs' defaults (set before any run).
    - ``lr_grid``: factors of ``lr`` tried on val200 by the benchmark (of ``head_lr`` when the
      method trains only the head, see ``select_head_lr``).
    - ``vtab_lr``: the method-side lr under the VTAB-1K protocol (None: the protocol's 1e-3);
      ``vtab_kwargs``: hyperparameters there (None: ``kwargs``).
    - ``dry_kwargs``: overrides for the tiny CI dry runs (e.g. fewer spectral entries).
    - ``select_head_lr``: the val grid applies to the head's lr (``linear``).
    - ``step_cost``: a CPU step's cost relative to full fine-tuning (run-time estimates only).
    """

    lr: float = 1e-3
    head_lr: float = 1e-2
    kwargs: dict | None = None
    lr_grid: tuple[float, ...] = (0.3, 1.0, 3.0)
    vtab_lr: float | None = None
    vtab_kwargs: dict | None = None
    dry_kwargs: dict | None = None
    select_head_lr: bool = False
    step_cost: float = 0.6


FAMILIES = (
    "baseline",
    "selective",
    "low-rank",
    "spectral",
    "orthogonal",
    "sparse",
    "activation",
    "prompt",
    "hybrid",
)


class Info(NamedTuple):
    """What the documentation says of a registered method (the methods table is built from it).

    - ``family``: one of :data:`FAMILIES`.
    - ``summary``: one line: what trains, as a formula where there is one.
    - ``paper``: the paper's arXiv id (``"2106.09685"``), another citation where the paper has
      none, or ``""`` for the baselines.
    """

    family: str
    summary: str
    paper: str = ""


class Variant(NamedTuple):
    """A named configuration of a registered method: a row of its own in the benchmark tables.

    - ``kwargs``: the hyperparameters it sets (over the method's ``Defaults.kwargs``).
    - ``listed``: another method of the same paper (VPT-shallow beside VPT-deep), so listed
      wherever every method is; otherwise a budget or ablation row, run where a preset names it.
    - ``lr``: the variant's own offline lr (``None``: the method's ``Defaults.lr``); the grid's
      factors apply to it.
    """

    kwargs: dict
    listed: bool = False
    lr: float | None = None


class RankEval(NamedTuple):
    """An evaluation extra: one trained run also scored at lower ranks by truncation (no
    retraining), reported as rows ``{method}@r{b}``.

    - ``ranks``: the ranks ``b`` scored (those above the run's own are skipped).
    - ``truncate(method, trainable, b) -> (method, trainable)``: the rank-``b`` method and tree.
    - ``hparam``: the hyperparameter holding the run's own (maximum) rank.
    """

    ranks: tuple[int, ...]
    truncate: Callable[[Method, PyTree, int], tuple[Method, PyTree]]
    hparam: str = "rank"


class MethodSpec(NamedTuple):
    name: str
    factory: Callable[..., Method]
    fixed: dict
    defaults: Defaults
    info: Info | None = None
    variants: dict[str, Variant] = {}
    rank_eval: RankEval | None = None


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    defaults: Defaults | None = None,
    fixed: dict | None = None,
    info: Info | None = None,
    variants: dict[str, Variant] | None = None,
    rank_eval: RankEval | None = None,
    replace=False,
):
    """Decorator registering a method factory under ``name`` (with ``fixed`` keyword arguments,
    the :class:`Info` the documentation's methods table shows, named :class:`Variant` rows and
    a :class:`RankEval` evaluation extra for the benchmarks).

    >>> @register("mine", defaults=Defaults(lr=1e-3))  # doctest: +SKIP
    ... def mine(*, scale: float = 1.0) -> Method: ...

    Raises:
      ValueError: ``name`` is already registered (unless ``replace=True``), ``info.family``
        is not one of :data:`FAMILIES`, or a variant sets a keyword the factory does not take.
    """
    if info is not None and info.family not in FAMILIES:
        raise ValueError(f"register.info.family: {info.family!r} not in {list(FAMILIES)}")

    def deco(factory):
        if name in _REGISTRY and not replace and _REGISTRY[name].factory is not factory:
            raise ValueError(f"method: {name!r} is already registered")
        allowed = list(inspect.signature(factory).parameters)
        for v, var in (variants or {}).items():
            bad = sorted(set(var.kwargs) - set(allowed))
            if bad:
                raise ValueError(f"register.variants.{v}: unknown {bad}; allowed: {allowed}")
        _REGISTRY[name] = MethodSpec(
            name,
            factory,
            dict(fixed or {}),
            defaults or Defaults(),
            info,
            dict(variants or {}),
            rank_eval,
        )
        return factory

    return deco


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def spec(name: str) -> MethodSpec:
    """The registered spec of ``name``; ValueError listing the registered names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; allowed: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def get_method(name: str, **hparams) -> Method:
    """Builds a registered method by name with keyword-only hyperparameters.

    Raises:
      ValueError: unknown name (listing the allowed ones) or unknown hyperparameter (listing the
        method's keywords).
    """
    s = spec(name)
    allowed = [p for p in inspect.signature(s.factory).parameters if p not in s.fixed]
    bad = sorted(set(hparams) - set(allowed))
    if bad:
        raise ValueError(f"method.{name}: unknown hyperparameter(s) {bad}; allowed: {allowed}")
    return s.factory(**s.fixed, **hparams)
