"""Weight-space PEFT methods on any parameter pytree: LoRA, DoRA, VeRA, FourierFT, BitFit.

The same per-kernel rules as the registered methods (:mod:`guft_jax.methods.lora`, ``vera``,
``fourierft``, ``simple``), for a model that is not guft_jax's ViT: a Flax linen param dict, a
Flax NNX ``State`` from ``nnx.split`` (paths lose NNX's trailing ``value``), any pytree of
arrays. Each factory returns an :class:`Adapter` of pure functions:

- ``init(rng, params) -> adapter``: the trainable pytree (``adapter[name]``: one entry per
  adapted kernel; ``adapter["train"]``: the leaves trained in full, e.g. the task head).
- ``apply(params, adapter) -> params``: the effective params, a tree of the same type as
  ``params`` (differentiate it with respect to ``adapter``); feed it to ``model.apply`` or
  ``nnx.merge``.
- ``merge(params, adapter) -> params``: the same plain params, to save or serve without guft_jax.

Targets are regexes over ``/``-joined paths (``re.search``; a regex matching nothing is an
error). A 2-D kernel is ``(in, out)``; a kernel of more dimensions (conv, attention) needs an
explicit ``layout`` rule, never guessed from its shape
(:func:`guft_jax.methods.weight_space.matrix_shape`).
GUFT and the one-shot masks on any model are :mod:`guft_jax.transforms`.

>>> import flax.linen as nn
>>> model = nn.Dense(3)
>>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
>>> lo = lora(targets=r"kernel$", rank=2, alpha=4.0)
>>> adapter = lo.init(jax.random.key(1), params)
>>> y = model.apply({"params": lo.apply(params, adapter)}, jnp.ones((1, 4)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import masks as masks_lib
from guft_jax import paths as paths_lib
from guft_jax.methods import fourierft as fourierft_lib
from guft_jax.methods import lora as lora_lib
from guft_jax.methods import vera as vera_lib
from guft_jax.methods import weight_space as ws
from guft_jax.transforms import map_paths, match_paths, tree_paths

PyTree = Any
Layout = Sequence[tuple[str, int]]

VIT_LAYOUT = ws.VIT_LAYOUT


class Adapter(NamedTuple):
    """A weight-space method for any pytree (module docstring)."""

    name: str
    init: Callable[[jax.Array, PyTree], PyTree]
    apply: Callable[[PyTree, PyTree], PyTree]
    merge: Callable[[PyTree, PyTree], PyTree]
    hparams: dict


def _kernels(params, targets, layout, field) -> dict:
    """``{key: (path, (d_in, d_out))}`` of the target kernels, in tree order."""
    if targets is None:
        return {}
    shapes = dict(zip(tree_paths(params), map(np.shape, jax.tree.leaves(params)), strict=True))
    out = {}
    for p in match_paths(params, targets, field=field):
        out[masks_lib.leaf_key(p)] = (p, ws.matrix_shape(p, tuple(shapes[p]), layout))
    return out


def _adapter(name, hparams, *, targets, layout, train, make, rule) -> Adapter:
    """``make(rng, kernels, leaves) -> {key: factors}`` (``leaves``: ``{path: array}``);
    ``rule(w2d, factors, key, kernels) -> new w2d``."""

    def init(rng, params):
        kernels = _kernels(params, targets, layout, f"{name}.targets")
        leaves = dict(zip(tree_paths(params), jax.tree.leaves(params), strict=True))
        out = {}
        if kernels:
            out[name] = make(rng, kernels, leaves)
        full = match_paths(params, train, field=f"{name}.train") if train is not None else []
        if full:
            out["train"] = {masks_lib.leaf_key(p): jnp.asarray(leaves[p]) for p in full}
        return out

    def apply(params, adapter):
        factors, full = adapter.get(name, {}), adapter.get("train", {})
        kernels = _kernels(params, targets, layout, f"{name}.targets") if factors else {}

        def leaf(p, w):
            k = masks_lib.leaf_key(p)
            if k in full:
                return full[k]
            if k in factors:
                _, (d_in, d_out) = kernels[k]
                new = rule(w.reshape(d_in, d_out), factors[k], k, kernels)
                return new.reshape(w.shape).astype(w.dtype)
            return w

        return map_paths(leaf, params)

    return Adapter(name, init, apply, apply, hparams)


def _check(name, rank=None, alpha=None):
    if rank is not None and rank < 1:
        raise ValueError(f"{name}.rank: must be >= 1, got {rank}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"{name}.alpha: must be > 0, got {alpha}")


def lora(
    *,
    targets: str | Sequence[str],
    rank: int = 8,
    alpha: float = 16.0,
    init: str = "kaiming",
    layout: Layout = (),
    train: str | Sequence[str] | None = None,
) -> Adapter:
    """LoRA (Hu et al., arXiv:2106.09685): ``W = W0 + (α/r)·(B A)ᵀ`` on the ``targets`` kernels.

    Args:
      targets: regexes over ``/``-joined paths of the kernels to adapt.
      rank, alpha: ``r`` and ``α`` (``B`` starts at zero: the model is unchanged at init).
      init: ``"kaiming"`` (PyTorch's Linear init) or ``"gaussian"`` (N(0, 1/r)) for ``A``.
      layout: ``(regex, n_in)`` rules for kernels of more than 2 dimensions.
      train: regexes of leaves trained in full (a new task head).

    >>> lo = lora(targets=r"Dense_\\d+/kernel$", rank=4, alpha=8.0, train=r"^head/")
    """
    _check("lora", rank, alpha)
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"lora.init: {init!r} not in ['kaiming', 'gaussian']")
    scale = alpha / rank

    def make(rng, kernels, leaves):
        return {
            k: lora_lib.lora_factor(jax.random.fold_in(rng, i), *dims, rank=rank, init=init)
            for i, (k, (_, dims)) in enumerate(kernels.items())
        }

    hp = dict(targets=targets, rank=rank, alpha=alpha, init=init, layout=list(layout), train=train)
    return _adapter(
        "lora",
        hp,
        targets=targets,
        layout=layout,
        train=train,
        make=make,
        rule=lambda w, f, k, kernels: w + lora_lib.lora_delta(f, scale).astype(w.dtype),
    )


def dora(
    *,
    targets: str | Sequence[str],
    rank: int = 8,
    alpha: float = 16.0,
    init: str = "kaiming",
    layout: Layout = (),
    train: str | Sequence[str] | None = None,
) -> Adapter:
    """DoRA (Liu et al., arXiv:2402.09353): ``W' = m ⊙ V/‖V‖``, ``V = W0 + (α/r)·(B A)ᵀ``, ``m``
    initialised to the column norms of ``W0`` (identity at init). Arguments as :func:`lora`."""
    _check("dora", rank, alpha)
    scale = alpha / rank
    factors = lora(targets=targets, rank=rank, alpha=alpha, init=init, layout=layout)

    def make(rng, kernels, leaves):
        out = {}
        for k, f in factors.init(rng, leaves_tree(leaves))["lora"].items():
            p, dims = kernels[k]
            w = jnp.asarray(leaves[p], jnp.float32).reshape(dims)
            out[k] = dict(f, m=jnp.linalg.norm(w, axis=0))
        return out

    return _adapter(
        "dora",
        dict(factors.hparams, train=train),
        targets=targets,
        layout=layout,
        train=train,
        make=make,
        rule=lambda w, f, k, kernels: lora_lib.dora_kernel(w, f, scale),
    )


def leaves_tree(leaves: dict) -> dict:
    """A nested dict of ``{path: array}`` (the paths as keys)."""
    out: dict = {}
    for p, x in leaves.items():
        paths_lib.set(out, p, x)
    return out


def vera(
    *,
    targets: str | Sequence[str],
    rank: int = 256,
    seed: int = 0,
    d_init: float = 0.1,
    layout: Layout = (),
    train: str | Sequence[str] | None = None,
) -> Adapter:
    """VeRA (Kopiczko et al., arXiv:2310.11454): ``ΔW x = λ_b ⊙ B(λ_d ⊙ A x)`` with ``A``, ``B``
    frozen, shared and drawn from ``seed``; ``λ_d`` (init ``d_init``) and ``λ_b`` (init 0) train."""
    _check("vera", rank)

    def make(rng, kernels, leaves):
        del rng, leaves
        return {
            k: {
                "lambda_d": jnp.full((rank,), d_init, jnp.float32),
                "lambda_b": jnp.zeros((dims[1],), jnp.float32),
            }
            for k, (_, dims) in kernels.items()
        }

    def rule(w, s, k, kernels):
        d_in_max = max(d[0] for _, d in kernels.values())
        d_out_max = max(d[1] for _, d in kernels.values())
        a_all, b_all = vera_lib.vera_projections(seed, rank, d_in_max, d_out_max)
        return w + vera_lib.vera_delta(s, a_all, b_all, *w.shape).astype(w.dtype)

    hp = dict(targets=targets, rank=rank, seed=seed, d_init=d_init, layout=list(layout))
    return _adapter(
        "vera",
        dict(hp, train=train),
        targets=targets,
        layout=layout,
        train=train,
        make=make,
        rule=rule,
    )


def fourierft(
    *,
    targets: str | Sequence[str],
    n: int = 1000,
    alpha: float = 300.0,
    seed: int = 2024,
    init: str = "normal",
    layout: Layout = (),
    train: str | Sequence[str] | None = None,
) -> Adapter:
    """FourierFT (Gao et al., arXiv:2405.03003): ``ΔW = α·Re(ifft2(F))`` from ``n`` spectral
    coefficients per kernel at entries drawn from ``seed`` (shared by kernels of one shape)."""
    if init not in ("normal", "zeros"):
        raise ValueError(f"fourierft.init: {init!r} not in ['normal', 'zeros']")
    kw = dict(seed=seed, frequency_bias=False, fc=0.0, bandwidth=200.0)

    def make(rng, kernels, leaves):
        del leaves
        out = {}
        for i, k in enumerate(kernels):
            if init == "normal":
                out[k] = jax.random.normal(jax.random.fold_in(rng, i), (n,))
            else:
                out[k] = jnp.zeros((n,), jnp.float32)
        return out

    def rule(w, c, k, kernels):
        d_in, d_out = w.shape
        ent = fourierft_lib.entries_cached((d_out, d_in), n, **kw)
        return w + fourierft_lib.delta_w(c, jnp.asarray(ent), (d_out, d_in), alpha).T.astype(
            w.dtype
        )

    hp = dict(targets=targets, n=n, alpha=alpha, seed=seed, init=init, layout=list(layout))
    return _adapter(
        "fourierft",
        dict(hp, train=train),
        targets=targets,
        layout=layout,
        train=train,
        make=make,
        rule=rule,
    )


def bitfit(*, train: str | Sequence[str] = (r"(^|/)bias$",)) -> Adapter:
    """BitFit (Ben Zaken et al., arXiv:2106.10199): the biases (plus any other ``train``
    regex, e.g. the head) train in full, nothing else.

    >>> bf = bitfit(train=[r"bias$", r"^head/"])
    """
    return _adapter(
        "bitfit", dict(train=train), targets=None, layout=(), train=train, make=None, rule=None
    )
