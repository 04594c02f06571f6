"""A tiny randomly initialised ViT on scikit-learn's real 8x8 digits: seconds per run (tests).

python -m experiments.run --config experiments/configs/tiny.py:digits,lora --workdir /tmp/t

The argument is ``dataset,method``; the dataset may itself hold commas (``npz:A.npz,test:B.npz``):
the method is the text after the last comma.
"""

from experiments.configs.common import base_config, method_kwargs
from guft_jax.methods import spec


def get_config(arg: str = "digits,linear"):
    dataset, method = arg.rsplit(",", 1)
    c = base_config()
    c.model = "ViT-tiny/4"
    c.dataset, c.method = dataset, method
    c.image_size = 16
    c.batch_size = 50
    c.epochs = 2
    c.lr, c.head_lr = 1e-2, 1e-2
    d = spec(method).defaults  # unknown methods fail here, listing the registered ones
    c.method_kwargs = method_kwargs(method, d.kwargs, d.dry_kwargs)
    c.progress = False
    return c
