"""Hugging Face PEFT adapters out of and into guft_jax (PEFT 0.17 on-disk format).

:func:`save_peft` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``PeftModel.from_pretrained(model, directory)`` loads onto a timm ``VisionTransformer`` or a
Hugging Face ``ViTForImageClassification`` (``base="timm"|"hf"``); :func:`load_peft` reads the
same format back into a guft_jax method and trainable tree. Both go through :data:`CONVERTERS`, a
table keyed by guft_jax method name (one entry per method, each a pair of pure functions), so a
later method is one entry. The entries live in one module per family
(:mod:`~guft_jax.interop.peft_lowrank`, :mod:`~guft_jax.interop.peft_seeded`,
:mod:`~guft_jax.interop.peft_sparse`, :mod:`~guft_jax.interop.peft_scaling`), the helpers they
share in :mod:`~guft_jax.interop.peft_common`.

Conventions each entry handles (all exact; where no exact form exists the call fails with one
line naming the layer):

- PyTorch Linear weights are ``(out, in)``, guft_jax kernels ``(in, out)``; the task head is
  saved as PEFT's ``modules_to_save`` (``head`` / ``classifier``).
- timm fuses q, k, v in one ``qkv`` Linear (rows ``[q | k | v]``). LoRA (Hu et al.,
  arXiv:2106.09685), DoRA (arXiv:2402.09353) and AdaLoRA (arXiv:2303.10512) on it map exactly onto
  split q/k/v adapters: rank-r adapters on q, k, v are one rank-3r fused adapter (``A`` stacked,
  ``B`` block diagonal) and a fused adapter is three split ones sharing ``A`` (``B`` row blocks).
  VeRA (arXiv:2310.11454) and FourierFT (arXiv:2405.03003) on a fused ``qkv`` have no exact split
  form and are refused.
- LoRA scales by ``alpha / r`` per module (fused modules get PEFT ``rank_pattern`` /
  ``alpha_pattern`` entries); modules of different ranks or scales load as one rank with the
  scale folded into ``B``.
- AdaLoRA: PEFT scales by ``lora_alpha / (ranknum + 1e-5)``, guft_jax by ``alpha / r`` exactly;
  the exported ``lora_alpha`` carries the difference.
- VeRA: the frozen projections are saved (``save_projection=True``); guft_jax draws them
  U(±1/sqrt(fan_in)), PEFT Kaiming-uniform U(±sqrt(6/fan_in)), so the adapter carries them both
  ways and imported ones are used as they are.
- FourierFT: PEFT draws its entries as ``torch.randperm(out·in, seed)[:n]``, guft_jax with its own
  RNG; the entries travel with the adapter. Out, the spectrum is laid out in PEFT's permutation
  order (:func:`torch_randperm`, a numpy replica of torch's CPU ``randperm``) up to the last of
  guft_jax's entries (often most of ``out·in``: exact, not compact). In, the entries PEFT would
  draw are computed and kept explicitly.
- GUFT (arXiv id in :mod:`guft_jax.guft`) and the one-shot masks are saved as PEFT's SHiRA sparse
  adapter (indices + values per Linear). SHiRA holds ``r·(in+out)`` entries per layer: every layer
  is padded with zero-valued entries to one ``r``; a layer whose selection exceeds
  ``in·out`` entries' budget, and every selected tensor that is not a Linear weight (biases,
  LayerNorms, embeddings), goes to ``base_updates.safetensors`` as full merged tensors in the
  base's names, listed in the config (``guft_jax.base_updates``); load them with
  ``model.load_state_dict(..., strict=False)`` before ``PeftModel.from_pretrained``.

Also 1:1 in PEFT's own names (guft_jax's implementations follow PEFT 0.17.1): (IA)³
(arXiv:2205.05638; on a fused ``qkv`` output scaling with q at 1), LN tuning
(arXiv:2312.11420), LoHa (arXiv:2108.06098; fused like LoRA), LoKr (arXiv:2309.14859; fused
``qkv`` refused), and OFT / BOFT / HRA (arXiv:2306.07280, 2311.06243, 2405.17484), whose input
transform a fused ``qkv`` shares: exact only when q, k and v carry one and the same.

Methods without an entry are exported as merged weights (``model.safetensors`` in the base's
names, :func:`guft_jax.interop.timm_io.export_timm` / ``export_hf``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from guft_jax import guft as guft_lib
from guft_jax import paths as paths_lib
from guft_jax.interop import peft_lowrank as lowrank
from guft_jax.interop import peft_scaling as scaling
from guft_jax.interop import peft_seeded as seeded
from guft_jax.interop import peft_sparse as sparse
from guft_jax.interop import timm_io as timm_lib
from guft_jax.interop.peft_common import PREFIX, Converter, Ctx, ViTShape, to_np
from guft_jax.interop.peft_seeded import fourierft_explicit, torch_randperm, vera_explicit
from guft_jax.interop.peft_sparse import SHIRA, shira_explicit
from guft_jax.methods import base as base_lib

__all__ = [
    "BASE_UPDATES",
    "CONFIG",
    "CONVERTERS",
    "MERGED",
    "META",
    "PREFIX",
    "SHIRA",
    "Converter",
    "Ctx",
    "Loaded",
    "WEIGHTS",
    "fourierft_explicit",
    "load_peft",
    "save_peft",
    "shira_explicit",
    "torch_randperm",
    "vera_explicit",
]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BASE_UPDATES = "base_updates.safetensors"
MERGED = "model.safetensors"
META = "guft_jax"  # our key in adapter_config.json (PEFT drops unknown keys with a warning)


class Loaded(NamedTuple):
    """What :func:`load_peft` returns: ``base_lib.forward(model, method, params, trainable, ())``
    gives the adapter's logits."""

    method: base_lib.Method
    trainable: dict
    params: dict  # the base params (with ``base_updates`` applied, if the adapter has them)


