"""A tiny randomly initialised ViT on scikit-learn's real 8x8 digits: seconds per run (tests).

python -m experiments.run --config experiments/configs/tiny.py:digits,lora --workdir /tmp/t

The argument is ``dataset,method``; the dataset may itself hold commas (``npz:A.npz,test:B.npz``):
the method is the text after the last comma.
"""

from experiments.configs.common import base_config
from experiments.configs.offline import METHOD_DEFAULTS


def get_config(arg: str = "digits,linear"):
    dataset, method = arg.rsplit(",", 1)
    c = base_config()
    c.model = "ViT-tiny/4"
    c.dataset, c.method = dataset, method
    # User-data split options (0 = the dataset's default; counts or fractions): here until
    # common.base_config has them.
    for field, default in (("train_size", 0.0), ("val_size", 0.0), ("skip_bad", False)):
        if field not in c:
            c[field] = default
    c.image_size = 16
    c.batch_size = 50
    c.epochs = 2
    c.lr, c.head_lr = 1e-2, 1e-2
    c.method_kwargs.update(METHOD_DEFAULTS.get(method, METHOD_DEFAULTS["linear"])["kwargs"])
    if method in ("lora", "dora", "vera", "fourierft"):
        c.method_kwargs.targets = (r"MultiHeadDotProductAttention_1/(query|value)/kernel$",)
    if method == "fourierft":
        c.method_kwargs.n = 64
    c.progress = False
    return c
