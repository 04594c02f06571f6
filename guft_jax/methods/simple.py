"""Full fine-tuning, linear probing and BitFit.

- ``full``: every backbone parameter and the head train.
- ``linear``: only the head trains.
- ``bitfit`` (Ben Zaken et al., arXiv:2106.10199): biases (``.../bias``, LayerNorm biases
  included) and the head train.

All three keep the trained leaves as a subtree of the param tree, so ``apply`` is a deep merge
and ``merge`` is the same merge (the result is plain ViT params). BitFit is the smallest complete
example of a method (``guft_jax/methods/README.md``).
"""

from __future__ import annotations

import jax

from guft_jax import paths
from guft_jax.methods.base import Defaults, Info, Method, register


def subset_method(name: str, include: list[str] | None, exclude: list[str] | None) -> Method:
    """A method training the param leaves matched by ``include`` / ``exclude`` regexes (and the
    head): its trainable tree is that subtree of the params."""

    def init(rng, params):
        del rng
        mask = paths.regex_mask(params, include, exclude, field=f"{name}.include")
        sel, _ = paths.split(params, mask)
        sel["head"] = params["head"]
        return jax.tree_util.tree_map(lambda x: x, sel)

    def merge(params, trainable, state=None):
        del state
        return paths.merge(params, trainable)

    return Method(
        name=name,
        init=init,
        apply=lambda params, trainable, state=None, rng=None: {"params": merge(params, trainable)},
        hparams={},
        merge=merge,
    )


@register(
    "full",
    defaults=Defaults(lr=1e-4, head_lr=1e-2, step_cost=1.0),
    info=Info("baseline", "every backbone parameter and the head"),
)
def full() -> Method:
    """Every backbone parameter trains (the reference for cost and accuracy)."""
    return subset_method("full", None, None)


@register(
    "linear",
    defaults=Defaults(lr=1e-3, head_lr=1e-2, select_head_lr=True, step_cost=0.25),
    info=Info("baseline", "the head only (a linear probe of the frozen backbone)"),
)
def linear() -> Method:
    """Only the task head trains."""
    return subset_method("linear", [r"^head/"], None)


@register(
    "bitfit",
    defaults=Defaults(lr=1e-3, head_lr=1e-2, step_cost=0.68),
    info=Info("selective", "every bias (LayerNorm biases included)", "2106.10199"),
)
def bitfit() -> Method:
    """Biases (including LayerNorm biases) and the head train."""
    return subset_method("bitfit", [r"/bias$", r"^head/"], None)
