"""SHiRA: sparse high-rank adapters (Bhardwaj et al., arXiv:2406.13175).

A fixed sparse set ``S_t`` of entries of each targeted kernel ``t`` trains:
``W_t = W0_t + Σ_{(i, j) ∈ S_t} δ_ij e_i e_jᵀ`` with ``δ = 0`` at init (PEFT's
``init_weights=True``), so the model is unchanged at init. ``ΔW`` is sparse but of high rank.

Budget (HF PEFT 0.17.1 ``ShiraConfig``): ``|S_t| = r·(d_in + d_out)`` entries per targeted
Linear, the numbers a rank-``r`` LoRA adapter trains there; a budget above ``d_in·d_out`` is an
error (as PEFT). Targets of one shape so keep the same fraction ``r·(d_in + d_out)/(d_in·d_out)``
(ViT-B/16 query/value, r=8: 2.08%). The 2-D ``(d_in, d_out)`` view of a kernel comes from the
``layout`` rules (:func:`guft_jax.methods.weight_space.matrix_shape`; ViT attention by default).

Masks (``mask_type``), each chosen once, at the start of ``epoch`` (the paper's data-driven masks
need the training set), as the tensor's top ``|S_t|`` entries of a score (ties: the lower flat
index of the kernel):

- ``"random"`` (PEFT's ``random_mask``, the paper's SHiRA-Rand): a uniformly random subset, the
  first ``|S_t|`` of a random permutation of the kernel's entries, seeded by ``random_seed``
  (``jax.random``, folded with the tensor's index in sorted-path order; not torch's stream).
- ``"weight_magnitude"`` (SHiRA-WM): the largest ``|W0|``.
- ``"gradient"`` (SHiRA-Grad): the largest ``Σ_batches |∇_W L|`` over the training set at
  ``W0`` (the paper accumulates gradients over a calibration subset; here the whole train split,
  GUFT's ``batch`` saliency).
- ``"snip"`` (SHiRA-SNIP): the largest ``|W0 ⊙ ∇_W L|`` on the first batch.

Gradient scores go through a head fitted on the frozen backbone while the task head is still zero
(GUFT's ``head_warmup``: a zero head gives the backbone no gradient).

Training: GUFT's sparse store (:func:`guft_jax.guft.quota_oneshot`): per kernel the flat indices
of ``S_t`` (method state) and the values ``δ`` (trainable), the kernel's weight gradient taken only
at ``S_t``; optimizer state ∝ ``|S|``; frozen entries stay bitwise equal to ``W0``. Merge:
``W0.ravel().at[S_t].add(δ)``; the artifact stores each kernel's indices and values (GUFT's
format).

Defaults: PEFT's ``r=32`` and query/value targets (PEFT's ViT mapping); the registry runs
``r=8``, LoRA r=8's budget (294,912 numbers on ViT-B/16), the paper's like-for-like comparison,
with lr 1e-3 (GUFT's, the same ``W0 + δ`` parametrisation and AdamW) and a val grid of
0.3-10× (a fixed sparse set trains fewer numbers per unit than a dense update, so the grid leans
up, as the one-shot masks' does); the CI dry runs take ``r=2``.
"""

from __future__ import annotations

from collections.abc import Sequence

from guft_jax import guft as guft_lib
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, register

# mask_type -> the saliency score it ranks by (guft_jax.saliency, plus GUFT's "random").
MASK_SCORES = {
    "random": "random",
    "weight_magnitude": "magnitude",
    "gradient": "guft",
    "snip": "snip",
}


@register(
    "shira",
    info=Info(
        "sparse",
        "`W0 + δ` on `r·(d_in + d_out)` fixed entries per kernel (random, `|W0|`, gradient or "
        "SNIP mask)",
        "2406.13175",
    ),
    defaults=Defaults(
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(r=8),
        lr_grid=(0.3, 1.0, 3.0, 10.0),
        dry_kwargs=dict(r=2),
        step_cost=0.9,
    ),
)
def shira(
    *,
    r: int = 32,
    mask_type: str = "random",
    random_seed: int = 0,
    targets: Sequence[str] = ws.DEFAULT_TARGETS,
    layout: Sequence[tuple[str, int]] = ws.VIT_LAYOUT,
    epoch: int = 1,
    mode: str = "batch",
    sparse: bool = True,
) -> Method:
    """SHiRA on the kernels matched by ``targets`` (module docstring).

    Args:
      r: budget ``r·(d_in + d_out)`` entries per targeted kernel (PEFT's ``r``).
      mask_type: ``"random"``, ``"weight_magnitude"``, ``"gradient"`` or ``"snip"``.
      random_seed: the ``"random"`` mask's seed.
      targets: regexes over kernel paths.
      layout: ``(regex, n_in)`` rules giving >2-D kernels their ``(d_in, d_out)`` view.
      epoch: the 1-indexed epoch at whose start the mask is chosen.
      mode: gradient saliency mode (``"batch"`` or ``"example"``, :mod:`guft_jax.saliency`).
      sparse: GUFT's sparse store (default; its kernels are multiplied through
        ``guft_jax.vit.Linear``'s interceptor, so the ViT of this library) or the dense
        reference path (a dense ``δ`` and an element mask: any Flax param tree).

    Raises:
      ValueError: an unknown ``mask_type`` or ``mode``, ``r < 1``; at init, a target regex
        matching no kernel; at selection, ``r·(d_in + d_out) > d_in·d_out``.

    >>> m = shira(r=8, mask_type="weight_magnitude")
    """
    if mask_type not in MASK_SCORES:
        raise ValueError(f"shira.mask_type: {mask_type!r} not in {list(MASK_SCORES)}")
    hp = dict(
        r=r,
        mask_type=mask_type,
        random_seed=random_seed,
        targets=list(targets),
        layout=[list(x) for x in layout],
        epoch=epoch,
        mode=mode,
        sparse=sparse,
    )
    m = guft_lib.quota_oneshot(
        name="shira",
        quota=("rank", r),
        score=MASK_SCORES[mask_type],
        targets=targets,
        layout=layout,
        allocation="per_tensor",
        hparams=hp,
        seed=random_seed,
        epoch=epoch,
        mode=mode,
        sparse=sparse,
    )
    return m._replace(init=checked_init(m.init, targets, "shira.targets"))


def checked_init(init, targets: Sequence[str], field: str):
    """``init`` that first checks every target regex matches a kernel (ValueError naming
    ``field``)."""

    def checked(rng, params):
        ws.target_paths(params, tuple(targets), field=field)
        return init(rng, params)

    return checked
