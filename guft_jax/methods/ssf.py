"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, arXiv:2210.08823).

Every adapted sub-layer's output ``y`` becomes ``γ ⊙ y + β`` with a trainable per-channel scale
``γ`` and shift ``β``. Default places (:data:`DEFAULT_TARGETS`, regexes over the ``/``-joined
param path that names the layer: a ``vit.Linear`` by its ``kernel``, a LayerNorm by its
``scale``), as in the official code for ViT (dongzelian/SSF ``models/vision_transformer.py``):
the attention ``query``, ``key`` and ``value`` outputs (the official fused ``qkv`` projection's
3·d channels), the attention ``out`` projection, the MLP's ``Dense_0`` (fc1) and ``Dense_1``
(fc2), both LayerNorms of every block and the final ``encoder_norm``. The official code also
scales the patch embedding's output; add ``r"^embedding/kernel$"`` to ``targets`` for that.

The scale-shift is applied by an interceptor of ``vit.Linear.__call__`` and
``flax.linen.LayerNorm.__call__`` (the model file is not edited). Init ``γ = 1, β = 0`` (identity;
``init_std > 0`` gives the official ``γ ~ N(1, σ²), β ~ N(0, σ²)`` with σ = 0.02).

Mergeable at inference into the preceding layer: for a linear ``y = x W + b``,
``W' = W·diag(γ)`` (each output column scaled), ``b' = γ ⊙ b + β``; for a LayerNorm with scale
``s`` and bias ``c``, ``s' = γ ⊙ s``, ``c' = γ ⊙ c + β``.

Trainable numbers on ViT-B/16 (``L`` = 12 blocks, d = 768, MLP 3072):
``2·(L·(3d + d + 3072 + d + 2d) + d) = 204,288``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, register
from guft_jax.vit import Linear

DEFAULT_TARGETS = (
    r"^Transformer/encoderblock_\d+/"
    r"(MultiHeadDotProductAttention_\d+/(query|key|value|out)|MlpBlock_\d+/Dense_[01])/kernel$",
    r"^Transformer/encoderblock_\d+/LayerNorm_[02]/scale$",
    r"^Transformer/encoder_norm/scale$",
)
GROUP = "ssf"


def target_layers(params, targets) -> dict[str, tuple[str, int]]:
    """``{layer path: (kind, channels)}``, ``kind`` is ``"linear"`` (matched by a kernel) or
    ``"norm"`` (matched by a LayerNorm scale); ``channels`` is the size of the layer's output.

    Raises:
      ValueError: a regex matching nothing, a match that is neither a kernel nor a scale, or a
        linear without a bias (β could not be merged).
    """
    mask = paths.regex_mask(params, list(targets), [r"^head/"], field="ssf.targets")
    chosen = [paths.key_to_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m]
    out = {}
    for p in chosen:
        layer, leaf = p.rsplit("/", 1)
        node = paths.get(params, layer)
        if leaf not in ("kernel", "scale"):
            raise ValueError(f"ssf.targets: {p} is neither a kernel nor a LayerNorm scale")
        if leaf == "kernel" and "bias" not in node:
            raise ValueError(f"ssf.targets: {layer} has no bias to merge the shift into")
        size = node["bias"].size if leaf == "kernel" else node["scale"].size
        out[layer] = ("linear" if leaf == "kernel" else "norm", int(size))
    return out


@register(
    "ssf",
    info=Info(
        "activation",
        "`γ ⊙ x + β` after each linear and norm; mergeable",
        "2210.08823",
    ),
    defaults=Defaults(lr=5e-3, head_lr=1e-2, lr_grid=(0.3, 1.0, 3.0), step_cost=0.7),
)
def ssf(*, targets: tuple[str, ...] = DEFAULT_TARGETS, init_std: float = 0.0) -> Method:
    """SSF scale-shift after the layers matched by ``targets`` (module docstring).

    Defaults: lr 5e-3 (the official VTAB-1K scripts use AdamW with 5e-3 or 1e-2, weight decay
    5e-5, batch 32); the head at the library's 1e-2.

    Args:
      targets: regexes over param paths: a ``.../kernel`` names a ``vit.Linear``, a
        ``.../scale`` a LayerNorm.
      init_std: std of the init noise around ``γ = 1, β = 0`` (0: identity at init).

    Raises:
      ValueError: ``init_std < 0``; at init, a regex matching nothing.

    >>> m = ssf()
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    if init_std < 0:
        raise ValueError(f"ssf.init_std: must be >= 0, got {init_std}")

    def init(rng, params):
        layers = target_layers(params, targets)
        out = {}
        for i, (layer, (_, n)) in enumerate(sorted(layers.items())):
            ks, kb = jax.random.split(jax.random.fold_in(rng, i))
            out[paths.key_of(layer)] = {
                "scale": 1.0 + init_std * jax.random.normal(ks, (n,), jnp.float32),
                "shift": init_std * jax.random.normal(kb, (n,), jnp.float32),
            }
        return {"head": params["head"], GROUP: out}

    def apply(params, trainable, state=None, rng=None):
        return {"params": {**params, "head": trainable["head"]}}

    def intercept(trainable, state=None, rng=None):
        table = {tuple(paths.path_of(k).split("/")): v for k, v in trainable[GROUP].items()}

        def icpt(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.method_name != "__call__":
                return y
            ss = table.get(tuple(context.module.path))
            if ss is None or not isinstance(context.module, Linear | nn.LayerNorm):
                return y
            n = len(context.module.out_shape) if isinstance(context.module, Linear) else 1
            ch = y.shape[y.ndim - n :]
            out = y * ss["scale"].reshape(ch) + ss["shift"].reshape(ch)
            return out.astype(y.dtype)

        return icpt

    def merge(params, trainable, state=None):
        upd = {}
        for k, ss in trainable[GROUP].items():
            layer = paths.path_of(k)
            node = paths.get(params, layer)
            g, b = ss["scale"], ss["shift"]
            if "kernel" in node:
                w = node["kernel"]
                upd[layer + "/kernel"] = (w.reshape(-1, g.size) * g).reshape(w.shape)
                bias = node["bias"]
                upd[layer + "/bias"] = (bias.reshape(-1) * g + b).reshape(bias.shape)
            else:
                upd[layer + "/scale"] = node["scale"] * g
                upd[layer + "/bias"] = node["bias"] * g + b
        return {**paths.replaced(params, upd), "head": trainable["head"]}

    return Method(
        name="ssf",
        init=init,
        apply=apply,
        hparams=dict(targets=list(targets), init_std=init_std),
        merge=merge,
        hooks=MethodHooks(intercept=intercept),
    )
