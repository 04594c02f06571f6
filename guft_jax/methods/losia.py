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

The products. Both methods leave the frozen params as they are (``apply`` only swaps in the
head) and replace ``vit.Linear.matmul`` of every target through a flax interceptor by
:func:`subnet_matmul`, ``y = x @ W`` with a custom VJP: ``dx = dy @ Wᵀ`` exactly, and

- LoSiA (``losia``): the dense weight gradient ``xᵀ dy`` of every layer (what autograd's full
  ``p.grad`` costs in the official code), read at the block;
- LoSiA-Pro (``losia_pro``, the official ``SelectiveLinearFunction``): only the block's,
  ``dB = x[:, R]ᵀ @ dy[:, C]`` (``(in, out)`` orientation: rows index ``x``'s features),
  ``2·tokens·p²·in·out`` instead of ``2·tokens·in·out`` FLOPs, and the dense ``xᵀ dy`` only
  for the layer that records importance (``lax.cond``).

The effective matrix is rebuilt by one scatter in the forward and again in the backward (no
dense copy is held between them). A custom VJP rather than autodiff through merged kernels for
LoSiA too: with the latter, XLA:CPU wrote each MLP gradient transposed (a slow strided copy per
layer), and the step cost 1.27× full fine-tuning's; with the custom VJP it costs less than full
fine-tuning's (``benchmarks/losia_bench.py``).

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

import dataclasses
import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import paths
from guft_jax.methods.base import (
    ArtifactMismatchError,
    Defaults,
    Info,
    Method,
    MethodHooks,
    StepInfo,
    register,
)
from guft_jax.vit import kernel_as_matrix

DEFAULT_TARGETS = (r"^Transformer/encoderblock_\d+/.+/kernel$",)
PREFIX = "losia/"  # artifact array names: losia/{kernel path}/{rows,cols,values}
_BLOCK = re.compile(r"(?:^|/)encoderblock_(\d+)/")


class LosiaState(NamedTuple):
    """LoSiA's method state (checkpointed). Dict keys are ``paths.key_of`` of kernel paths
    (``rows`` … ``res_vals``) or of the matrix type (``imp``, ``unc``: the path below
    ``encoderblock_i``).

    - ``rows``, ``cols``: the current subnet's input / output units, ``(kr,)`` / ``(kc,)`` int32.
    - ``res_rows``, ``res_cols``, ``res_vals``: the ring of retired blocks, ``(H, kr)``,
      ``(H, kc)``, ``(H, kr, kc)``; an empty slot has rows equal to ``in`` (dropped).
    - ``imp``, ``unc``: ``Ī`` and ``Ū`` of the recording layer, ``(in, out)`` per matrix type.
    - ``restart``: ``(L,)`` int32, the step at which each layer's re-warm began (``-T``: none).
    - ``relocs``: ``(L,)`` int32, relocalisations done per layer.
    - ``count``: steps done; ``(count // T) mod L`` is the layer recording in the next forward.
    """

    rows: dict
    cols: dict
    res_rows: dict
    res_cols: dict
    res_vals: dict
    imp: dict
    unc: dict
    restart: jax.Array
    relocs: jax.Array
    count: jax.Array


class _Target(NamedTuple):
    key: str  # paths.key_of(kernel path)
    path: str  # kernel path
    pos: int  # slot position of its encoder block (0..L-1)
    kind: str  # matrix type key, shared by the blocks
    dims: tuple[int, int]  # (in, out) of the 2-D view
    sub: tuple[int, int]  # (kr, kc)


@dataclasses.dataclass(frozen=True)
class LosiaConfig:
    ratio: float
    period: int
    beta1: float
    beta2: float
    history: int
    targets: tuple[str, ...]
    seed: int
    relocalize: bool
    pro: bool
    name: str

    def hparams(self) -> dict:
        return dict(
            ratio=self.ratio,
            period=self.period,
            beta1=self.beta1,
            beta2=self.beta2,
            history=self.history,
            targets=list(self.targets),
            seed=self.seed,
            relocalize=self.relocalize,
        )

    def sub(self, n: int) -> int:
        return max(1, int(self.ratio * n))  # the official int(rank_factor * dim)

    def layout(self, params) -> list[_Target]:
        """The targets (works on abstract params): kernels matched by ``targets``, each under an
        ``encoderblock_i``, with the same 2-D shape for the same matrix type."""
        field = f"{self.name}.targets"
        mask = paths.select(params, list(self.targets), [r"^head/"], field=field)
        found = [paths.key_to_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m]
        bad = [p for p in found if not p.endswith("/kernel") or not _BLOCK.search(p)]
        if bad:
            raise ValueError(f"{field}: targets must be encoder-block kernels, got {bad[:4]}")
        layers = sorted({int(_BLOCK.search(p).group(1)) for p in found})
        out, kinds = [], {}
        for p in found:
            m = _BLOCK.search(p)
            kind = paths.key_of(p[m.end() :].removesuffix("/kernel"))
            leaf = paths.get(params, p)
            view = jax.eval_shape(lambda k, p=p: kernel_as_matrix(k, p), leaf)
            dims = tuple(int(d) for d in view.shape)
            if kinds.setdefault(kind, dims) != dims:
                raise ValueError(f"{field}: {kind} has shapes {kinds[kind]} and {dims}")
            sub = (self.sub(dims[0]), self.sub(dims[1]))
            out.append(_Target(paths.key_of(p), p, layers.index(int(m.group(1))), kind, dims, sub))
        return out


def _num_layers(layout: list[_Target]) -> int:
    return 1 + max(t.pos for t in layout)


def _kinds(layout: list[_Target]) -> dict[str, tuple[int, int]]:
    return {t.kind: t.dims for t in layout}


# ----------------------------------------------------------------------------- subnet search


def _block_sum(score: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    return jnp.sum(score[rows[:, None], cols[None, :]])


def greedy_subnet(score: jax.Array, kr: int, kc: int) -> tuple[jax.Array, jax.Array]:
    """The LoSiA subnet of a non-negative ``(in, out)`` score: ``(rows, cols)``, sorted int32.

    The best, by the score summed over the ``kr × kc`` block, of three greedy candidates (the
    official ``PureGreedy``, ``Row2Column``, ``Column2Row``): top rows by row sum and top columns
    by column sum independently; top rows, then top columns by their sum within those rows; top
    columns, then top rows within them. Ties go to the earlier candidate and, within ``top_k``,
    to the lower index. Exact when the score is rank one (``u vᵀ``, ``u, v ≥ 0``).

    >>> s = jnp.outer(jnp.array([0.0, 3.0, 1.0]), jnp.array([2.0, 0.0, 5.0, 1.0]))
    >>> [a.tolist() for a in greedy_subnet(s, 1, 2)]
    [[1], [0, 2]]
    """
    top = lambda v, k: jax.lax.top_k(v, k)[1].astype(jnp.int32)
    ra, ca = top(jnp.sum(score, 1), kr), top(jnp.sum(score, 0), kc)
    cb = top(jnp.sum(score[ra], 0), kc)
    rc = top(jnp.sum(score[:, ca], 1), kr)
    rows, cols = jnp.stack([ra, ra, rc]), jnp.stack([ca, cb, ca])
    sums = jnp.stack([_block_sum(score, r, c) for r, c in zip(rows, cols, strict=True)])
    best = jnp.argmax(sums)  # first maximum: the official order breaks ties
    return jnp.sort(rows[best]), jnp.sort(cols[best])


def importance(theta: jax.Array, grad: jax.Array) -> jax.Array:
    """``|x − ½x²|`` with ``x = θ ⊙ g`` (the official ``param_mix`` Taylor score), float32."""
    x = theta.astype(jnp.float32) * grad.astype(jnp.float32)
    return jnp.abs(x - 0.5 * x * x)


# ----------------------------------------------------------------------------- effective weights


def effective_matrix(w0, rows, cols, block, res_rows=None, res_cols=None, res_vals=None):
    """``w0`` (an ``(in, out)`` matrix) with each retired block and ``block`` added at its
    ``rows × cols``, in one scatter-add (rows equal to ``in`` mark an empty retired slot and are
    dropped). The one definition that the forward, ``merge`` and artifact loading share: with
    the same ring shape they give bitwise equal matrices."""
    block = block.astype(w0.dtype)
    if res_rows is None or res_rows.shape[0] == 0:
        return w0.at[rows[:, None], cols[None, :]].add(block, mode="drop")
    r = jnp.concatenate([res_rows, rows[None]])[:, :, None]
    c = jnp.concatenate([res_cols, cols[None]])[:, None, :]
    v = jnp.concatenate([res_vals.astype(w0.dtype), block[None]])
    shape = v.shape
    return w0.at[jnp.broadcast_to(r, shape), jnp.broadcast_to(c, shape)].add(v, mode="drop")


def _dims_in(x):
    return x.reshape(-1, x.shape[-1])


# The backward's form, a static ``(dense, tap)``: ``dense`` computes the full ``xᵀ dy`` of every
# call and reads the block from it (LoSiA: autograd's full weight gradient in the official code),
# otherwise only ``x[:, R]ᵀ dy[:, C]`` (LoSiA-Pro); ``tap``: a probe receives ``xᵀ dy`` when
# ``record`` (else zeros). Only LoSiA-Pro without a probe saves ``x[:, R]`` instead of ``x``.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _subnet_matmul(form, x, w0, rows, cols, block, retired, probe, record):
    del form, probe, record
    return x @ effective_matrix(w0, rows, cols, block, *retired)


def _subnet_fwd(form, x, w0, rows, cols, block, retired, probe, record):
    dense, tap = form
    y = x @ effective_matrix(w0, rows, cols, block, *retired)
    saved = x if dense or tap else jnp.take(x, rows, axis=-1)
    return y, (saved, w0, rows, cols, block, retired, record)


def _subnet_bwd(form, res, dy):
    dense, tap = form
    saved, w0, rows, cols, block, retired, record = res
    dx = (dy @ effective_matrix(w0, rows, cols, block, *retired).T).astype(saved.dtype)
    dy2 = _dims_in(dy)
    contract = (((0,), (0,)), ((), ()))
    full = lambda: jax.lax.dot_general(
        _dims_in(saved), dy2, contract, preferred_element_type=jnp.float32
    )
    dprobe = None
    if dense:
        dw = full()
        dblock = dw[rows[:, None], cols[None, :]]
        if tap:
            dprobe = jnp.where(record, dw, 0.0)
    else:
        xr = _dims_in(jnp.take(saved, rows, axis=-1) if tap else saved)
        dblock = jax.lax.dot_general(
            xr, jnp.take(dy2, cols, axis=-1), contract, preferred_element_type=jnp.float32
        )
        if tap:
            dprobe = jax.lax.cond(record, full, lambda: jnp.zeros(w0.shape, jnp.float32))
    dblock = dblock.astype(block.dtype)
    return dx, None, None, None, dblock, (None,) * len(retired), dprobe, None


_subnet_matmul.defvjp(_subnet_fwd, _subnet_bwd)


def subnet_matmul(
    x: jax.Array,
    w0: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    block: jax.Array,
    retired: tuple = (),
    *,
    probe: jax.Array | None = None,
    record: jax.Array | bool = False,
    dense_grad: bool = False,
) -> jax.Array:
    """LoSiA-Pro's product ``x @ W`` with ``W = effective_matrix(w0, rows, cols, block,
    *retired)`` and a custom VJP (the official ``SelectiveLinearFunction``).

    The backward gives ``dx = dy @ Wᵀ`` (exact), ``d block = x[:, rows]ᵀ @ dy[:, cols]``
    (float32 accumulation), no gradient for ``w0``, the indices or the retired blocks, and, when
    ``probe`` is given, ``d probe = xᵀ dy`` if ``record`` else zeros (a dense-gradient tap: the
    probe's value is not used in the forward). Without a probe only ``x[:, rows]`` is saved for
    the backward; with one, ``x``.

    Args:
      x: ``(..., in)`` activations.
      w0: ``(in, out)`` frozen matrix.
      rows, cols: ``(kr,)``, ``(kc,)`` int32 subnet indices.
      block: ``(kr, kc)`` trainable values.
      retired: ``()`` or ``(res_rows (H, kr), res_cols (H, kc), res_vals (H, kr, kc))``.
      probe: optional ``(in, out)`` leaf whose cotangent receives the dense weight gradient.
      record: traced bool: whether this product's dense gradient goes to ``probe``.

    >>> x, w0 = jnp.ones((2, 4)), jnp.zeros((4, 3))
    >>> y = subnet_matmul(x, w0, jnp.array([1]), jnp.array([2]), jnp.full((1, 1), 5.0))
    >>> y[0].tolist()
    [0.0, 0.0, 5.0]
    """
    if w0.ndim != 2 or x.shape[-1] != w0.shape[0]:
        raise ValueError(f"x {x.shape} @ w0 {w0.shape}: need w0 (in, out) with in = x.shape[-1]")
    if block.shape != rows.shape + cols.shape:
        raise ValueError(f"block {block.shape} != rows {rows.shape} x cols {cols.shape}")
    form = (bool(dense_grad), probe is not None)
    probe = jnp.zeros((0,), jnp.float32) if probe is None else probe
    record = jnp.asarray(record, bool)
    return _subnet_matmul(form, x, w0, rows, cols, block, tuple(retired), probe, record)


# ----------------------------------------------------------------------------- the method


def _zeros(shape, dtype=np.float32):
    return jnp.asarray(np.zeros(shape, dtype))  # no per-shape compile of a fill op


def _init(cfg: LosiaConfig, rng, params):
    del rng  # the initial subnets are state (init_state), drawn from cfg.seed
    lay = cfg.layout(params)
    out = {"head": params["head"], "blocks": {t.key: _zeros(t.sub) for t in lay}}
    if cfg.relocalize:
        out["probe"] = {k: _zeros(d) for k, d in _kinds(lay).items()}
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
    kinds = _kinds(lay) if cfg.relocalize else {}
    n = _num_layers(lay)
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


def _recording(cfg: LosiaConfig, count, num_layers: int):
    return (count // cfg.period) % num_layers


def _retired(state: LosiaState, key: str) -> tuple:
    return (state.res_rows[key], state.res_cols[key], state.res_vals[key])


def _matrix(params, t: _Target, blocks, state: LosiaState):
    return effective_matrix(*_operands(params, t, blocks, state))


def _operands(params, t: _Target, blocks, state: LosiaState) -> tuple:
    """The arguments of :func:`effective_matrix` for target ``t``."""
    w0 = kernel_as_matrix(paths.get(params, t.path), t.path)
    k = t.key
    return (w0, state.rows[k], state.cols[k], blocks[k], *_retired(state, k))


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
    layers = sorted({int(_BLOCK.search(paths.path_of(k)).group(1)) for k in keys})
    rec = _recording(cfg, state.count, len(layers))
    table = {}
    for k in keys:
        p = paths.path_of(k)
        m = _BLOCK.search(p)
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
            _retired(state, k),
            probe=trainable["probe"][kind] if cfg.relocalize else None,
            record=rec == pos,
            dense_grad=not cfg.pro,
        )

    return icpt


def _merge(cfg: LosiaConfig, params, trainable, state=None):
    _need_state(cfg, state, "merge")
    upd = {}
    for t in cfg.layout(params):
        upd[t.path] = _matrix(params, t, trainable["blocks"], state).reshape(
            paths.get(params, t.path).shape
        )
    return {**paths.replaced(params, upd), "head": trainable["head"]}


def _is_block_leaf(path: str, key: str) -> bool:
    return path == f"blocks/{key}" or path.endswith(f"/blocks/{key}")


def reset_moments(opt_state, keys_reset: dict[str, jax.Array]):
    """``opt_state`` with every leaf that mirrors ``blocks/{key}`` (Adam's ``mu``, ``nu``; count
    scalars never match) set to exactly zero where ``keys_reset[key]`` (a traced bool) holds."""

    def fix(p, x):
        path = paths.key_to_str(p)
        for key, do in keys_reset.items():
            if getattr(x, "ndim", 0) == 2 and _is_block_leaf(path, key):
                return jnp.where(do, jnp.zeros_like(x), x)
        return x

    return jax.tree_util.tree_map_with_path(fix, opt_state)


def _carry_retained(old_rows, old_cols, block, new_rows, new_cols):
    """``block`` re-indexed to the new subnet: values at ``(row, col)`` pairs in both, else 0."""
    hit_r = new_rows[:, None] == old_rows[None, :]
    hit_c = new_cols[:, None] == old_cols[None, :]
    ir, ic = jnp.argmax(hit_r, 1), jnp.argmax(hit_c, 1)
    keep = jnp.any(hit_r, 1)[:, None] & jnp.any(hit_c, 1)[None, :]
    return jnp.where(keep, block[ir[:, None], ic[None, :]], jnp.zeros_like(block))


def _step(cfg: LosiaConfig, info: StepInfo):
    lay = cfg.layout(info.params)
    n, T = _num_layers(lay), cfg.period
    st = info.state
    t = st.count  # the step the forward used (== info.step in the engine)
    rec = _recording(cfg, t, n)
    # Re-warm: scale each layer's update by s = min(1, (t - restart) / T).
    s = jnp.clip((t - st.restart).astype(jnp.float32) / T, 0.0, 1.0)
    blocks = {}
    for tg in lay:
        new, old = info.trainable["blocks"][tg.key], info.prev_trainable["blocks"][tg.key]
        sl = s[tg.pos]
        blocks[tg.key] = jnp.where(sl >= 1.0, new, old + (sl * (new - old)).astype(new.dtype))
    trainable = {**info.trainable, "blocks": blocks}
    if not cfg.relocalize:
        return trainable, info.opt_state, st._replace(count=t + 1)

    # Importance of the recording layer (θ before this update), one buffer per matrix type.
    prev = info.prev_trainable["blocks"]
    imp, unc = {}, {}
    for kind in _kinds(lay):
        members = sorted((tg for tg in lay if tg.kind == kind), key=lambda tg: tg.pos)
        pos_of = jnp.asarray([tg.pos for tg in members], jnp.int32)
        which = jnp.argmax(pos_of == rec)  # the member whose layer records
        # The switch only selects that layer's operands; one scatter builds its matrix.
        branches = [functools.partial(_operands, info.params, tg, prev, st) for tg in members]
        ops = jax.lax.switch(which, branches) if len(branches) > 1 else branches[0]()
        theta = effective_matrix(*ops)
        i_now = importance(theta, info.grads["probe"][kind])
        ib = cfg.beta1 * st.imp[kind] + (1 - cfg.beta1) * i_now
        ub = cfg.beta2 * st.unc[kind] + (1 - cfg.beta2) * jnp.abs(i_now - ib)
        imp[kind], unc[kind] = ib, ub

    is_end = (t % T) == T - 1
    subs = {tg.kind: tg.sub for tg in lay}

    def relocate():
        return {k: greedy_subnet(imp[k] * unc[k], *subs[k]) for k in imp}

    def keep():
        return {
            k: (jnp.zeros((subs[k][0],), jnp.int32), jnp.zeros((subs[k][1],), jnp.int32))
            for k in imp
        }

    chosen = jax.lax.cond(is_end, relocate, keep)
    do_layer = is_end & (jnp.arange(n) == rec)  # (L,)

    rows, cols, rr, rc, rv = (
        dict(x) for x in (st.rows, st.cols, st.res_rows, st.res_cols, st.res_vals)
    )
    resets = {}
    for tg in lay:
        k, do = tg.key, do_layer[tg.pos]
        new_r, new_c = chosen[tg.kind]
        old_r, old_c, b = st.rows[k], st.cols[k], blocks[k]
        if cfg.history > 0:
            slot = st.relocs[tg.pos] % cfg.history
            put = lambda ring, v, slot=slot, do=do: jnp.where(
                do, jax.lax.dynamic_update_index_in_dim(ring, v, slot, 0), ring
            )
            rr[k], rc[k], rv[k] = put(rr[k], old_r), put(rc[k], old_c), put(rv[k], b)
            fresh = jnp.zeros_like(b)
        else:
            fresh = _carry_retained(old_r, old_c, b, new_r, new_c)
        blocks[k] = jnp.where(do, fresh, b)
        rows[k] = jnp.where(do, new_r, old_r)
        cols[k] = jnp.where(do, new_c, old_c)
        resets[k] = do
    opt_state = reset_moments(info.opt_state, resets)
    zero = lambda d: {k: jnp.where(is_end, jnp.zeros_like(v), v) for k, v in d.items()}
    state = LosiaState(
        rows=rows,
        cols=cols,
        res_rows=rr,
        res_cols=rc,
        res_vals=rv,
        imp=zero(imp),
        unc=zero(unc),
        restart=jnp.where(do_layer, t + 1, st.restart),
        relocs=st.relocs + do_layer.astype(jnp.int32),
        count=t + 1,
    )
    return {**trainable, "blocks": blocks}, opt_state, state


def _trained(cfg: LosiaConfig, params, trainable, state=None):
    del cfg, params, state
    return {paths.path_of(k): int(math.prod(v.shape)) for k, v in trainable["blocks"].items()}


# ----------------------------------------------------------------------------- artifacts


def _export(cfg: LosiaConfig, params, trainable, state=None) -> dict[str, np.ndarray]:
    """``head/...`` and per target ``losia/{path}/rows (n, kr)``, ``cols (n, kc)``, ``values
    (n, kr, kc)``: the non-empty retired blocks in ring order, then the current block."""
    _need_state(cfg, state, "export")
    out = {
        f"head/{paths.key_to_str(p)}": np.ascontiguousarray(np.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(trainable["head"])[0]
    }
    for t in cfg.layout(params):
        k = t.key
        rr, rc, rv = (np.asarray(a) for a in _retired(state, k))
        used = [h for h in range(rr.shape[0]) if rr[h, 0] < t.dims[0]]
        rows = [rr[h] for h in used] + [np.asarray(state.rows[k])]
        cols = [rc[h] for h in used] + [np.asarray(state.cols[k])]
        vals = [rv[h] for h in used] + [np.asarray(trainable["blocks"][k])]
        out[f"{PREFIX}{t.path}/rows"] = np.stack(rows).astype(np.int32)
        out[f"{PREFIX}{t.path}/cols"] = np.stack(cols).astype(np.int32)
        out[f"{PREFIX}{t.path}/values"] = np.stack(vals).astype(np.float32)
    return out


def _load(cfg: LosiaConfig, params, arrays: dict) -> dict:
    """Plain merged params from an artifact payload (strict: every target present, nothing
    unexpected, consistent shapes, indices in range)."""
    lay = {t.path: t for t in cfg.layout(params)}
    tensors: dict = {}
    problems = []
    for name, v in arrays.items():
        if name.startswith(PREFIX):
            path, what = name[len(PREFIX) :].rsplit("/", 1)
            tensors.setdefault(path, {})[what] = np.asarray(v)
        elif not name.startswith("head/"):
            problems.append(f"unexpected {name}")
    problems += [f"missing {PREFIX}{p}" for p in sorted(set(lay) - set(tensors))]
    problems += [f"unexpected {PREFIX}{p}" for p in sorted(set(tensors) - set(lay))]
    upd = {}
    for path, a in tensors.items():
        if path not in lay:
            continue
        t = lay[path]
        need = {"rows", "cols", "values"}
        if set(a) != need:
            problems.append(
                f"{path}: missing {sorted(need - set(a))}, unexpected {sorted(set(a) - need)}"
            )
            continue
        n = a["rows"].shape[0] if a["rows"].ndim == 2 else -1
        want = {"rows": (n, t.sub[0]), "cols": (n, t.sub[1]), "values": (n, *t.sub)}
        bad = [f"{w} {a[w].shape} vs {s}" for w, s in want.items() if a[w].shape != s]
        if n < 1 or bad:
            problems.append(f"{path}: {bad or 'no blocks'}")
            continue
        if (
            (a["rows"] >= t.dims[0]).any()
            or (a["cols"] >= t.dims[1]).any()
            or ((a["rows"] < 0).any() or (a["cols"] < 0).any())
        ):
            problems.append(f"{path}: indices out of range {t.dims}")
            continue
        w0 = paths.get(params, path)
        r, c, v = (jnp.asarray(a[w]) for w in ("rows", "cols", "values"))
        w = effective_matrix(
            kernel_as_matrix(w0, path), r[-1], c[-1], v[-1], r[:-1], c[:-1], v[:-1]
        )
        upd[path] = w.reshape(w0.shape)
    head = {k[len("head/") :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("head/")}
    want_head = set(paths.leaf_paths(params["head"]))
    if set(head) != want_head:
        problems.append(f"head arrays {sorted(head)} vs {sorted(want_head)}")
    if problems:
        raise ArtifactMismatchError(f"{cfg.name} artifact does not match: {problems[:10]}")
    out = paths.replaced(params, upd)
    out["head"] = paths.unflatten(head, params["head"])
    return out


# ----------------------------------------------------------------------------- factory


def _method(cfg: LosiaConfig) -> Method:
    f = functools.partial
    hooks = MethodHooks(
        init_state=f(_init_state, cfg),
        update_mask=(lambda st: {"head": True, "blocks": True, "probe": False})
        if cfg.relocalize
        else None,
        step=f(_step, cfg),
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
