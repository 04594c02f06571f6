"""The one-shot masks on GUFT's machinery: saliency scores chosen once (magnitude, SNIP, SalUN,
Fisher) and the quota methods with explicit per-tensor budgets (SHiRA, GPS)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from guft_jax import kernels as kernels_lib
from guft_jax import paths
from guft_jax import saliency as sal
from guft_jax.guft.capacity import QUOTA_RULES, quota_budgets
from guft_jax.guft.method import guft, method_of
from guft_jax.guft.schedule import validate_schedule
from guft_jax.guft.state import GuftConfig
from guft_jax.methods.base import Defaults, Info, Method, register

ONESHOT_SCORES = ("magnitude", "snip", "salun", "fisher")


def _oneshot_defaults(score: str) -> Defaults:
    epoch = 1
    return Defaults(
        lr=1e-3,
        head_lr=1e-2,
        kwargs=dict(ratio=0.003, epoch=epoch),
        lr_grid=(0.1, 0.3, 1.0, 3.0, 10.0),
        vtab_kwargs=dict(ratio=0.0034, epoch=epoch),
        dry_kwargs=dict(epoch=1, ratio=0.01),
        step_cost=0.9,
    )


def oneshot(
    *,
    score: str,
    ratio: float = 0.0034,
    epoch: int = 1,
    mode: str = "batch",
    eligible: str = "blocks",
    allocation: str = "global",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sparse: bool = True,
    kernels: kernels_lib.KernelOptions | Mapping | None = None,
) -> Method:
    """A one-shot saliency mask (``magnitude``, ``snip``, ``salun``, ``fisher``): GUFT's machinery
    with a single recompute at the start of ``epoch`` (docs: sparse methods). Default ratio:
    GUFT's final ~0.34%; gradient scores at epoch 1 go through a fitted head (``head_warmup``)."""
    if score not in ONESHOT_SCORES:
        raise ValueError(f"score: {score!r} not in {list(ONESHOT_SCORES)}")
    m = guft(
        recompute_epochs=[epoch],
        ratios=[ratio],
        mode=mode,
        score=score,
        eligible=eligible,
        allocation=allocation,
        include=include,
        exclude=exclude,
        sparse=sparse,
        capacity_slack=1.0,
        kernels=kernels,
        name=score,
    )
    hp = dict(ratio=ratio, epoch=epoch, mode=mode, eligible=eligible, allocation=allocation)
    hp.update(include=list(include) if include else None, sparse=sparse)
    hp.update(exclude=list(exclude) if exclude else None, kernels=m.hparams["kernels"])
    return m._replace(hparams=hp)


ONESHOT_INFO = {
    "magnitude": Info("sparse", "`W0 + δ` on the top-k of `|W0|`, chosen once", "1506.02626"),
    "snip": Info("sparse", "`W0 + δ` on the top-k of `|∇W L ⊙ W0|`, chosen once", "1810.02340"),
    "salun": Info("sparse", "`W0 + δ` on the top-k of `|Σ_b ∇W L_b|`, chosen once", "2310.12508"),
    "fisher": Info("sparse", "`W0 + δ` on the top-k of `Σ_b (∇W L_b)²`, chosen once", "2111.09839"),
}
for _score in ONESHOT_SCORES:
    register(
        _score,
        defaults=_oneshot_defaults(_score),
        fixed={"score": _score},
        info=ONESHOT_INFO[_score],
    )(oneshot)


def quota_oneshot(
    *,
    name: str,
    quota: tuple[str, int],
    score: str,
    targets: Sequence[str],
    layout: Sequence[tuple[str, int]],
    allocation: str,
    hparams: dict,
    seed: int = 0,
    epoch: int = 1,
    mode: str = "batch",
    sparse: bool = True,
) -> Method:
    """A one-shot sparse method with explicit per-tensor budgets (SHiRA, GPS): GUFT's machinery
    (saliency, sparse store, artifacts) with one selection at the start of ``epoch`` over the
    kernels that ``targets`` match, exactly ``quota``'s entries per tensor
    (:func:`guft_jax.guft.quota_budgets`), chosen by ``allocation`` (``"per_tensor"``: the
    tensor's top ``k_t``; ``"per_row"``: the top ``K`` of every output unit). Trained counts are
    that closed form from the shapes.

    Raises:
      ValueError: an unknown ``score``, ``mode``, ``allocation`` or quota rule, a budget below 1,
        or a bad ``epoch`` (naming the field).
    """
    rule, n = quota
    for field, v, allowed in (
        ("score", score, (*sal.SCORES, "random")),
        ("mode", mode, sal.MODES),
        ("allocation", allocation, ("per_tensor", "per_row")),
        ("quota", rule, QUOTA_RULES),
    ):
        if v not in allowed:
            raise ValueError(f"{name}.{field}: {v!r} not in {list(allowed)}")
    if int(n) < 1:
        raise ValueError(f"{name}.{'r' if rule == 'rank' else 'k'}: must be >= 1, got {n}")
    validate_schedule((int(epoch),), (1.0,))
    cfg = GuftConfig(
        recompute_epochs=(int(epoch),),
        ratios=(1.0,),  # (unused: the quotas set the budget)
        mode=mode,
        score=score,
        exclude_selected=False,
        eligible="all",
        allocation=allocation,
        normalize=None,
        include=tuple(targets),
        exclude=None,
        sparse=sparse,
        capacity_slack=1.0,
        capacity_floor=16,
        blocks=True,
        chunk=8,
        head_warmup=True,
        name=name,
        kernels=kernels_lib.resolve(None),
        quota=(rule, int(n)),
        layout=tuple((str(rx), int(d)) for rx, d in layout),
        seed=int(seed),
    )

    def trained(params, trainable=None, state=None):
        quotas, _ = quota_budgets(cfg.name, cfg.quota, cfg.layout, cfg.eligible_of(params))
        return {paths.path_of(k): q for k, q in quotas.items()}

    m = method_of(cfg)
    return m._replace(hparams=hparams, hooks=m.hooks._replace(trained=trained))
