"""timm and Hugging Face ViT checkpoints in and out of guft_jax's param tree.

timm's ``VisionTransformer`` (ViT, arXiv:2010.11929; DeiT, arXiv:2012.12877; DINOv2-style
LayerScale, arXiv:2304.07193) names its weights ``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.norm1|attn.qkv|attn.proj|ls1|norm2|mlp.fc1|mlp.fc2|ls2``,
``norm`` and ``head``, with the query, key and value projections fused in one ``qkv`` Linear whose
rows are ordered ``[q | k | v]`` (each head-major, as guft_jax's ``(d, heads, head_dim)``
kernels). PyTorch Linear weights are ``(out, in)``; guft_jax kernels are ``(in, out)``.

Conventions a converted model must keep (they change logits): timm and Hugging Face use the
exact (erf) GELU, guft_jax's default is vit_jax's tanh approximation; LayerNorm eps is 1e-6 in
timm and vit_jax, 1e-12 in Hugging Face ViT. :func:`load_timm` builds the model with the
checkpoint's conventions.

The module-name maps (:func:`torch_linear`) are shared with :mod:`guft_jax.interop.peft_io`:
they say which PyTorch Linear (and which row block of a fused ``qkv``) a guft_jax kernel is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from guft_jax import checkpoint_import as ci
from guft_jax import paths as paths_lib
from guft_jax import vit as vit_lib

BASES = ("timm", "hf")
_ATTN = "MultiHeadDotProductAttention_1"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_QKV = ("query", "key", "value")
# guft_jax sub-path inside a block -> (timm module, hf module)
_LINEARS = {
    f"{_ATTN}/out": ("attn.proj", "attention.output.dense"),
    "MlpBlock_3/Dense_0": ("mlp.fc1", "intermediate.dense"),
    "MlpBlock_3/Dense_1": ("mlp.fc2", "output.dense"),
    **{f"{_ATTN}/{n}": ("attn.qkv", f"attention.attention.{n}") for n in _QKV},
}
_NORMS = {"LayerNorm_0": ("norm1", "layernorm_before"), "LayerNorm_2": ("norm2", "layernorm_after")}
_LAYERSCALE = {"LayerScale_attn": "ls1", "LayerScale_mlp": "ls2"}


def check_base(base: str) -> None:
    """Raises ValueError unless ``base`` is one of :data:`BASES`."""
    if base not in BASES:
        raise ValueError(f"base: {base!r} not in {list(BASES)}")


def torch_linear(path: str, base: str) -> tuple[str, int | None]:
    """The PyTorch Linear module that the guft_jax kernel or bias at ``path`` belongs to.

    Returns ``(module name, block)``: ``block`` is 0, 1 or 2 for query, key or value inside
    timm's fused ``qkv`` (rows ``[block·d, (block+1)·d)`` of its ``(3d, d)`` weight), else None.
    Hugging Face names are those of ``ViTForImageClassification`` (``vit.`` prefix).

    Raises:
      ValueError: ``path`` is not a Linear layer of the ViT (the patch embedding is a Conv2d).
    """
    check_base(base)
    layer = path.rsplit("/", 1)[0] if path.endswith(("/kernel", "/bias")) else path
    if layer == "head":
        return ("head" if base == "timm" else "classifier"), None
    m = _BLOCK.match(layer)
    if m and m.group(2) in _LINEARS:
        i, sub = m.group(1), m.group(2)
        timm_name, hf_name = _LINEARS[sub]
        if base == "hf":
            return f"vit.encoder.layer.{i}.{hf_name}", None
        leaf = sub.rsplit("/", 1)[1]
        return f"blocks.{i}.{timm_name}", (_QKV.index(leaf) if leaf in _QKV else None)
    raise ValueError(f"targets: {path} is not a Linear layer of the ViT (base {base!r})")


def guft_linear(module: str, base: str) -> list[str]:
    """The guft_jax layer paths (without ``/kernel``) of a PyTorch Linear module name, in row
    order (three for timm's fused ``qkv``).

    Raises:
      ValueError: naming ``module`` when it is not a Linear of the ViT.
    """
    check_base(base)
    head = "head" if base == "timm" else "classifier"
    if module == head:
        return ["head"]
    if base == "timm":
        m = _TIMM_BLOCK.match(module)
        rest = m and m.group(2)
        subs = [s for s, (t, _) in _LINEARS.items() if t == rest]
    else:
        m = re.match(r"^(?:vit\.)?encoder\.layer\.(\d+)\.(.+)$", module)
        rest = m and m.group(2)
        subs = [s for s, (_, h) in _LINEARS.items() if h == rest]
    if not m or not subs:
        raise ValueError(f"target_modules: {module!r} is not a Linear layer of a {base} ViT")
    return [f"Transformer/encoderblock_{m.group(1)}/{s}" for s in subs]


def torch_norm(layer: str, base: str) -> str:
    """The PyTorch LayerNorm module of the guft_jax LayerNorm at ``layer`` (a path without
    ``/scale``).

    Raises:
      ValueError: ``layer`` is not a LayerNorm of the ViT.
    """
    check_base(base)
    if layer == "Transformer/encoder_norm":
        return "norm" if base == "timm" else "vit.layernorm"
    m = _BLOCK.match(layer)
    if m and m.group(2) in _NORMS:
        t, h = _NORMS[m.group(2)]
        return (
            f"blocks.{m.group(1)}.{t}" if base == "timm" else f"vit.encoder.layer.{m.group(1)}.{h}"
        )
    raise ValueError(f"targets: {layer} is not a LayerNorm of the ViT (base {base!r})")


def guft_norm(module: str, base: str) -> str:
    """The guft_jax LayerNorm path of a PyTorch LayerNorm module name.

    Raises:
      ValueError: naming ``module`` when it is not a LayerNorm of the ViT.
    """
    check_base(base)
    if module in ("norm", "vit.layernorm"):
        return "Transformer/encoder_norm"
    rx = r"^blocks\.(\d+)\.(.+)$" if base == "timm" else r"^(?:vit\.)?encoder\.layer\.(\d+)\.(.+)$"
    m = re.match(rx, module)
    j = 0 if base == "timm" else 1
    sub = next((g for g, names in _NORMS.items() if m and names[j] == m.group(2)), None)
    if sub is None:
        raise ValueError(f"target_modules: {module!r} is not a LayerNorm of a {base} ViT")
    return f"Transformer/encoderblock_{m.group(1)}/{sub}"


def kernel_to_torch(kernel: Any, path: str) -> np.ndarray:
    """The guft_jax kernel at ``path`` as a PyTorch ``(out, in)`` weight (3-D attention kernels
    are taken as their 2-D matrix, :func:`guft_jax.vit.kernel_as_matrix`)."""
    return np.ascontiguousarray(np.asarray(vit_lib.kernel_as_matrix(np.asarray(kernel), path)).T)


# ----------------------------------------------------------------------------------- timm in


def timm_to_flat(
    state: Mapping[str, Any], *, num_heads: int
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps a timm ViT state dict to guft_jax's ``/``-joined paths.

    Returns ``(flat, unknown)``: converted arrays and the timm names with no counterpart.

    Raises:
      ValueError: register tokens (``reg_token``), which guft_jax's ViT does not have.
    """
    flat: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for name, w in state.items():
        w = np.asarray(w, np.float32)
        if name == "reg_token":
            raise ValueError(
                "load_timm: register tokens (reg_token) are not supported by guft_jax's ViT"
            )
        m = _TIMM_BLOCK.match(name)
        if name == "cls_token":
            flat["cls"] = w.reshape(1, 1, -1)
        elif name == "pos_embed":
            flat[ci.POSEMB] = w
        elif name == "patch_embed.proj.weight":
            flat["embedding/kernel"] = w.transpose(2, 3, 1, 0)  # (d,c,p,p) -> (p,p,c,d)
        elif name == "patch_embed.proj.bias":
            flat["embedding/bias"] = w
        elif name in ("norm.weight", "norm.bias"):
            flat[f"Transformer/encoder_norm/{_norm_leaf(name)}"] = w
        elif name in ("head.weight", "head.bias"):
            flat[f"head/{'kernel' if name.endswith('weight') else 'bias'}"] = _lin(w)
        elif m:
            blk = f"Transformer/encoderblock_{m.group(1)}"
            mod, leaf = m.group(2).rsplit(".", 1)
            norm = next((g for g, (t, _) in _NORMS.items() if t == mod), None)
            ls = next((g for g, t in _LAYERSCALE.items() if t == mod), None)
            if mod == "attn.qkv":
                d = w.shape[0] // 3
                for j, n in enumerate(_QKV):
                    part = w[j * d : (j + 1) * d]
                    if leaf == "weight":
                        flat[f"{blk}/{_ATTN}/{n}/kernel"] = part.T.reshape(d, num_heads, -1)
                    else:
                        flat[f"{blk}/{_ATTN}/{n}/bias"] = part.reshape(num_heads, -1)
            elif mod == "attn.proj" and leaf == "weight":
                flat[f"{blk}/{_ATTN}/out/kernel"] = w.T.reshape(num_heads, -1, w.shape[0])
            elif mod in ("attn.proj", "mlp.fc1", "mlp.fc2"):
                sub = next(s for s, (t, _) in _LINEARS.items() if t == mod)
                flat[f"{blk}/{sub}/{'kernel' if leaf == 'weight' else 'bias'}"] = _lin(w)
            elif norm is not None:
                flat[f"{blk}/{norm}/{_norm_leaf(leaf)}"] = w
            elif ls is not None and leaf == "gamma":
                flat[f"{blk}/{ls}/scale"] = w
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    return flat, unknown


def _lin(w: np.ndarray) -> np.ndarray:
    return w.T if w.ndim == 2 else w


def _norm_leaf(name: str) -> str:
    return "scale" if name.endswith("weight") else "bias"


def timm_config(state: Mapping[str, Any], *, num_heads: int | None = None) -> dict[str, Any]:
    """:class:`guft_jax.vit.VisionTransformer` keyword arguments read off a timm state dict:
    sizes from the shapes, exact GELU and eps 1e-6 (timm's), LayerScale if ``ls1`` is present.

    ``num_heads`` cannot be read from the weights; it defaults to ``hidden / 64`` (every timm
    ViT/DeiT/DINOv2 size has 64-wide heads).

    Raises:
      ValueError: a state dict without the ViT's patch embedding or blocks, or a width not
        divisible by 64 without ``num_heads``.
    """
    if "patch_embed.proj.weight" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise ValueError("load_timm: not a timm ViT state dict (no patch_embed.proj / blocks.0)")
    d, _, p, _ = np.shape(state["patch_embed.proj.weight"])
    depth = 1 + max(int(m.group(1)) for k in state if (m := _TIMM_BLOCK.match(k)))
    if num_heads is None:
        if d % 64:
            raise ValueError(f"num_heads: give it for width {d} (not a multiple of 64)")
        num_heads = d // 64
    return dict(
        patch_size=int(p),
        hidden_size=int(d),
        num_layers=depth,
        num_heads=int(num_heads),
        mlp_dim=int(np.shape(state["blocks.0.mlp.fc1.weight"])[0]),
        layerscale="blocks.0.ls1.gamma" in state,
        gelu_approximate=False,
        layer_norm_eps=1e-6,
    )


def _read_state(source: str | Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(source, str):
        return {k: np.asarray(v) for k, v in source.items()}
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(source)
    except (SafetensorError, OSError, ValueError) as e:
        raise ci.CheckpointMismatchError(f"{source}: not a readable safetensors file ({e})") from e


def load_timm(
    source: str | Mapping[str, Any],
    *,
    num_heads: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    **overrides: Any,
) -> tuple[vit_lib.VisionTransformer, dict]:
    """Loads a timm ViT/DeiT/DINOv2-style checkpoint (a safetensors path or a state dict).

    The model is built with the checkpoint's conventions (exact GELU, LayerNorm eps 1e-6, token
    pooling, LayerScale when present) so its logits equal timm's. Loading is strict: any timm
    weight without a counterpart (``fc_norm``, ``q_norm``, a distillation token, ...) raises one
    error listing them.

    Args:
      source: a ``.safetensors`` file of ``model.state_dict()`` or the state dict itself (arrays
        or tensors converted with ``.numpy()``).
      num_heads: attention heads (see :func:`timm_config`).
      num_classes: the head's classes; None keeps the checkpoint's head (0 if it has none);
        a number different from the checkpoint's gives a new zero head.
      image_size: input size; default: the position embedding's grid times the patch size
        (another size resizes the position embedding bicubically).
      **overrides: other :class:`~guft_jax.vit.VisionTransformer` fields (e.g. ``dtype``).

    Returns:
      ``(model, params)``.

    Raises:
      ValueError: register tokens, a non-ViT state dict, or (``CheckpointMismatchError``) weights
        that do not match the model.

    >>> model, params = load_timm("vit_base_patch16_224.safetensors")  # doctest: +SKIP
    """
    state = _read_state(source)
    cfg = {**timm_config(state, num_heads=num_heads), **overrides}
    n_ckpt = int(np.shape(state["head.weight"])[0]) if "head.weight" in state else 0
    n_cls = n_ckpt if num_classes is None else num_classes
    if image_size is None:
        grid = np.shape(state["pos_embed"])[1] - 1
        image_size = int(round(np.sqrt(grid))) * cfg["patch_size"]
    model = vit_lib.VisionTransformer(num_classes=n_cls, **cfg)
    flat, unknown = timm_to_flat(state, num_heads=cfg["num_heads"])
    if unknown:
        raise ci.CheckpointMismatchError(
            f"load_timm: timm weights without a guft_jax counterpart: {', '.join(unknown)}"
        )
    skip = () if (n_cls == n_ckpt and n_ckpt) else ci.DEFAULT_SKIP
    params = ci.assemble(flat, model, image_size, skip=skip, source="timm checkpoint")
    return model, params


# ----------------------------------------------------------------------------------- out


def _flat(params: Any) -> dict[str, np.ndarray]:
    return {
        paths_lib.key_to_str(p): np.asarray(x, np.float32)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def _check_exportable(model: vit_lib.VisionTransformer, base: str) -> None:
    bad = []
    if model.classifier != "token":
        bad.append(f"classifier={model.classifier!r} (timm/HF pool the [CLS] token)")
    if model.representation_size is not None:
        bad.append("representation_size (pre_logits has no timm/HF counterpart)")
    if model.posemb_grid is not None:
        bad.append("posemb_grid (interpolated position embeddings)")
    if base == "hf" and model.layerscale:
        bad.append("layerscale (HF ViT has none)")
    if bad:
        raise ValueError(f"export_{base}: the model cannot be expressed: {'; '.join(bad)}")


def export_timm(
    params: Any, model: vit_lib.VisionTransformer, path: str | None = None
) -> dict[str, np.ndarray]:
    """A timm ``VisionTransformer`` state dict of (merged) guft_jax params.

    Build the timm model with the same sizes, ``class_token=True``, ``global_pool="token"`` and
    ``num_classes``; with a tanh-GELU guft_jax model (the default) also
    ``act_layer=partial(nn.GELU, approximate="tanh")``. ``path``: also write it as safetensors.

    Raises:
      ValueError: a model timm's ViT cannot express (``gap`` pooling, ``pre_logits``, an
        interpolated position-embedding grid).
    """
    _check_exportable(model, "timm")
    flat = _flat(params)
    out: dict[str, np.ndarray] = {
        "cls_token": flat["cls"],
        "pos_embed": flat[ci.POSEMB],
        "patch_embed.proj.weight": flat["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": flat["embedding/bias"],
        "norm.weight": flat["Transformer/encoder_norm/scale"],
        "norm.bias": flat["Transformer/encoder_norm/bias"],
    }
    if "head/kernel" in flat:
        out["head.weight"], out["head.bias"] = flat["head/kernel"].T, flat["head/bias"]
    for i in range(model.num_layers):
        blk = f"Transformer/encoderblock_{i}"
        for g, (t, _) in _NORMS.items():
            out[f"blocks.{i}.{t}.weight"] = flat[f"{blk}/{g}/scale"]
            out[f"blocks.{i}.{t}.bias"] = flat[f"{blk}/{g}/bias"]
        if model.layerscale:
            for g, t in _LAYERSCALE.items():
                out[f"blocks.{i}.{t}.gamma"] = flat[f"{blk}/{g}/scale"]
        q = [f"{blk}/{_ATTN}/{n}" for n in _QKV]
        out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [kernel_to_torch(flat[f"{p}/kernel"], f"{p}/kernel") for p in q]
        )
        out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([flat[f"{p}/bias"].ravel() for p in q])
        for sub in (f"{_ATTN}/out", "MlpBlock_3/Dense_0", "MlpBlock_3/Dense_1"):
            name = f"blocks.{i}.{_LINEARS[sub][0]}"
            kp = f"{blk}/{sub}/kernel"
            out[f"{name}.weight"] = kernel_to_torch(flat[kp], kp)
            out[f"{name}.bias"] = flat[f"{blk}/{sub}/bias"]
    return _contiguous(out, path)


def export_hf(
    params: Any, model: vit_lib.VisionTransformer, path: str | None = None
) -> dict[str, np.ndarray]:
    """A Hugging Face ``ViTForImageClassification`` state dict of (merged) guft_jax params.

    Use ``ViTConfig(hidden_act="gelu", layer_norm_eps=...)`` matching the model
    (``"gelu_pytorch_tanh"`` for a tanh-GELU guft_jax model). ``path``: also write safetensors.

    Raises:
      ValueError: a model HF's ViT cannot express (see :func:`export_timm`; also LayerScale).
    """
    _check_exportable(model, "hf")
    flat = _flat(params)
    out: dict[str, np.ndarray] = {
        "vit.embeddings.cls_token": flat["cls"],
        "vit.embeddings.position_embeddings": flat[ci.POSEMB],
        "vit.embeddings.patch_embeddings.projection.weight": flat["embedding/kernel"].transpose(
            3, 2, 0, 1
        ),
        "vit.embeddings.patch_embeddings.projection.bias": flat["embedding/bias"],
        "vit.layernorm.weight": flat["Transformer/encoder_norm/scale"],
        "vit.layernorm.bias": flat["Transformer/encoder_norm/bias"],
    }
    if "head/kernel" in flat:
        out["classifier.weight"], out["classifier.bias"] = flat["head/kernel"].T, flat["head/bias"]
    for i in range(model.num_layers):
        blk = f"Transformer/encoderblock_{i}"
        for g, (_, h) in _NORMS.items():
            out[f"vit.encoder.layer.{i}.{h}.weight"] = flat[f"{blk}/{g}/scale"]
            out[f"vit.encoder.layer.{i}.{h}.bias"] = flat[f"{blk}/{g}/bias"]
        for sub in _LINEARS:
            name, _ = torch_linear(f"{blk}/{sub}/kernel", "hf")
            kp = f"{blk}/{sub}/kernel"
            out[f"{name}.weight"] = kernel_to_torch(flat[kp], kp)
            out[f"{name}.bias"] = flat[f"{blk}/{sub}/bias"].ravel()
    return _contiguous(out, path)


def _contiguous(state: dict, path: str | None) -> dict[str, np.ndarray]:
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
    if path is not None:
        from safetensors.numpy import save_file

        save_file(state, path)
    return state
