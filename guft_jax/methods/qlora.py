"""QLoRA: LoRA on an NF4-quantised frozen base (Dettmers et al., arXiv:2305.14314).

What is quantised (``quantize`` regexes over ``/``-joined param paths; default
:data:`BLOCK_KERNELS`): the ``vit.Linear`` kernels of the encoder blocks, i.e. attention
``query/key/value/out`` and the MLP's ``Dense_0/Dense_1`` (QLoRA quantises every linear layer of
the transformer blocks). Everything else of the base stays fp32: the patch embedding, ``cls``,
the position embedding, all biases and LayerNorms, ``encoder_norm``, ``pre_logits`` and the head.

How the base is held (``MethodHooks.prepare_base``, called once by the engine before training):
each quantised kernel is *removed* from its place in the param tree and stored under the
top-level key :data:`QUANT_KEY` as ``{param key: nf4 arrays}`` (``guft_jax.methods.nf4``:
packed 4-bit codes in the kernel's shape with the last axis halved, 8-bit double-quantised
absmax constants, fp32 second-level scales and mean). No placeholder is left behind: the packed
codes carry the kernel's shape. ``apply`` runs inside the jitted step: it dequantises every
kernel back into its place (fp32; XLA fuses the table lookup and the scaling into the consumer)
and returns plain ViT params, so the dequantised kernels exist only as transient values of the
step, never in the stored base.

The LoRA update (``A`` (r, in) Kaiming-uniform, ``B`` (out, r) zero, scale α/r, fp32 like the
head) is added through an interceptor of ``vit.Linear.matmul``, ``y = x·deq(W) + (α/r)·(x·Aᵀ)·Bᵀ``
(the paper's Eq. 5), so the step never forms ``ΔW`` nor a gradient of the frozen kernel.
``merge`` gives plain params: ``deq(W) + (α/r)·AᵀBᵀ`` (LoRA merged into the *dequantised* base).

Default LoRA targets: every quantised kernel (the paper finds LoRA on all linear block layers is
needed to match full fine-tuning); rank 8, α 16 (lora's defaults here, so α/r = 2).

Measured (tests/test_qlora.py): the quantised kernels take 0.129× their fp32 bytes (ViT-B/16,
4.127 bits per entry); at init the logits differ from the unquantised model's by the NF4 error
stated there.

``prepare_base`` is idempotent (a prepared tree is returned unchanged), and ``apply``/``merge``
accept an unprepared base too (they quantise it on the fly, with the same jitted program), so an
artifact loads onto the original fp32 checkpoint.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

from guft_jax import paths
from guft_jax.methods import nf4
from guft_jax.methods import weight_space as ws
from guft_jax.methods.base import Defaults, Info, Method, MethodHooks, register
from guft_jax.methods.hparams import as_json
from guft_jax.vit import kernel_as_matrix

QUANT_KEY = "nf4"
BLOCK_KERNELS = (
    r"^Transformer/encoderblock_\d+/"
    r"(MultiHeadDotProductAttention_\d+/(query|key|value|out)|MlpBlock_\d+/Dense_[01])/kernel$",
)


def is_prepared(params) -> bool:
    return QUANT_KEY in params


def kernel_shapes(params) -> dict[str, tuple[int, ...]]:
    """``{param path: shape}`` of every kernel, quantised (shape from its codes) or not."""
    out = {
        p: tuple(x.shape)
        for p, x in zip(paths.leaf_paths(params), jax.tree_util.tree_leaves(params), strict=True)
        if p.endswith("/kernel") and not p.startswith(QUANT_KEY + "/")
    }
    for k, q in params.get(QUANT_KEY, {}).items():
        out[paths.path_of(k)] = _shape_of(q)
    return out


def _shape_of(q) -> tuple[int, ...]:
    c = q["codes"].shape
    return tuple(c[:-1]) + (2 * c[-1],)


def _match(candidates, regexes, field) -> list[str]:
    for rx in regexes:
        if not any(re.search(rx, p) for p in candidates):
            raise ValueError(
                f"{field}: regex {rx!r} matches no kernel; example paths: {sorted(candidates)[:6]}"
            )
    return [p for p in candidates if any(re.search(rx, p) for rx in regexes)]


def _as_matrix_shape(path: str, shape) -> tuple[int, int]:
    out = jax.eval_shape(
        lambda w: kernel_as_matrix(w, path), jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    )
    return int(out.shape[0]), int(out.shape[1])


class QLoRAHparams(NamedTuple):
    """The hyperparameters of :func:`qlora` (validated)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    quantize: tuple[str, ...]
    block_size: int
    absmax_block_size: int

    def blocks(self) -> dict:
        """The NF4 block sizes as keyword arguments of ``nf4.quantize``/``nf4.dequantize``."""
        return dict(block_size=self.block_size, absmax_block_size=self.absmax_block_size)


