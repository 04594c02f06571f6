"""guft_jax: GUFT (Gradual Unfreeze Fine-Tuning) and PEFT methods for vision transformers in JAX.

The public API, flat. Modules: ``vit`` (the model), ``checkpoint_import`` / ``pretrained``
(weights), ``data`` (VTAB-1K and offline datasets), ``methods`` (the method interface and
registry), ``guft`` / ``masks`` / ``saliency`` (GUFT), ``optim`` / ``train`` / ``checkpoint`` /
``sharding`` (the engine), ``artifacts`` (adapter files); ``transforms`` (GUFT and element
masks as optax transforms: ``masked``, ``gradual_unfreeze``, ``oneshot_mask``) and ``peft``
(LoRA/DoRA/VeRA/FourierFT/BitFit on any param pytree) for your own model and training loop.

GUFT itself is ``guft_jax.guft.guft(...)`` (or ``get_method("guft", ...)``): the function is not
re-exported here, so that ``guft_jax.guft`` stays the module.
"""

from guft_jax.version import __version__  # noqa: F401  isort: skip
from guft_jax.artifacts import load_artifact, save_artifact
from guft_jax.checkpoint_import import (
    CheckpointMismatchError,
    load_hf_safetensors,
    load_onnx_vit,
    load_vit_jax_npz,
    replace_head,
)
from guft_jax.data import (
    SPLITS,
    ArraySource,
    DataSource,
    describe_source,
    get_source,
    load_offline,
    load_user_data,
)
from guft_jax.errors import (
    CheckpointDamagedError,
    ConfigChangedError,
    InputError,
    WorkdirLockedError,
)
from guft_jax.guft import oneshot, selected_indices, selection
from guft_jax.masks import eligible_leaves, mask_report, merge_masks, topk_mask
from guft_jax.methods import get_method, method_names, register
from guft_jax.methods.base import Defaults, EpochContext, Method, MethodHooks, StepInfo, forward
from guft_jax.methods.fourierft import fourierft
from guft_jax.methods.lora import dora, lora
from guft_jax.methods.simple import bitfit, full, linear
from guft_jax.methods.vera import vera
from guft_jax.ops import sparse_delta_matmul
from guft_jax.optim import make_optimizer, masked_step
from guft_jax.paths import key_to_str, leaf_paths, path_map, regex_mask


def __getattr__(name):
    if name == "METHODS":  # live: includes methods registered after import
        return method_names()
    raise AttributeError(name)


from guft_jax import peft
from guft_jax.peft import Adapter
from guft_jax.pretrained import load_pretrained
from guft_jax.sharding import make_mesh, tree_shardings
from guft_jax.train import (
    FitResult,
    TrainState,
    evaluate,
    fit,
    make_eval_step,
    make_train_step,
)
from guft_jax.transforms import (
    GradualUnfreezeState,
    MaskedState,
    SparseMaskedState,
    SparseUnfreezeState,
    gradual_unfreeze,
    grow,
    magnitude_mask,
    masked,
    oneshot_mask,
    round_due,
    schedule_steps,
    unfrozen,
    updates_until_round,
)
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

__all__ = [
    "abstract_params",
    "Adapter",
    "ArraySource",
    "bitfit",
    "build_model",
    "CheckpointDamagedError",
    "CheckpointMismatchError",
    "ConfigChangedError",
    "CONFIGS",
    "count_params",
    "DataSource",
    "Defaults",
    "describe_source",
    "dora",
    "eligible_leaves",
    "EpochContext",
    "evaluate",
    "fit",
    "FitResult",
    "forward",
    "fourierft",
    "full",
    "get_method",
    "get_source",
    "gradual_unfreeze",
    "grow",
    "round_due",
    "updates_until_round",
    "GradualUnfreezeState",
    "init_params",
    "InputError",
    "kernel_as_matrix",
    "key_to_str",
    "leaf_paths",
    "linear",
    "load_artifact",
    "load_hf_safetensors",
    "load_offline",
    "load_onnx_vit",
    "load_pretrained",
    "load_user_data",
    "load_vit_jax_npz",
    "lora",
    "magnitude_mask",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "mask_report",
    "masked",
    "masked_step",
    "MaskedState",
    "merge_masks",
    "Method",
    "method_names",
    "MethodHooks",
    "METHODS",
    "oneshot",
    "oneshot_mask",
    "path_map",
    "peft",
    "register",
    "replace_head",
    "save_artifact",
    "schedule_steps",
    "regex_mask",
    "selected_indices",
    "selection",
    "sparse_delta_matmul",
    "SparseMaskedState",
    "SparseUnfreezeState",
    "SPLITS",
    "StepInfo",
    "topk_mask",
    "TrainState",
    "tree_shardings",
    "unfrozen",
    "vera",
    "VisionTransformer",
    "vit_config",
    "WorkdirLockedError",
]