CONVERTERS: dict[str, Converter] = {
    "lora": lowrank.LORA,
    "dora": lowrank.LORA,
    "adalora": lowrank.ADALORA,
    "ia3": scaling.IA3,
    "loha": lowrank.LOHA,
    "lokr": lowrank.LOKR,
    "oft": scaling.OFT,
    "boft": scaling.BOFT,
    "hra": scaling.HRA,
    "ln_tuning": scaling.LN_TUNING,
    "vera": seeded.VERA,
    "fourierft": seeded.FOURIERFT,
    SHIRA: sparse.SPARSE,
    "shira": sparse.SPARSE,  # GUFT-family methods with a per-tensor quota: the same payload
    "gps": sparse.SPARSE,
    "guft": sparse.SPARSE,
    **{s: sparse.SPARSE for s in guft_lib.ONESHOT_SCORES},
}
_BY_TYPE = {c.peft_type: c for c in CONVERTERS.values()}


def save_peft(
    directory: str,
    method: base_lib.Method,
    trainable: Any,
    *,
    params: Any,
    state: Any = None,
    base: str = "timm",
) -> dict:
    """Writes a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``PeftModel.from_pretrained(timm_or_hf_model, directory)`` then gives guft_jax's logits;
    the task head is saved as PEFT's ``modules_to_save``. Methods without a PEFT form are saved
    as merged weights (``model.safetensors``, no adapter config).

    Args:
      directory: created if missing.
      method: the guft_jax method that trained ``trainable``.
      trainable: its trainable tree.
      params: the frozen base params the method was applied to.
      state: the method state (GUFT's selection).
      base: ``"timm"`` (``VisionTransformer``, fused ``qkv``) or ``"hf"``
        (``ViTForImageClassification``).

    Returns:
      The config written (``{"format": "merged"}`` for a merged export).

    Raises:
      ValueError: an unknown ``base``; a method/target without an exact PEFT form (one line
        naming the layer).

    >>> save_peft("out/", method, trainable, params=params, base="timm")  # doctest: +SKIP
    """
    timm_lib.check_base(base)
    os.makedirs(directory, exist_ok=True)
    conv = CONVERTERS.get(method.name)
    if conv is None:
        if method.merge is None:
            raise ValueError(f"save_peft: method {method.name!r} has no PEFT form and no merge")
        merged = method.merge(params, trainable, state)
        exporter = timm_lib.export_timm if base == "timm" else timm_lib.export_hf
        exporter(merged, ViTShape(params), os.path.join(directory, MERGED))
        return {"format": "merged"}
    config, tensors = conv.save(Ctx(method, params, trainable, state, base))
    for field in ("target_modules", "feedforward_modules"):
        if config.get(field):  # one regex of the exact names: PEFT's list form matches name
            # tails (timm's ``norm`` would also hit every ``attn.norm`` Identity)
            config[field] = "^(?:" + "|".join(re.escape(m) for m in config[field]) + ")$"
    updates = config.pop("_base_updates", {})
    meta = {"method": method.name, "hparams": _jsonable(method.hparams), "base": base}
    meta.update(config.pop("_meta", {}))
    head = "head" if base == "timm" else "classifier"
    tensors = {
        PREFIX + k if not k.startswith("vera_") else f"base_model.{k}": v
        for k, v in tensors.items()
    }
    tensors[f"{PREFIX}{head}.weight"] = timm_lib.kernel_to_torch(
        trainable["head"]["kernel"], "head/kernel"
    )
    tensors[f"{PREFIX}{head}.bias"] = to_np(trainable["head"]["bias"])
    config.update(
        modules_to_save=[head],
        task_type=None,
        inference_mode=True,
        base_model_name_or_path=None,
        revision=None,
        **{META: meta},
    )
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(directory, WEIGHTS)
    )
    if updates:
        save_file(updates, os.path.join(directory, BASE_UPDATES))
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return f"array{tuple(np.shape(x))}"
    return x