def _check(hp: QLoRAHparams) -> None:
    """Raises ValueError naming the first hyperparameter out of range."""
    if hp.rank < 1:
        raise ValueError(f"qlora.rank: must be >= 1, got {hp.rank}")
    if hp.alpha <= 0:
        raise ValueError(f"qlora.alpha: must be > 0, got {hp.alpha}")
    if hp.block_size < 2 or hp.block_size % 2 or hp.absmax_block_size < 1:
        raise ValueError(
            f"qlora.block_size: need an even block_size >= 2 and absmax_block_size >= 1, got "
            f"{hp.block_size}, {hp.absmax_block_size}"
        )


def _prepare_base(hp: QLoRAHparams, params):
    """The base with every ``quantize`` kernel moved, as NF4, under :data:`QUANT_KEY`
    (idempotent: a prepared base is checked against the block sizes and returned)."""
    blocks = hp.blocks()
    if is_prepared(params):
        for q in params[QUANT_KEY].values():  # fail early on foreign block sizes
            jax.eval_shape(lambda q: nf4.dequantize(q, **blocks), q)
        return params
    shapes = kernel_shapes(params)
    chosen = _match(shapes, hp.quantize, "qlora.quantize")
    out = paths.merge(params, {})
    quant = {}
    for p in chosen:
        quant[paths.key_of(p)] = nf4.quantize(paths.get(params, p), **blocks)
        parent = paths.get(out, p.rsplit("/", 1)[0])
        del parent[p.rsplit("/", 1)[1]]
    out[QUANT_KEY] = quant
    return out


def _dequantized(hp: QLoRAHparams, params):
    """Plain fp32 params with every quantised kernel dequantised into its place."""
    return dequantize_base(_prepare_base(hp, params), **hp.blocks())


def _init(hp: QLoRAHparams, rng, params):
    shapes = kernel_shapes(params)
    chosen = _match(shapes, hp.targets, "qlora.targets")
    factors = {}
    for i, p in enumerate(chosen):
        d_in, d_out = _as_matrix_shape(p, shapes[p])
        a = ws.kaiming_uniform(jax.random.fold_in(rng, i), (hp.rank, d_in), d_in)
        factors[paths.key_of(p)] = {"A": a, "B": jnp.zeros((d_out, hp.rank), jnp.float32)}
    return {"head": params["head"], "qlora": factors}


def _apply(hp: QLoRAHparams, params, trainable, state=None, rng=None):
    return {"params": {**_dequantized(hp, params), "head": trainable["head"]}}


def _low_rank_matmul(scale: float, table: dict, next_fun, args, kwargs, context):
    """The interceptor: ``vit.Linear.matmul`` of a module in ``table`` plus ``scale·(x Aᵀ) Bᵀ``."""
    y = next_fun(*args, **kwargs)
    if context.method_name != "matmul":
        return y
    f = table.get(tuple(context.module.path))
    if f is None:
        return y
    x = args[0]
    low = (x @ f["A"].T.astype(x.dtype)) @ f["B"].T.astype(x.dtype)
    return y + (scale * low).astype(y.dtype)


