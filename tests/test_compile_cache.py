"""compile_cache: off in tests, on where an entry point asks, bad input named."""

import jax
import pytest

from guft_jax import compile_cache


@pytest.fixture
def restore_config():
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_tests_run_without_the_persistent_cache():
    assert not jax.config.jax_compilation_cache_dir


def test_enable_sets_the_directory_and_threshold(tmp_path, restore_config):
    got = compile_cache.enable(str(tmp_path / "xla"), min_compile_secs=0.25)
    assert got == str(tmp_path / "xla")
    assert jax.config.jax_compilation_cache_dir == got
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25


def test_empty_directory_leaves_it_off_and_env_picks_the_default(monkeypatch, restore_config):
    assert compile_cache.enable("") is None
    assert not jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compile_cache.ENV, "")
    assert compile_cache.default_dir() == "" and compile_cache.enable() is None
    monkeypatch.setenv(compile_cache.ENV, "/tmp/somewhere")
    assert compile_cache.default_dir() == "/tmp/somewhere"


def test_negative_threshold_is_an_error():
    with pytest.raises(ValueError, match=r"compile_cache\.min_compile_secs"):
        compile_cache.enable("", min_compile_secs=-1)