def load_peft(directory: str, params: Any, *, base: str = "timm") -> Loaded:
    """Reads a PEFT adapter into a guft_jax method and trainable tree.

    Fused timm ``qkv`` adapters become split q/k/v ones where that is exact; the task head comes
    from ``modules_to_save`` (else ``params["head"]``).

    Args:
      directory: holding ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base params (guft_jax layout) the adapter was trained on.
      base: ``"timm"`` or ``"hf"``: the PyTorch model the adapter's module names refer to.

    Returns:
      :class:`Loaded` ``(method, trainable, params)``.

    Raises:
      ValueError: one line naming an unknown ``peft_type``, a target that is not a Linear of
        the ViT, or tensors the format does not have.
    """
    timm_lib.check_base(base)
    from safetensors.numpy import load_file

    with open(os.path.join(directory, CONFIG)) as f:
        config = json.load(f)
    ptype = config.get("peft_type")
    if ptype not in _BY_TYPE:
        raise ValueError(f"load_peft: peft_type {ptype!r} not in {sorted(_BY_TYPE)}")
    tensors = dict(load_file(os.path.join(directory, WEIGHTS)))
    head_name = "head" if base == "timm" else "classifier"
    head = dict(params["head"])
    for leaf, key in (("kernel", "weight"), ("bias", "bias")):
        v = tensors.pop(f"{PREFIX}{head_name}.{key}", None)
        if v is not None:
            head[leaf] = jnp.asarray(v.T if leaf == "kernel" else v)
    upd_path = os.path.join(directory, BASE_UPDATES)
    if os.path.exists(upd_path):
        params = _apply_updates(params, load_file(upd_path), base)
    method, group = _BY_TYPE[ptype].load(config, tensors, params, base)
    return Loaded(method, {"head": head, **group}, params)


def _apply_updates(params: Any, state: dict, base: str) -> Any:
    from guft_jax import checkpoint_import as ci

    num_heads = _num_heads(params)
    if base == "timm":
        flat, unknown = timm_lib.timm_to_flat(state, num_heads=num_heads)
    else:
        flat, unknown = ci.hf_to_flat(state, num_heads=num_heads)
    if unknown:
        raise ValueError(f"load_peft: base updates with unknown names {unknown[:4]}")
    return paths_lib.replaced(params, {k: jnp.asarray(v) for k, v in flat.items()})


def _num_heads(params: Any) -> int:
    k = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]
    return int(k["kernel"].shape[1])