def _intercept(hp: QLoRAHparams, trainable, state=None, rng=None):
    table = {tuple(paths.path_of(k).split("/")[:-1]): f for k, f in trainable["qlora"].items()}
    return functools.partial(_low_rank_matmul, hp.alpha / hp.rank, table)


def _merge(hp: QLoRAHparams, params, trainable, state=None):
    scale = hp.alpha / hp.rank
    base = _dequantized(hp, params)
    upd = {}
    for k, f in trainable["qlora"].items():
        p = paths.path_of(k)
        w = paths.get(base, p)
        delta = scale * (f["A"].T @ f["B"].T)
        upd[p] = w + delta.reshape(w.shape).astype(w.dtype)
    return {**paths.replaced(base, upd), "head": trainable["head"]}


@register(
    "qlora",
    info=Info(
        "low-rank",
        "LoRA on an NF4-quantised frozen base",
        "2305.14314",
    ),
    defaults=Defaults(
        lr=1e-3, head_lr=1e-2, kwargs=dict(rank=8, alpha=16.0), dry_kwargs=dict(rank=2)
    ),
)
def qlora(
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = BLOCK_KERNELS,
    quantize: tuple[str, ...] = BLOCK_KERNELS,
    block_size: int = nf4.BLOCK_SIZE,
    absmax_block_size: int = nf4.ABSMAX_BLOCK_SIZE,
) -> Method:
    """LoRA on an NF4-quantised base (module docstring).

    Args:
      rank, alpha: LoRA rank and scale numerator (update scale α/r).
      targets: regexes over kernel paths that get LoRA factors (quantised or not).
      quantize: regexes over kernel paths stored as NF4 (each kernel's last axis must be even).
      block_size, absmax_block_size: NF4 block (64) and double-quantisation block (256).

    Raises:
      ValueError: a bad rank/alpha/block size; at init or prepare, a regex matching no kernel.

    >>> m = qlora(rank=8, alpha=16.0)
    >>> base = m.hooks.prepare_base(params)  # doctest: +SKIP
    >>> tr = m.init(jax.random.key(0), base)  # doctest: +SKIP
    """
    hp = QLoRAHparams(rank, alpha, tuple(targets), tuple(quantize), block_size, absmax_block_size)
    _check(hp)
    f = functools.partial
    return Method(
        name="qlora",
        init=f(_init, hp),
        apply=f(_apply, hp),
        hparams=as_json(hp),
        merge=f(_merge, hp),
        hooks=MethodHooks(
            prepare_base=f(_prepare_base, hp),
            intercept=f(_intercept, hp),
            trained=ws.trained_per_kernel("qlora"),
        ),
    )


def dequantize_base(
    params, *, block_size: int = nf4.BLOCK_SIZE, absmax_block_size: int = nf4.ABSMAX_BLOCK_SIZE
) -> dict:
    """Plain fp32 params from a prepared base: every quantised kernel dequantised into its place
    (traceable: inside the jitted step this is where the 4-bit base becomes fp32)."""
    rest = {k: v for k, v in params.items() if k != QUANT_KEY}
    upd = {
        paths.path_of(k): nf4.dequantize(
            q, block_size=block_size, absmax_block_size=absmax_block_size
        )
        for k, q in params.get(QUANT_KEY, {}).items()
    }
    return paths.replaced(rest, upd)


def quantized_bytes(params) -> tuple[int, int]:
    """``(bytes of the NF4 arrays, fp32 bytes of the kernels they stand for)`` of a prepared
    tree (arrays or ``jax.ShapeDtypeStruct``)."""
    q = params.get(QUANT_KEY, {})
    return sum(nf4.nbytes(v) for v in q.values()), sum(
        4 * math.prod(_shape_of(v)) for v in q.values()
    )
