"""LoSiA and LoSiA-Pro: subnet localisation and optimisation (arXiv:2507.04487).

Wang, Qi, Xu, "LoSiA: Efficient High-Rank Fine-Tuning via Subnet Localization and Optimization"
(EMNLP 2025, arXiv:2507.04487); official code KlozeWang/LoSiA (``losia_torch``,
``peft_pretraining/losia_pro.py``).

Per target weight matrix (default: every Dense kernel of the encoder blocks, in its 2-D
``(in, out)`` view, :func:`guft_jax.vit.kernel_as_matrix`) a dense subnet of ``⌊p·in⌋ × ⌊p·out⌋``
entries (``p = ratio = 1/8``) trains: rows (input units) ``R``, columns (output units) ``C`` and
a block ``B`` of values, the effective matrix being ``W0`` with ``B`` added at ``R × C``
(``W0.at[R[:, None], C[None, :]].add(B)``). The trainable tree is the blocks and the head; the
indices are method state of static size, so relocalising changes indices, never shapes (one
trace, optimizer state ∝ the subnets).

Importance and relocalisation (the official ``LoSiAProjector.record`` / ``reframing``):

- With ``x = θ ⊙ g`` (``θ`` the layer's current effective matrix before the update, ``g`` its
  dense gradient): ``I = |x − ½x²|``, ``Ī ← β1·Ī + (1−β1)·I``, ``Ū ← β2·Ū + (1−β2)·|I − Ī|``
  (β1 = β2 = 0.85), score ``Ī ⊙ Ū``.
- Asynchronous periodic localisation: with ``T = period`` and ``L`` the number of encoder blocks
  holding targets, the block at slot position ``l`` records importance during steps with
  ``(step // T) mod L == l`` and relocalises at the slot's last step. Every matrix of that layer
  then gets the greedy subnet of its score: the best (largest score sum over the block) of
  *independent* (top rows by row sum, top columns by column sum), *rows then columns* (columns by
  their sum within the chosen rows) and *columns then rows* (:func:`greedy_subnet`); ties keep
  that order, as the official code does. The score buffers are reset.
- On relocalisation that layer's Adam moments (the ``mu``/``nu`` leaves of ``opt_state`` that
  mirror its blocks) are set to exactly zero and its learning rate re-warms linearly over ``T``
  steps: the step hook rescales the layer's update, ``new = prev + s·(new − prev)`` with
  ``s = min(1, (step − r)/T)``, ``r`` the first step after the relocalisation (``s = 0`` there,
  as the official ``cosine_restarts`` schedule gives lr 0 on the step after a restart). The
  update is proportional to the learning rate (AdamW's decay included), so this is exactly a
  learning rate of ``s ×`` the engine's schedule.

Where the learned delta goes on relocalisation. The official code trains the full weight in
place, so a retired subnet's delta simply stays in the weight. Keeping a dense "merged so far"
copy here would cost a full copy of the encoder's kernels. Instead the retired block (its
indices and values) moves into a frozen per-matrix ring of ``history`` retired blocks in the
method state (``history·p²`` of the matrix each), the new block starts at zero, and the effective
matrix is ``W0 + Σ retired + B``: relocalisation leaves the model's function unchanged, as in
the official code. A run that relocalises a layer more than ``history`` times overwrites that
layer's oldest retired block (its delta is lost); ``history ≥ ⌈steps / (T·L)⌉`` keeps every
delta (the VTAB-1K protocol, 1,200 steps with T = 100 and 12 blocks, relocalises each layer once).
``history=0`` keeps only the values at retained ``(row, col)`` pairs (copied into the new block).

The products: both methods replace ``vit.Linear.matmul`` of every target through a flax
interceptor by :func:`guft_jax.methods.losia_ops.subnet_matmul` (``y = x @ W``, a custom VJP: the
dense ``xᵀ dy`` read at the block for LoSiA, only the block's ``x[:, R]ᵀ dy[:, C]`` for
LoSiA-Pro); :mod:`guft_jax.methods.losia_ops` says why and what it costs.

Deviations (each forced by the engine's interface or a documented choice):

- The dense gradient of the recording layer reaches the step hook through a zero "probe" leaf
  per matrix type in the trainable tree (shared by the layers): :func:`subnet_matmul` gives it
  the layer's ``xᵀ dy`` when that layer records, zeros otherwise, and never reads its value.
  ``update_mask`` keeps it bitwise zero and its Adam moments zero, but the engine's optimizer
  still allocates those moments: 2 × one encoder block's kernels (the official code allocates a
  similar 3 × for its importance buffers). The importance buffers ``Ī``, ``Ū`` are one per
  matrix type (one layer records at a time).
- LoSiA-Pro saves only ``x[:, R]`` from the forward when ``relocalize=False``. With
  relocalisation on, the recording layer is a traced index (one trace per run), so every layer's
  product keeps ``x`` (the official code switches the recording layer to a full-input save, a
  data-dependent shape JAX cannot trace); the weight-gradient FLOPs are still cut.
- The cosine envelope is the engine's schedule (``optim.schedule``: warm-up, cosine to 0); the
  official minimum lr ratio 0.1 is not reproduced, because the step hook sees neither the
  engine's warm-up length nor its lr, and amplifying an update to lift a decayed lr would
  amplify the rounding error of ``new − prev``. During a re-warm the ramp multiplies the current
  envelope (the official code holds the envelope at its value at the restart).
- AdamW's decoupled weight decay acts on the block (pulling ``W`` toward ``W0 + Σ retired``); the
  official code decays the full weight's block entries toward 0.
- Initial subnets are random (as the official ``randperm``), drawn from ``seed`` because
  ``init_state`` receives no PRNG key.
- Only the encoder kernels use subnets; the head trains in full, biases/norms/embeddings stay
  frozen (the official code also applies LoSiA to the LM head's output rows, which a ViT head of
  a few classes does not need).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from guft_jax import paths
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, register
from guft_jax.methods.losia_artifact import losia_load, losia_payload
from guft_jax.methods.losia_layout import (
    BLOCK_RE,
    DEFAULT_TARGETS,
    LosiaConfig,
    LosiaState,
    kind_dims,
    layer_count,
    matrix_of,
    retired_of,
)
from guft_jax.methods.losia_ops import effective_matrix, subnet_matmul
from guft_jax.methods.losia_select import carry_retained, greedy_subnet, importance
from guft_jax.methods.losia_step import reset_moments, step

__all__ = [
    "DEFAULT_TARGETS",
    "LosiaConfig",
    "LosiaState",
    "carry_retained",
    "effective_matrix",
    "greedy_subnet",
    "importance",
    "losia",
    "reset_moments",
    "subnet_matmul",
]


def _zeros(shape, dtype=np.float32):
    return jnp.asarray(np.zeros(shape, dtype))  # no per-shape compile of a fill op


def _init(cfg: LosiaConfig, rng, params):
    del rng  # the initial subnets are state (init_state), drawn from cfg.seed
    lay = cfg.layout(params)
    out = {"head": params["head"], "blocks": {t.key: _zeros(t.sub) for t in lay}}
    if cfg.relocalize:
        out["probe"] = {k: _zeros(d) for k, d in kind_dims(lay).items()}
    return out


def _init_state(cfg: LosiaConfig, params, trainable) -> LosiaState:
    del trainable
    lay = cfg.layout(params)
    rows, cols, rr, rc, rv = {}, {}, {}, {}, {}
    for i, t in enumerate(lay):
        # The official random initial subnets (torch.randperm); numpy: cheap, and the same on
        # every backend.
        rng = np.random.default_rng([cfg.seed, i])
        (din, dout), (kr, kc) = t.dims, t.sub
        rows[t.key] = jnp.asarray(np.sort(rng.permutation(din)[:kr]).astype(np.int32))
        cols[t.key] = jnp.asarray(np.sort(rng.permutation(dout)[:kc]).astype(np.int32))
        rr[t.key] = jnp.asarray(np.full((cfg.history, kr), din, np.int32))
        rc[t.key] = _zeros((cfg.history, kc), np.int32)
        rv[t.key] = _zeros((cfg.history, kr, kc))
    kinds = kind_dims(lay) if cfg.relocalize else {}
    n = layer_count(lay)
    return LosiaState(
        rows=rows,
        cols=cols,
        res_rows=rr,
        res_cols=rc,
        res_vals=rv,
        imp={k: _zeros(d) for k, d in kinds.items()},
        unc={k: _zeros(d) for k, d in kinds.items()},
        restart=jnp.asarray(np.full((n,), -cfg.period, np.int32)),
        relocs=_zeros((n,), np.int32),
        count=jnp.asarray(np.int32(0)),
    )


def _need_state(cfg: LosiaConfig, state, what: str):
    if state is None or not hasattr(state, "rows"):
        raise ValueError(f"{cfg.name}.{what}: needs the method state (the subnet indices)")


def _apply(cfg: LosiaConfig, params, trainable, state=None, rng=None):
    """The frozen params with the new head: every target kernel goes through the interceptor
    (:func:`subnet_matmul`), which adds the subnets."""
    del rng
    _need_state(cfg, state, "apply")
    return {"params": {**params, "head": trainable["head"]}}


def _intercept(cfg: LosiaConfig, trainable, state, rng=None):
    del rng
    _need_state(cfg, state, "intercept")
    keys = list(trainable["blocks"])
    layers = sorted({int(BLOCK_RE.search(paths.path_of(k)).group(1)) for k in keys})
    rec = cfg.recording(state.count, len(layers))
    table = {}
    for k in keys:
        p = paths.path_of(k)
        m = BLOCK_RE.search(p)
        kind = paths.key_of(p[m.end() :].removesuffix("/kernel"))
        table[tuple(p.split("/")[:-1])] = (k, layers.index(int(m.group(1))), kind)

    def icpt(next_fun, args, kwargs, context):
        hit = table.get(tuple(context.module.path)) if context.method_name == "matmul" else None
        if hit is None:
            return next_fun(*args, **kwargs)
        x, w = args
        k, pos, kind = hit
        return subnet_matmul(
            x,
            w,
            state.rows[k],
            state.cols[k],
            trainable["blocks"][k],
            retired_of(state, k),
            probe=trainable["probe"][kind] if cfg.relocalize else None,
            record=rec == pos,
            dense_grad=not cfg.pro,
        )

    return icpt


def _merge(cfg: LosiaConfig, params, trainable, state=None):
    _need_state(cfg, state, "merge")
    upd = {}
    for t in cfg.layout(params):
        upd[t.path] = matrix_of(params, t, trainable["blocks"], state).reshape(
            paths.get(params, t.path).shape
        )
    return {**paths.replaced(params, upd), "head": trainable["head"]}


def _export(cfg: LosiaConfig, params, trainable, state=None) -> dict[str, np.ndarray]:
    _need_state(cfg, state, "export")
    return losia_payload(cfg.layout(params), trainable, state)


def _load(cfg: LosiaConfig, params, arrays: dict) -> dict:
    return losia_load(cfg.name, cfg.layout(params), params, arrays)


def _trained(cfg: LosiaConfig, params, trainable, state=None):
    del cfg, params, state
    return {paths.path_of(k): int(math.prod(v.shape)) for k, v in trainable["blocks"].items()}


# ----------------------------------------------------------------------------- factory


def _method(cfg: LosiaConfig) -> Method:
    f = functools.partial
    hooks = MethodHooks(
        init_state=f(_init_state, cfg),
        update_mask=(lambda st: {"head": True, "blocks": True, "probe": False})
        if cfg.relocalize
        else None,
        step=f(step, cfg),
        intercept=f(_intercept, cfg),
        trained=f(_trained, cfg),
        export=f(_export, cfg),
        load=f(_load, cfg),
    )
    return Method(
        name=cfg.name,
        init=f(_init, cfg),
        apply=f(_apply, cfg),
        hparams=cfg.hparams(),
        merge=f(_merge, cfg),
        hooks=hooks,
    )


def _defaults(step_cost: float) -> Defaults:
    # Set before any run (not tuned): LoSiA trains dense blocks of ~1.6% of the encoder weights,
    # between full fine-tuning (1e-4) and the sparse methods (1e-3) in how many weights move.
    return Defaults(
        lr=5e-4,
        head_lr=1e-2,
        kwargs=dict(ratio=0.125, period=100),
        lr_grid=(0.3, 1.0, 3.0),
        vtab_kwargs=dict(ratio=0.125, period=100),
        dry_kwargs=dict(period=2),
        step_cost=step_cost,
    )


def losia(
    *,
    ratio: float = 0.125,
    period: int = 100,
    beta1: float = 0.85,
    beta2: float = 0.85,
    history: int = 4,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    seed: int = 0,
    relocalize: bool = True,
    pro: bool = False,
) -> Method:
    """LoSiA (``pro=False``) or LoSiA-Pro (``pro=True``) as a :class:`Method` (module docstring).

    Args:
      ratio: ``p``, the subnet's fraction of rows and of columns of each matrix (1/8).
      period: ``T``, steps per layer slot (record importance, then relocalise; re-warm length).
      beta1, beta2: EMA factors of the importance ``Ī`` and its uncertainty ``Ū``.
      history: retired blocks kept per matrix (0: keep only values at retained pairs).
      targets: regexes over kernel paths (each an encoder-block kernel).
      seed: the initial random subnets.
      relocalize: False keeps the initial subnets (no importance, no probe; an ablation).
      pro: LoSiA-Pro's block-only weight gradient (registered as ``losia_pro``).

    Raises:
      ValueError: a hyperparameter out of range, or targets that are not encoder-block kernels.

    >>> m = losia(ratio=0.125, period=100)
    >>> tr = m.init(jax.random.PRNGKey(0), params)  # doctest: +SKIP
    """
    name = "losia_pro" if pro else "losia"
    if not 0 < ratio <= 1:
        raise ValueError(f"{name}.ratio: must be in (0, 1], got {ratio}")
    if int(period) < 1:
        raise ValueError(f"{name}.period: must be >= 1, got {period}")
    for field, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= b < 1:
            raise ValueError(f"{name}.{field}: must be in [0, 1), got {b}")
    if int(history) < 0:
        raise ValueError(f"{name}.history: must be >= 0, got {history}")
    if isinstance(targets, str):
        targets = (targets,)
    cfg = LosiaConfig(
        ratio=float(ratio),
        period=int(period),
        beta1=float(beta1),
        beta2=float(beta2),
        history=int(history),
        targets=tuple(targets),
        seed=int(seed),
        relocalize=bool(relocalize),
        pro=bool(pro),
        name=name,
    )
    return _method(cfg)


_INFO = "a dense sub-block per matrix, relocalised per layer on a slot schedule"
register(
    "losia",
    defaults=_defaults(0.95),
    fixed={"pro": False},
    info=Info("sparse", _INFO, "2507.04487"),
)(losia)
register(
    "losia_pro",
    defaults=_defaults(0.75),
    fixed={"pro": True},
    info=Info("sparse", _INFO + "; block-only weight gradient", "2507.04487"),
)(losia)
