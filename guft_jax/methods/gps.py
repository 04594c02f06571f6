"""GPS: gradient-based parameter selection (Zhang et al., CVPR 2024, arXiv:2312.10136).

Once, before training (at the start of ``epoch``), every output neuron of every targeted kernel
keeps its top-``K`` input connections by accumulated gradient magnitude
``G = Σ_batches |∇_W L|`` over the training set at the pretrained weights; only those entries
train: ``W = W0 + Σ_{(i, j) ∈ S} δ_ij e_i e_jᵀ``, ``δ = 0`` at init (identity at init).

Neurons and connections: in the ``(d_in, d_out)`` view of a kernel (``layout`` rules,
:func:`guft_jax.methods.weight_space.matrix_shape`), output neuron ``j`` is column ``j`` and its
input connections are that column's ``d_in`` entries (the rows of the ``(out, in)`` weight the
paper selects in). The selection is :func:`guft_jax.masks.topk_mask` with
``allocation="per_row"`` and the tensor quota ``K·d_out``: with no excluded entries its
water-filling gives every column exactly ``K``. Order: ``G`` compared as float32 (NaN as -inf);
ties go to the lower input index.

Budget, matched to GUFT's default (3 rounds × 0.1% of its eligible entries): on ViT-B/16 GUFT's
eligible set (the blocks' Dense kernels and biases) has ``12 × 7,084,800 = 85,017,600`` entries,
so ``3 × round(0.001 × 85,017,600) = 255,054`` (≈ 0.30%). GPS selects from the same blocks'
kernels, whose output neurons number ``12 × (4·768 + 3072 + 768) = 82,944``;
``K = 255,054 / 82,944 = 3.08`` rounds to ``K = 3``: ``248,832`` entries (0.29% of the
eligible entries, 2.4% under GUFT's budget; ``K = 4`` would be 30% over). The paper's own
numbers (0.22M on VTAB) are of the same size.

Gradients go through a head fitted on the frozen backbone while the task head is still zero
(GUFT's ``head_warmup``). The paper scores with a supervised-contrastive loss on the pretrained
features; here the task's cross-entropy through that fitted head (a GPS-style batch saliency).
Training, merge and the artifact are GUFT's sparse store (:func:`guft_jax.guft.quota_oneshot`).

Registry defaults: ``k=3`` (above), lr 1e-3 (GUFT's, the same ``W0 + δ`` parametrisation) with a
0.3-10× val grid (as SHiRA), ``k=1`` in the CI dry runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from guft_jax import guft as guft_lib
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, register
from guft_jax.methods.qlora import BLOCK_KERNELS
from guft_jax.methods.shira import checked_init


@register(
    "gps",
    info=Info(
        "sparse",
        "`W0 + δ` on each output neuron's top-K inputs by `Σ|∇W L|`, chosen once",
        "2312.10136",
    ),
    defaults=Defaults(
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(k=3),
        lr_grid=(0.3, 1.0, 3.0, 10.0),
        dry_kwargs=dict(k=1),
        step_cost=0.9,
    ),
)
def gps(
    *,
    k: int = 3,
    targets: Sequence[str] = BLOCK_KERNELS,
    layout: Sequence[tuple[str, int]] = ws.VIT_LAYOUT,
    epoch: int = 1,
    mode: str = "batch",
    sparse: bool = True,
) -> Method:
    """GPS: the top-``k`` input connections of every output neuron (module docstring).

    Args:
      k: connections per output neuron (``K``; default 3, GUFT's budget on ViT-B/16).
      targets: regexes over kernel paths (default: every encoder-block Dense kernel).
      layout: ``(regex, n_in)`` rules giving >2-D kernels their ``(d_in, d_out)`` view.
      epoch: the 1-indexed epoch at whose start the connections are chosen.
      mode: saliency mode (``"batch"`` as the paper, or ``"example"``).
      sparse: GUFT's sparse store (default) or the dense reference path (as
        :func:`guft_jax.methods.shira.shira`).

    Raises:
      ValueError: ``k < 1`` or an unknown ``mode``; at init, a target regex matching no kernel;
        at selection, ``k`` above a kernel's ``d_in``.

    >>> m = gps(k=3)
    """
    hp = dict(k=k, targets=list(targets), layout=[list(x) for x in layout], epoch=epoch, mode=mode)
    hp["sparse"] = sparse
    m = guft_lib.quota_oneshot(
        name="gps",
        quota=("row", k),
        score="guft",
        targets=targets,
        layout=layout,
        allocation="per_row",
        hparams=hp,
        epoch=epoch,
        mode=mode,
        sparse=sparse,
    )
    return m._replace(init=checked_init(m.init, targets, "gps.targets"))
