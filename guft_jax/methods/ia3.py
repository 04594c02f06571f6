"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al.,
arXiv:2205.05638).

Learned vectors rescale the keys, the values and the MLP's intermediate activations:
``k' = l_k ⊙ k``, ``v' = l_v ⊙ v``, ``h' = l_ff ⊙ gelu(fc1(x))`` feeding ``fc2``. We follow
Hugging Face PEFT's ``IA3Config`` convention: a target that is not a feed-forward module scales
the *output* of its Linear, bias included (``y' = l ⊙ (x W + b)``, one entry per output unit); a
feed-forward target (``feedforward``, a subset of ``targets``) scales the Linear's *input*
(``y' = (l ⊙ x) W + b``, one entry per input unit, the bias untouched). Every vector starts at 1,
so the model is unchanged at init (PEFT's ``init_ia3_weights=True``).

Both forms fold exactly into the weights, so (IA)³ is written as a weight-space method whose
``apply`` is its ``merge``: in the Flax ``(in, out)`` kernel layout an output scaling multiplies
the kernel's columns and the bias, ``W' = W·diag(l)``, ``b' = l ⊙ b``; an input scaling multiplies
the kernel's rows, ``W' = diag(l)·W``.

Defaults (ViT names): ``key`` and ``value`` of every attention block and the MLP's second Linear
``MlpBlock_3/Dense_1`` (fc2) as the feed-forward module, the paper's placement. PEFT has no
default (IA)³ targets for ViT; the same config there is ``target_modules=["key", "value",
fc2]``, ``feedforward_modules=[fc2]``. Trainable numbers on ViT-B/16:
``12·(768 + 768 + 3072) = 55,296``.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, register

DEFAULT_TARGETS = (
    r"MultiHeadDotProductAttention_\d+/(key|value)/kernel$",
    r"MlpBlock_\d+/Dense_1/kernel$",
)
DEFAULT_FEEDFORWARD = (r"MlpBlock_\d+/Dense_1/kernel$",)
GROUP = "ia3"


def ia3_kernel(w: jnp.ndarray, scale: jnp.ndarray, feedforward: bool) -> jnp.ndarray:
    """The ``(in, out)`` kernel ``w`` with (IA)³'s vector folded in: rows (input units) scaled
    for a feed-forward target, columns (output units) otherwise."""
    return w * scale[:, None] if feedforward else w * scale[None, :]


def _feedforward_paths(tps: list[str], feedforward) -> set[str]:
    """The targets matched by a ``feedforward`` regex; each regex must match a target (PEFT:
    ``feedforward_modules`` must be a subset of ``target_modules``)."""
    out = set()
    for rx in feedforward:
        hit = {p for p in tps if re.search(rx, p)}
        if not hit:
            raise ValueError(
                f"ia3.feedforward: regex {rx!r} matches none of the targets {tps[:4]}...; "
                "feedforward modules must be a subset of the targets"
            )
        out |= hit
    return out


@register(
    "ia3",
    info=Info(
        "activation",
        "learned vectors scaling keys, values and the MLP's inner activations; folds into W",
        "2205.05638",
    ),
    defaults=Defaults(lr=3e-3, head_lr=1e-2, lr_grid=(0.3, 1.0, 3.0), step_cost=0.45),
)
def ia3(
    *,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    feedforward: tuple[str, ...] = DEFAULT_FEEDFORWARD,
    layout: tuple[tuple[str, int], ...] = ws.VIT_LAYOUT,
) -> Method:
    """(IA)³ scaling vectors on the Linears whose kernels ``targets`` match (module docstring).

    Defaults: lr 3e-3, the T-Few recipe's learning rate for (IA)³ (arXiv:2205.05638, §3.3), the
    vectors being multiplicative like SSF's scales; the head at the library's 1e-2.

    Args:
      targets: regexes over ``/``-joined param paths naming the kernels of the adapted Linears.
      feedforward: regexes naming the targets whose *input* is scaled (PEFT's
        ``feedforward_modules``); every other target's output is scaled.
      layout: ``(regex, n_in)`` rules giving the 2-D ``(in, out)`` view of kernels of more than 2
        dimensions (:func:`weight_space.matrix_shape`).

    Raises:
      ValueError: at init, a regex matching nothing, a target that is not a kernel, or a
        ``feedforward`` regex matching none of the targets.

    >>> m = ia3()
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """

    def plan(params) -> dict[str, tuple[tuple[int, int], bool]]:
        tps = ws.target_paths(params, targets, field="ia3.targets")
        ff = _feedforward_paths(tps, feedforward)
        shapes = {p: ws.matrix_shape(p, paths.get(params, p).shape, layout) for p in tps}
        return {p: (shapes[p], p in ff) for p in tps}

    def init(rng, params):
        del rng
        vecs = {}
        for p, ((d_in, d_out), ff) in plan(params).items():
            vecs[ws.key(p)] = {"ia3_l": jnp.ones((d_in if ff else d_out,), jnp.float32)}
        return {"head": params["head"], GROUP: vecs}

    def merge(params, trainable):
        ff_paths = {p for p, (_, ff) in plan(params).items() if ff}
        upd = {}
        for k, v in trainable[GROUP].items():
            p = ws.path_of(k)
            kernel = paths.get(params, p)
            w = kernel.reshape(ws.matrix_shape(p, kernel.shape, layout))
            ff = p in ff_paths
            upd[p] = ia3_kernel(w, v["ia3_l"], ff).reshape(kernel.shape).astype(kernel.dtype)
            layer = p.rsplit("/", 1)[0]
            bias = paths.get(params, layer).get("bias")
            if not ff and bias is not None:
                upd[layer + "/bias"] = (bias.reshape(-1) * v["ia3_l"]).reshape(bias.shape)
        return {**paths.replaced(params, upd), "head": trainable["head"]}

    layout_ = [list(r) for r in layout]
    hp = dict(targets=list(targets), feedforward=list(feedforward), layout=layout_)
    return ws.method(GROUP, init=init, merge=merge, hparams=hp)
