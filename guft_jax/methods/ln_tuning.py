"""LayerNorm tuning (Zhao et al., arXiv:2312.11420): only the LayerNorms' affine parameters train.

Every LayerNorm ``y = s ⊙ (x - μ)/σ + c`` keeps its statistics and trains its scale ``s`` and
bias ``c`` (initialised to the pretrained values, so the model is unchanged at init), together
with the task head. As Hugging Face PEFT's ``LNTuningConfig``, which trains a copy of each target
LayerNorm module (both its weight and its bias). The trainable tree is that subtree of the
params, so ``merge`` is a deep merge (plain params, exact).

Default targets (ViT names): both LayerNorms of every block (``LayerNorm_0``, ``LayerNorm_2``)
and the final ``encoder_norm``. ViT-B/16: ``25 LayerNorms × 2 × 768 = 38,400`` numbers, the count
PEFT reports for ``target_modules=["layernorm_before", "layernorm_after", "layernorm"]`` on
Hugging Face's ViT-B/16 (the same 25 norms).
"""

from __future__ import annotations

from guft_jax import paths
from guft_jax.methods.base import Defaults, Info, Method, register
from guft_jax.methods.simple import subset_method

DEFAULT_TARGETS = (
    r"(^|/)LayerNorm_\d+/(scale|bias)$",
    r"(^|/)encoder_norm/(scale|bias)$",
)


@register(
    "ln_tuning",
    info=Info(
        "selective",
        "LayerNorm scales and biases only",
        "2312.11420",
    ),
    defaults=Defaults(lr=1e-3, head_lr=1e-2, lr_grid=(0.3, 1.0, 3.0), step_cost=0.7),
)
def ln_tuning(*, targets: tuple[str, ...] = DEFAULT_TARGETS) -> Method:
    """LayerNorm scales and biases matched by ``targets`` train, with the head.

    Defaults: lr 1e-3 and ``step_cost`` 0.7, as BitFit's here: both train a few vectors of the
    pretrained model in place, from their pretrained values, and back-propagate through the
    whole backbone without keeping any weight gradient; the head at the library's 1e-2.

    Args:
      targets: regexes over ``/``-joined param paths naming the LayerNorm leaves that train.

    Raises:
      ValueError: ``targets`` empty; at init, a regex matching no parameter.

    >>> m = ln_tuning()
    >>> tr = m.init(jax.random.key(0), params)  # doctest: +SKIP
    """
    if not targets:
        raise ValueError("ln_tuning.targets: must name at least one LayerNorm parameter")
    m = subset_method("ln_tuning", list(targets), None)

    def init(rng, params):
        paths.regex_mask(params, list(targets), field="ln_tuning.targets")  # names the field
        return m.init(rng, params)

    return m._replace(init=init, hparams=dict(targets=list(targets)))
