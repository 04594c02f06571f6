"""kernels: options resolve to the per-backend tables with no "auto" left, bad values raise a
ValueError naming the field, the tables are read-only, count_calls counts named calls."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import pytest

from guft_jax import kernels
from guft_jax.kernels import KernelOptions


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu", "some_new_backend"])
def test_resolve_replaces_every_auto_by_the_backend_table(backend):
    r = kernels.resolve(None, backend=backend)
    assert r.resolved and "auto" not in kernels.as_dict(r).values()
    tables = {
        "sddmm": kernels.SDDMM_DEFAULTS,
        "block_forward": kernels.BLOCK_FORWARD_DEFAULTS,
        "attention": kernels.ATTENTION_DEFAULTS,
    }
    for field, table in tables.items():
        assert getattr(r, field) == table.get(backend, kernels.FALLBACK[field])
    assert r.block_max_fraction == kernels.BLOCK_MAX_FRACTION
    assert r.gather_max_density == kernels.GATHER_MAX_DENSITY


def test_resolve_keeps_explicit_choices_and_accepts_a_mapping():
    r = kernels.resolve({"sddmm": "pallas", "block_max_fraction": 0.25}, backend="gpu")
    assert (r.sddmm, r.block_forward, r.attention) == ("pallas", "on", "cudnn_or_xla")
    assert r.block_max_fraction == 0.25
    assert kernels.resolve(r, backend="cpu") == r  # resolved options are a fixed point
    assert kernels.resolve(KernelOptions(attention="einsum"), backend="tpu").attention == "einsum"
    assert kernels.resolve(backend="cpu") == kernels.resolve(KernelOptions(), backend="cpu")


def test_as_dict_is_json_ready_and_round_trips():
    r = kernels.resolve({"block_forward": "off"}, backend="tpu")
    d = json.loads(json.dumps(kernels.as_dict(r)))
    assert d == {
        "sddmm": "dense",
        "block_forward": "off",
        "block_max_fraction": 0.5,
        "attention": "xla",
        "gather_max_density": 0.008,
    }
    assert kernels.from_any(d) == r


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("sddmm", "triton", "allowed: auto, gather, dense, pallas"),
        ("sddmm", "block", "allowed: auto, gather, dense, pallas"),
        ("block_forward", True, "allowed: auto, on, off"),
        ("attention", "flash", "allowed: auto, xla, cudnn, einsum, cudnn_or_xla"),
        ("block_max_fraction", 1.5, r"in \[0, 1\]"),
        ("block_max_fraction", "half", r"in \[0, 1\]"),
        ("gather_max_density", 0.0, r"in \(0, 1\]"),
    ],
)
def test_bad_values_raise_naming_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=f"kernels.{field}=.*{allowed}"):
        KernelOptions(**{field: value})
    with pytest.raises(ValueError, match=f"kernels.{field}="):
        kernels.resolve({field: value}, backend="cpu")


def test_unknown_fields_and_types_are_refused():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['impl'\]; allowed: sddmm"):
        kernels.resolve({"impl": "dense"})
    with pytest.raises(ValueError, match="expected a KernelOptions or a mapping"):
        kernels.resolve("dense")
    with pytest.raises(ValueError, match="field='precision' has no per-backend default"):
        kernels.default("precision", "cpu")


def test_options_and_tables_are_read_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelOptions().sddmm = "dense"
    for table in (
        kernels.SDDMM_DEFAULTS,
        kernels.BLOCK_FORWARD_DEFAULTS,
        kernels.ATTENTION_DEFAULTS,
        kernels.FALLBACK,
    ):
        with pytest.raises(TypeError):
            table["cpu"] = "dense"
    assert hash(KernelOptions()) == hash(KernelOptions())  # usable as a static jit argument


def test_count_calls_finds_named_calls_in_cond_branches_and_custom_vjp_backward():
    @functools.partial(jax.jit, static_argnames="k")
    def scaled(x, k=1):
        return x * k

    @jax.jit
    def in_backward(x):
        return 2 * x

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, dy: (in_backward(dy * jnp.cos(x)),))
    h = lambda x: jax.lax.cond(x > 0, f, lambda a: scaled(scaled(a, k=3)), x)
    forward = jax.make_jaxpr(h)(1.0)
    assert kernels.count_calls(forward, "scaled") == 2
    assert kernels.count_calls(forward, "in_backward") == 0
    assert kernels.count_calls(jax.make_jaxpr(jax.grad(h))(1.0), "in_backward") == 1
    assert kernels.count_calls(jax.make_jaxpr(jnp.sin)(1.0), "scaled") == 0
