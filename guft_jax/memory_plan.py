"""A memory plan per device, computed from shapes alone (``jax.eval_shape``: nothing is
allocated) and the sharding rules of :mod:`guft_jax.sharding`.

For a ViT config, a method and a chip count ``n`` (mesh ``(data, fsdp) = (1, n)``: ZeRO-3 over
every chip, batches over both axes), the bytes one device holds of

- ``params``: the frozen backbone (the engine keeps it for every method; full fine-tuning's
  trainable copy is counted under ``trainable``),
- ``trainable``: the differentiated tree (full FT: every weight; LoRA: factors + head; GUFT:
  the sparse values + head),
- ``optimizer``: AdamW's state (two moments of the trainable tree, and counters),
- ``guft_state``: the method state (GUFT: the flat indices per leaf and their counts),

each leaf's size divided by the mesh axes its rule shards it over (a leaf that no rule shards,
or under ``Fsdp.min_size``, is counted whole on every device).

Activations per image, for the backward pass, follow Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), eq. 1: per layer
``s·h·(34 + 5·a·s/h)`` bytes with 16-bit activations (``s`` tokens, ``h`` width, ``a`` heads,
MLP width ``4h``); twice that in float32. ViT-H and ViT-g have MLP widths of 4h and ≈4.4h,
so the MLP term is scaled by ``mlp/(4h)``. It is an estimate for every method alike (LoRA and
GUFT still backpropagate through every frozen layer); ``remat`` keeps only ``2·s·h`` per layer.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from guft_jax import sharding as shard_lib
from guft_jax import train, vit
from guft_jax.methods import base as mbase
from guft_jax.paths import path_map


class Plan(NamedTuple):
    """Bytes per device (see the module docstring)."""

    params: int
    trainable: int
    optimizer: int
    guft_state: int
    activations_per_image: int

    @property
    def state_total(self) -> int:
        return self.params + self.trainable + self.optimizer + self.guft_state


def compiled_peak_bytes(compiled) -> int | None:
    """XLA's peak-memory estimate of a compiled program: arguments + outputs + temporaries -
    aliased (donated) bytes, from ``compiled.memory_analysis()``; ``None`` where the backend
    gives none. The measured counterpart of :func:`plan` (step and offline benchmarks)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


def abstract_mesh(chips: int, *, fsdp: int | None = None) -> AbstractMesh:
    """A ``("data", "fsdp")`` mesh of ``chips`` devices without devices (default: all fsdp)."""
    f = chips if fsdp is None else fsdp
    return AbstractMesh((chips // f, f), shard_lib.AXES, axis_types=(AxisType.Auto,) * 2)


def per_device_bytes(tree: Any, mesh, rules) -> int:
    """Sum over leaves of the bytes of one shard under ``rules`` (shapes only)."""
    total = [0]
    compiled = [(re.compile(r), t) for r, t in rules]

    def one(path, x):
        shape = tuple(x.shape)
        spec = None
        for rx, target in compiled:
            if rx.search(path):
                spec = shard_lib.spec_for(target, shape, mesh)
                if spec is not None:
                    break
        shard = list(shape)
        for d, ax in enumerate(spec or ()):
            if ax is not None:
                axes = ax if isinstance(ax, tuple) else (ax,)
                shard[d] //= int(np.prod([mesh.shape[a] for a in axes]))
        total[0] += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        return x

    path_map(one, tree)
    return total[0]


def activations_per_image(cfg: dict, image_size: int, *, bytes_per_value: int = 4) -> int:
    """Korthikanti et al. (arXiv:2205.05198) eq. 1 per layer, times the layers (see module)."""
    s = (image_size // cfg["patch_size"]) ** 2 + 1
    h, a, layers = cfg["hidden_size"], cfg["num_heads"], cfg["num_layers"]
    mlp = cfg["mlp_dim"] / (4 * h)
    # 34 = 10 (attention block, non-MLP) + 24 (MLP block of width 4h: 19 of them scale with it)
    per_layer = s * h * (15 + 19 * mlp) + 5 * a * s * s
    return int(layers * per_layer * bytes_per_value / 2)


def abstract_state(model_name: str, method, *, image_size: int, num_classes: int):
    """``(params, state)`` as ``jax.ShapeDtypeStruct`` trees (``jax.eval_shape``)."""
    model = vit.build_model(model_name, num_classes=num_classes)
    params = jax.eval_shape(lambda k: vit.init_params(model, k, image_size), jax.random.key(0))

    def make(p):
        p = mbase.prepare_base(method, p)
        return p, train.optimizer_for(method, p, steps_per_epoch=1, epochs=1, lr=1e-3)[1]

    return jax.eval_shape(make, params)


def plan(
    model_name: str,
    method,
    chips: int,
    *,
    image_size: int = 224,
    num_classes: int = 1000,
    fsdp: int | None = None,
    rules=shard_lib.FSDP_RULES,
    abstract: tuple | None = None,
) -> Plan:
    """The :class:`Plan` of ``method`` on ``model_name`` over ``chips`` (``fsdp`` of them on the
    fsdp axis, the rest on data; default all).

    >>> from guft_jax.methods import get_method
    >>> p = plan("ViT-B/16", get_method("lora", rank=8, alpha=16.0), 8)
    """
    params, state = abstract or abstract_state(
        model_name, method, image_size=image_size, num_classes=num_classes
    )
    mesh = abstract_mesh(chips, fsdp=fsdp)
    return Plan(
        params=per_device_bytes(params, mesh, rules),
        trainable=per_device_bytes(state.trainable, mesh, rules),
        optimizer=per_device_bytes(state.opt_state, mesh, rules),
        guft_state=per_device_bytes(state.method_state, mesh, rules),
        activations_per_image=activations_per_image(vit.vit_config(model_name), image_size),
    )
