"""Full fine-tuning, linear probing and BitFit (SPEC.md §2).

- ``full``: every backbone parameter and the head train.
- ``linear``: only the head trains.
- ``bitfit`` (Ben Zaken et al., arXiv:2106.10199): biases (``.../bias``, LayerNorm biases
  included) and the head train.

All three keep the trained leaves as a subtree of the param tree, so ``apply`` is a deep merge
and ``merge`` is the same merge (the result is plain ViT params).
"""

from __future__ import annotations

import jax

from guft_jax import paths
from guft_jax.methods.base import Method, default_labels


def _subset_method(name: str, include: list[str] | None, exclude: list[str] | None) -> Method:
    def init(rng, params):
        del rng
        mask = paths.select(params, include, exclude, field=f"{name}.include")
        sel, _ = paths.split(params, mask)
        sel["head"] = params["head"]
        return jax.tree_util.tree_map(lambda x: x, sel)

    def apply(params, trainable, state=None):
        del state
        return {"params": paths.merge(params, trainable)}

    def merge(params, trainable):
        return paths.merge(params, trainable)

    return Method(
        name=name,
        init=init,
        apply=apply,
        labels=default_labels,
        hparams={},
        merge=merge,
    )


def full() -> Method:
    """Every backbone parameter trains (the reference for cost and accuracy)."""
    return _subset_method("full", None, None)


def linear() -> Method:
    """Only the task head trains."""
    return _subset_method("linear", [r"^head/"], None)


def bitfit() -> Method:
    """Biases (including LayerNorm biases) and the head train."""
    return _subset_method("bitfit", [r"/bias$", r"^head/"], None)
