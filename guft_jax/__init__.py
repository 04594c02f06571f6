"""guft_jax: GUFT (Gradual Unfreeze Fine-Tuning) and PEFT methods for vision transformers in JAX."""

__version__ = "0.1.0"

from guft_jax.methods.base import EpochContext, Method, MethodHooks
from guft_jax.ops import sparse_delta_matmul
from guft_jax.paths import key_to_str, leaf_paths, path_map, select
from guft_jax.vit import (
    CONFIGS,
    VisionTransformer,
    abstract_params,
    build_model,
    count_params,
    init_params,
    kernel_as_matrix,
    vit_config,
)
