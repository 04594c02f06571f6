"""Every registered method on any model, in your own JAX loop.

``peft.adapt(name, **hparams)`` (or ``peft.<name>(**hparams)``: ``peft.lora``, ``peft.guft``,
... one per registered method) wraps the very :class:`~guft_jax.methods.base.Method` the engine
trains (:func:`guft_jax.methods.get_method`) for a model that is not guft_jax's ViT: a Flax
linen param dict, a Flax NNX ``State`` from ``nnx.split`` (paths lose NNX's trailing ``value``),
any pytree of arrays. Nothing is implemented twice: the :class:`Adapter` only translates between
your tree and the method's view of it (:class:`ModelView`) and calls the method's functions.

The view: your ``head`` leaves (regexes over ``/``-joined paths; they train in full) move under
the method's ``head`` key, every other leaf keeps its path, and each kernel of more than two
dimensions that the method's ``targets`` name is seen as its 2-D ``(in, out)`` matrix by its
``layout`` rule (:func:`guft_jax.methods.weight_space.matrix_shape`: a conv kernel
``(kh, kw, cin, cout)`` is ``(r"Conv_\\d+/kernel$", 3)``); one without a rule is an error naming
the fix: layouts are never guessed from shapes.

Where each method runs (docs: own loop):

- On any model, 27 of the 35 registered methods: the LoRA family, VeRA, FourierFT, AdaLoRA,
  DyLoRA, AFLoRA, QLoRA, OFT/BOFT/HRA, (IA)³, LN tuning, BitFit, SSF, diff pruning, GUFT, the
  one-shot masks, SHiRA, GPS, full, linear. :meth:`Adapter.apply` gives your params with the
  method folded in; a method the engine runs through an interceptor (GUFT's sparse weight
  gradient, QLoRA's NF4 matmul, SSF, SHiRA, GPS) is folded with its ``merge``, exact on any
  model (on guft_jax's ViT, :meth:`Adapter.call` takes the engine's interceptor path).
- On guft_jax's ViT only, :data:`VIT_ONLY` with the reason: the activation-space methods
  (adapter, AdaptFormer, Compacter, VPT, prefix, UniPELT) change the forward pass inside
  ``guft_jax.vit``'s modules, and LoSiA reads its importance probe inside
  :class:`guft_jax.vit.Linear`; they run through :meth:`Adapter.call`, and
  :meth:`Adapter.init` refuses them on any other tree in one line.

An own loop (docs: own loop) calls, per step: ``apply`` (or ``call``) inside the loss, ``loss``
for the method's extra term (AdaLoRA's orthogonality, diff pruning's L0 penalty, HRA's
regulariser), and :meth:`Adapter.update` after the gradients (the method's element mask and
per-step hook: AFLoRA's freezing, AdaLoRA's budget, LoSiA's relocalisation); per epoch,
:meth:`Adapter.epoch_start` (GUFT's rounds, the one-shot masks, diff pruning's prune). These are
the engine's own functions (:func:`guft_jax.step.apply_gradients`), so an own loop with the same
data, optimizer and keys reproduces :func:`guft_jax.train.fit` (``tests/test_own_loop.py``).

>>> import flax.linen as nn
>>> model = nn.Dense(3)
>>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
>>> lo = adapt("lora", targets=r"kernel$", rank=2, alpha=4.0)
>>> trainable = lo.init(jax.random.key(1), params)
>>> y = model.apply({"params": lo.apply(params, trainable)}, jnp.ones((1, 4)))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from guft_jax import methods as methods_lib
from guft_jax import paths
from guft_jax import step as step_lib
from guft_jax.methods import base as mbase
from guft_jax.methods.weight_space import VIT_LAYOUT, matrix_shape
from guft_jax.transforms.leaves import DEFAULT_HEAD, match_paths

PyTree = Any
Layout = Sequence[tuple[str, int]]

# The methods whose training runs inside guft_jax's ViT modules (guft_jax.vit), with the reason:
# on any other model Adapter.init refuses them. The docs' own-loop table lists the same.
VIT_ONLY = {
    "adapter": "adds a bottleneck module to the forward pass of guft_jax.vit's blocks",
    "adaptformer": "adds a parallel MLP branch inside guft_jax.vit's MLP blocks",
    "compacter": "adds hypercomplex adapters to the forward pass of guft_jax.vit's blocks",
    "vpt": "prepends prompt tokens inside guft_jax.vit's encoder",
    "prefix": "prepends key/value prefixes inside guft_jax.vit's attention",
    "unipelt": "gates adapter and prefix branches inside guft_jax.vit's blocks",
    "losia": "reads its importance probe inside guft_jax.vit.Linear's matmul",
    "losia_pro": "reads its importance probe inside guft_jax.vit.Linear's matmul",
}
ACTIVATION_SPACE = ("adapter", "adaptformer", "compacter", "vpt", "prefix", "unipelt")
VIT_BLOCKS = r"^Transformer/encoderblock_\d+/"  # how init recognises guft_jax's ViT

__all__ = [
    "ACTIVATION_SPACE",
    "VIT_LAYOUT",
    "VIT_ONLY",
    "Adapter",
    "ModelView",
    "Prepared",
    "adapt",
]


@dataclasses.dataclass(frozen=True)
class ModelView:
    """The bijection between a user's param tree and the method's view of it (hashable: it
    holds only the tree's structure).

    Attributes:
      treedef: the user tree's structure (an NNX ``State`` stays a ``State``).
      paths: ``/``-joined path of every leaf, in ``tree_leaves`` order.
      shapes: every leaf's shape.
      views: every leaf's shape in the view (a >2-D kernel named by the method's ``targets``:
        its 2-D ``(in, out)`` by its ``layout`` rule; every other leaf: its own shape).
      head: the paths of the head leaves (under the view's ``head`` key, less their common
        directory ``head_prefix``: a ``classifier/kernel`` head is the view's ``head/kernel``,
        as the engine's ViT has it).
      head_prefix: the head paths' common directory (``""`` if none).
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    views: tuple[tuple[int, ...], ...]
    head: frozenset
    head_prefix: str = ""

    @staticmethod
    def of(params: PyTree, *, head, layout: Layout, targets, name: str) -> ModelView:
        """The view of ``params``.

        Raises:
          ValueError: a ``head`` regex matching nothing (the default matches nothing quietly),
            a top-level ``head`` key that is not the head, two paths with one key, or a >2-D
            kernel named by ``targets`` without a ``layout`` rule.
        """
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        all_paths = tuple(paths.key_to_str(p) for p, _ in flat)
        shapes = tuple(tuple(np.shape(x)) for _, x in flat)
        keys = [paths.key_of(p) for p in all_paths]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"params: two leaves have the mask key {dup!r} (a '.' in a name)")
        heads = frozenset(match_paths(params, head, field=f"{name}.head") if head else [])
        if any(p.split("/")[0] == mbase.HEAD and p not in heads for p in all_paths):
            raise ValueError(
                f"{name}.head: params have a top-level 'head' subtree that head={head!r} does "
                "not select; pass head=r'^head/' (it trains in full) or rename it"
            )
        named = set(_matches(all_paths, targets))
        views = [
            matrix_shape(p, s, layout) if p in named and p not in heads and len(s) > 2 else s
            for p, s in zip(all_paths, shapes, strict=True)
        ]  # (matrix_shape names the fix for a >2-D target without a rule)
        dirs = [h.split("/")[:-1] for h in sorted(heads)]
        common = []
        for parts in zip(*dirs, strict=False) if dirs else []:
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        prefix = "/".join(common) + "/" if common else ""
        return ModelView(treedef, all_paths, shapes, tuple(views), heads, prefix)

    def _node(self, view: dict, p: str) -> tuple[dict, str]:
        """The dict holding leaf ``p`` in the view and its path there."""
        if p in self.head:
            return view[mbase.HEAD], p[len(self.head_prefix) :]
        return view, p

    def to_view(self, params: PyTree) -> dict:
        """The method's nested dict: head leaves under ``head``, >2-D kernels as matrices."""
        out: dict = {mbase.HEAD: {}}
        leaves = jax.tree_util.tree_leaves(params)
        for p, v, x in zip(self.paths, self.views, leaves, strict=True):
            paths.set(*self._node(out, p), jnp.asarray(x).reshape(v))
        return out

    def from_view(self, view: dict) -> PyTree:
        """The user's tree type and shapes back from a view-shaped dict."""
        leaves = [
            paths.get(*self._node(view, p)).reshape(s)
            for p, s in zip(self.paths, self.shapes, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


@struct.dataclass
class Prepared:
    """A frozen base prepared once by :meth:`Adapter.prepare`: the method's view of your params
    (``base``, after ``prepare_base``) and the :class:`ModelView` back to your tree (static)."""

    base: dict
    view: ModelView = struct.field(pytree_node=False)


def _is_vit(params: PyTree) -> bool:
    """Whether ``params`` (or a :class:`Prepared` base) are guft_jax's ViT's (its encoder
    blocks' paths)."""
    names = params.view.paths if isinstance(params, Prepared) else paths.leaf_paths(params)
    return any(re.search(VIT_BLOCKS, p) for p in names)


def _matches(all_paths: Iterable[str], targets) -> list[str]:
    if targets is None:
        return []
    pats = [targets] if isinstance(targets, str) else list(targets)
    return [p for p in all_paths if any(re.search(rx, p) for rx in pats)]


def _view_loss(view: ModelView, loss_fn: Callable) -> Callable:
    """``loss_fn(params, x, y)`` on the user's tree as the method's ``(variables, x, y)`` loss.
    A new function at every call: the saliency programs are cached on the loss object, and a
    user's loss may close over values that change between epochs (BatchNorm statistics), which
    a cached trace would keep stale."""
    return lambda variables, x, y: loss_fn(view.from_view(variables["params"]), x, y)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A registered method on any param tree (module docstring); every function is pure.

    Attributes:
      method: the registered :class:`~guft_jax.methods.base.Method` (the engine's object).
      head: regexes of the leaves trained in full (the task head), or None.
      layout: ``(regex, n_in)`` rules viewing >2-D kernels as ``(in, out)`` matrices.
      targets: the method's ``targets`` hyperparameter (None where it has none).
    """

    method: mbase.Method
    head: Any = DEFAULT_HEAD
    layout: tuple = ()
    targets: Any = None

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def vit_only(self) -> bool:
        """Whether the method trains inside guft_jax's ViT modules (:data:`VIT_ONLY`): its
        forward pass is :meth:`call`, on guft_jax's ViT only."""
        return self.name in VIT_ONLY or self.method.merge is None

    def view(self, params: PyTree) -> ModelView:
        """The :class:`ModelView` of ``params`` (structure only; cheap, cached by jit traces)."""
        return ModelView.of(
            params, head=self.head, layout=self.layout, targets=self.targets, name=self.name
        )

    def prepare(self, params: PyTree) -> Prepared:
        """Your params in the method's view, its ``prepare_base`` done once (QLoRA's NF4
        quantisation). Every function here takes it in place of ``params``; pass it to a jitted
        step so that the base is not prepared again in every step."""
        view = self.view(params)
        return Prepared(mbase.prepare_base(self.method, view.to_view(params)), view)

    def _base(self, params: PyTree | Prepared) -> tuple[ModelView, dict]:
        if isinstance(params, Prepared):
            return params.view, params.base
        prepared = self.prepare(params)
        return prepared.view, prepared.base

    def init(self, rng: jax.Array, params: PyTree) -> PyTree:
        """The trainable tree (fresh buffers: a jitted step may donate it).

        Raises:
          ValueError: an activation-space method on a tree that is not guft_jax's ViT, or the
            method's own errors (a regex matching nothing names the field).
        """
        if self.vit_only and not _is_vit(params):
            why = VIT_ONLY.get(self.name, "changes the forward pass of guft_jax.vit's modules")
            raise ValueError(
                f"peft.{self.name}: runs on guft_jax's ViT only ({why}); these params have no "
                f"{VIT_BLOCKS!r} leaves. On other models: every method but {sorted(VIT_ONLY)}"
            )
        _, base = self._base(params)
        return jax.tree_util.tree_map(jnp.copy, self.method.init(rng, base))

    def init_state(self, params: PyTree, trainable: PyTree) -> PyTree:
        """The method's state (``()`` for stateless methods); fresh buffers."""
        _, base = self._base(params)
        state = mbase.init_state(self.method, base, trainable)
        return jax.tree_util.tree_map(jnp.copy, state)

    def labels(self, trainable: PyTree) -> PyTree:
        """``"head"`` / ``"method"`` per trainable leaf (for ``optax.multi_transform``)."""
        return mbase.labels_of(self.method, trainable)

    def apply(self, params: PyTree, trainable: PyTree, state=None, rng=None) -> PyTree:
        """Your params with the method folded in (same tree type); differentiate it with respect
        to ``trainable``. ``rng``: a key while training for methods that sample (DyLoRA's rank,
        diff pruning's gates), None for deterministic passes.

        Raises:
          ValueError: a method of :data:`VIT_ONLY` (its forward pass is :meth:`call`).
        """
        if self.vit_only:
            raise ValueError(
                f"peft.{self.name}: trains inside guft_jax's ViT modules; run the model "
                "through adapter.call(fn, params, trainable, state, rng)"
            )
        view, base = self._base(params)
        if self.method.hooks.intercept is not None:  # the engine's interceptor: fold instead
            out = self.method.merge(base, trainable, state)
        else:
            out = self.method.apply(base, trainable, state, rng)["params"]
        return view.from_view(out)

    def call(self, fn: Callable, params: PyTree, trainable: PyTree, state=None, rng=None):
        """``fn(effective params)`` with the method active: inside its interceptor for the
        methods of :data:`VIT_ONLY` (guft_jax's ViT), ``fn(self.apply(...))`` for the others."""
        icpt_fn = self.method.hooks.intercept
        on_vit = icpt_fn is not None and _is_vit(params)
        if not self.vit_only and not on_vit:
            return fn(self.apply(params, trainable, state, rng))
        view, base = self._base(params)  # the engine's path: guft_jax.vit's modules intercepted
        variables = self.method.apply(base, trainable, state, rng)
        icpt = self.method.hooks.intercept(trainable, state, rng)
        with nn.intercept_methods(icpt):
            return fn(view.from_view(variables["params"]))

    def merge(self, params: PyTree, trainable: PyTree, state=None) -> PyTree:
        """Plain params (your tree type) to save or serve without guft_jax.

        Raises:
          ValueError: an activation-space method (it cannot be merged).
        """
        if self.method.merge is None:
            raise ValueError(f"peft.{self.name}: an activation-space method cannot be merged")
        view, base = self._base(params)
        return view.from_view(self.method.merge(base, trainable, state))

    def loss(self, params: PyTree, trainable: PyTree, state=None, rng=None) -> jax.Array:
        """The method's extra training loss term (0.0 for methods without one); add it to your
        task loss in training steps (``rng`` given), not in evaluation."""
        extra = self.method.hooks.loss
        if extra is None or rng is None:
            return jnp.zeros((), jnp.float32)
        _, base = self._base(params)
        return extra(base, trainable, state, rng)

    def update(
        self,
        tx: optax.GradientTransformation,
        grads: PyTree,
        opt_state: PyTree,
        trainable: PyTree,
        state: PyTree,
        params: PyTree,
        *,
        step: jax.Array,
        total_steps: int = 0,
    ) -> tuple[PyTree, PyTree, PyTree]:
        """``(trainable, opt_state, state)`` after one step: ``tx`` restricted to the method's
        element mask (entries outside it bitwise unchanged, their moments zero), then the
        method's per-step hook (:func:`guft_jax.step.apply_gradients`, the engine's own).

        Args:
          tx: any optax transformation (chains, schedules, ``multi_transform`` over
            :meth:`labels`, ``MultiSteps``).
          grads: gradients with respect to ``trainable``.
          opt_state: ``tx.init(trainable)``.
          trainable, state: the current trainable tree and method state.
          params: your frozen params.
          step: the number of updates done before this one (traced is fine).
          total_steps: the run's length (static; the schedules of AdaLoRA, AFLoRA, LoSiA).
        """
        _, base = self._base(params)
        return step_lib.apply_gradients(
            self.method,
            tx,
            grads,
            opt_state,
            trainable,
            state,
            base,
            step=step,
            total_steps=total_steps,
        )

    @property
    def has_epoch_start(self) -> bool:
        """Whether :meth:`epoch_start` does anything (GUFT, one-shot masks, SHiRA, GPS, diff
        pruning); a loop may skip the call otherwise."""
        return self.method.hooks.epoch_start is not None

    def epoch_start(
        self,
        epoch: int,
        params: PyTree,
        trainable: PyTree,
        opt_state: PyTree,
        state: PyTree,
        *,
        loss_fn: Callable,
        batches: Callable[[], Iterable],
        epochs: int = 0,
        log: Callable[[str], None] = print,
    ) -> tuple[PyTree, PyTree, PyTree]:
        """The method's work at the start of 1-indexed ``epoch``, outside jit: GUFT's saliency
        rounds, the one-shot masks' selection, diff pruning's prune. Returns ``(trainable,
        opt_state, state)``; shapes may grow (a sparse store), which retraces a jitted step once.

        Args:
          loss_fn: ``(params, x, y) -> per-example losses`` on your tree, deterministic.
          batches: ``() -> iterator of (x, y)`` over the training set (saliency passes).
          epochs: the run's number of epochs (methods that schedule by it).
        """
        hook = self.method.hooks.epoch_start
        if hook is None:
            return trainable, opt_state, state
        view, base = self._base(params)
        ctx = mbase.EpochContext(
            params=base,
            trainable=trainable,
            opt_state=opt_state,
            state=state,
            loss_fn=_view_loss(view, loss_fn),
            batches=batches,
            log=log,
            epochs=epochs,
        )
        return hook(epoch, ctx)

    def trained(self, params: PyTree, trainable: PyTree, state=None) -> int:
        """Numbers trained outside the head (the method's own count)."""
        _, base = self._base(params)
        counts = mbase.trained_counts(self.method, base, trainable, state)
        return int(sum(counts.values()))


def adapt(
    name: str,
    *,
    head: str | Sequence[str] | None = DEFAULT_HEAD,
    layout: Layout = (),
    **hparams: Any,
) -> Adapter:
    """The registered method ``name`` for any param tree.

    Args:
      name: a registered method (:func:`guft_jax.methods.method_names`).
      head: regexes of the leaves trained in full (a new task head). The default is
        ``^head/`` where that matches a leaf and no head otherwise; None for none.
      layout: ``(regex, n_in)`` rules: a matched kernel of more than 2 dimensions is the
        ``(prod(shape[:n_in]), prod(shape[n_in:]))`` matrix to the method; guft_jax's ViT needs
        :data:`VIT_LAYOUT` for its attention kernels.
      **hparams: the method's hyperparameters (``targets`` for the methods that adapt chosen
        kernels: regexes over ``/``-joined paths), as in :func:`guft_jax.methods.get_method`.

    Raises:
      ValueError: an unknown method or hyperparameter (listing the allowed ones), a bad
        layout rule.

    >>> lo = adapt("lora", targets=r"Conv_\\d+/kernel$", layout=[(r"Conv_\\d+/kernel$", 3)])
    """
    for rule in layout:
        if len(rule) != 2 or not isinstance(rule[0], str) or not isinstance(rule[1], int):
            raise ValueError(f"layout: rules are (regex, n_in) pairs, got {rule!r}")
    params_of = inspect.signature(methods_lib.spec(name).factory).parameters
    for k, v in hparams.items():  # one regex where the method takes a sequence of them
        if isinstance(v, str) and k in params_of:
            if isinstance(params_of[k].default, tuple | list):
                hparams[k] = (v,)
    method = methods_lib.get_method(name, **hparams)
    targets = (method.hparams or {}).get("targets")
    return Adapter(method, head=head, layout=tuple(tuple(r) for r in layout), targets=targets)


def __getattr__(name: str):
    # ``peft.lora(...)`` is ``adapt("lora", ...)`` for every registered method (live registry).
    if name in methods_lib.method_names():
        return functools.partial(adapt, name)
    raise AttributeError(f"module 'guft_jax.peft' has no attribute {name!r}")
