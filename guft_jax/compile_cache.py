"""JAX's persistent compilation cache, for command-line runs and benchmarks (off in tests).

A compiled XLA program (same computation, shapes, flags, jax version and backend) is written to
a directory and read back by later processes, so a repeated run of one configuration (another
seed, an lr grid, a benchmark's second pair) skips the compiles it has seen: on 2 CPU cores a
GUFT run on DINOv2-S/14 spends tens of seconds compiling its step, saliency and top-k programs.
The library never turns it on by itself (it is process-wide state); entry points call
:func:`enable` once, before their first compile:

    from guft_jax import compile_cache
    compile_cache.enable()            # GUFT_JAX_CACHE_DIR or ~/.cache/guft_jax/xla
    compile_cache.enable("")          # off

Tests do not call it, so each test compiles afresh and trace counts stay what the test makes.
"""

from __future__ import annotations

import os

import jax

ENV = "GUFT_JAX_CACHE_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "guft_jax", "xla")

# Programs that compile faster than this are not written (jax's default is 1 s): small eager
# programs would fill the directory and read back no faster than they compile.
MIN_COMPILE_SECS = 0.5


def default_dir() -> str:
    """The cache directory :func:`enable` uses by default: ``$GUFT_JAX_CACHE_DIR`` if set (empty:
    off), else ``~/.cache/guft_jax/xla``."""
    return os.environ.get(ENV, os.path.expanduser(DEFAULT_DIR))


def enable(cache_dir: str | None = None, *, min_compile_secs: float = MIN_COMPILE_SECS):
    """Turns on JAX's persistent compilation cache in ``cache_dir`` for this process.

    Args:
      cache_dir: the directory (jax creates it at the first write); None: :func:`default_dir`;
        ``""``: leave the cache off.
      min_compile_secs: programs compiling faster than this are not written.

    Returns:
      The absolute directory, or None when left off.

    Raises:
      ValueError: a negative ``min_compile_secs``.

    >>> enable("")  # off: nothing changes
    """
    if min_compile_secs < 0:
        raise ValueError(f"compile_cache.min_compile_secs: must be >= 0, got {min_compile_secs}")
    path = default_dir() if cache_dir is None else cache_dir
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return path
