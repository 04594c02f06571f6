"""What every benchmark records about the machine, and how it writes its JSON."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import jax


def machine(**extra: Any) -> dict:
    """CPU count, platform, the first JAX device, its backend and JAX's version (+ ``extra``)."""
    return dict(
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        device=str(jax.devices()[0]),
        backend=jax.default_backend(),
        jax=jax.__version__,
        **extra,
    )


def write_json(path: str, res: dict) -> None:
    """Writes ``res`` to ``path`` (its folder created), indented."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
