"""VTAB-1K configs of every registered method (issues 13 and 14's included): the full config
and the CI dry config build the method by name, and the dry one initialises on the dry model.
(The protocol fields are checked for every method in tests/test_vtab_dry_run.py.)"""

import jax
import pytest

from experiments.vtab.configs import get_config
from guft_jax import vit
from guft_jax.methods import base as mbase
from guft_jax.methods import get_method, method_names, spec

ISSUE_13_14 = {"aflora", "losia", "losia_pro", "adalora", "dylora", "adapter", "adaptformer",
               "vpt", "prefix", "ssf", "compacter", "unipelt", "diff_pruning", "qlora"}  # fmt: skip


def test_the_new_methods_are_registered_so_have_configs():
    assert ISSUE_13_14 <= set(method_names())


@pytest.mark.parametrize("name", sorted(method_names()))
def test_full_and_dry_configs_build_the_method(name):
    d = spec(name).defaults
    full = get_config(f"cifar100,{name}")
    want = dict(d.vtab_kwargs if d.vtab_kwargs is not None else (d.kwargs or {}))
    assert {k: full.method_kwargs[k] for k in want} == want
    assert get_method(full.method, **full.method_kwargs.to_dict()).name == name
    dry = get_config(f"cifar100,{name},dry")
    m = get_method(dry.method, **dry.method_kwargs.to_dict())
    model = vit.build_model(dry.model, num_classes=100)
    params = jax.eval_shape(lambda: vit.init_params(model, jax.random.key(0), dry.image_size))
    base = jax.eval_shape(lambda p: mbase.prepare_base(m, p), params)
    trainable = jax.eval_shape(lambda p: m.init(jax.random.key(0), p), base)
    assert "head" in trainable
