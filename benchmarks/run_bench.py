"""Whole-run wall time of GUFT against LoRA: ``train.fit`` end to end, same data and model.

    python -m benchmarks.run_bench                       # the CPU size (see below)
    python -m benchmarks.run_bench --pool 10000 --train 1000 --epochs 10   # the issue's run

The issue's figure (issue 16): DINOv2-S/14 at 56 px, 10 epochs, batch 50, a 10,000-image npz
(VTAB-1K split: 800 + 200 train, 9,000 test): GUFT 191-220 s against LoRA's 97 s. Both methods
run with their shipped defaults (``Defaults`` of the registry: lr, head lr, kwargs); GUFT's
saliency passes, head warm-up, recompiles and host work are inside its wall time. Runs are
interleaved (``lora, guft, lora, guft, ...``) so machine noise hits both alike, and the ratio is
taken per pair (the median is reported).

JAX's persistent compilation cache is on (:func:`guft_jax.compile_cache.enable`; ``--cache_dir``,
default ``$GUFT_JAX_CACHE_DIR`` or ``~/.cache/guft_jax/xla``, ``--cache_dir ""`` turns it off), as
for a user's repeated runs: the first run of a configuration compiles, later ones (the second
pair, a rerun) read programs back. Cache hits are counted per run beside the compiles.

Per run: wall seconds of ``fit``, XLA compiles and their seconds (``jax.monitoring``'s backend
compile events), persistent-cache hits, the step's traces, seconds inside GUFT's
``epoch_start`` hook (saliency, head warm-up, top-k, capacity adoption) and the train epochs'
seconds. Writes ``benchmarks/results/run_bench.json``.

The default size fits a few minutes on 2 busy CPU cores: a 2,000-image pool of Fashion-MNIST
(from :mod:`guft_jax.data`), 300 train images (6 steps of 50 an epoch), 10 epochs, test 500.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from benchmarks import common
from guft_jax import compile_cache, train
from guft_jax.data import get_source
from guft_jax.methods import get_method, spec
from guft_jax.pretrained import load_pretrained

_COMPILES = {"n": 0, "s": 0.0, "hits": 0}


def _on_duration(event: str, duration: float, **kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES["n"] += 1
        _COMPILES["s"] += float(duration)


def _on_event(event: str, **kw) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _COMPILES["hits"] += 1


def make_npz(path: str, pool: int) -> str:
    """``pool`` Fashion-MNIST images (28x28 grey, uint8) with their labels, as a user npz."""
    if os.path.exists(path):
        return path
    (x, y), _ = _fashion_split()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))[:pool]
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=x[idx], labels=y[idx])
    os.replace(tmp, path)
    return path


def _fashion_split():
    from guft_jax.data import offline

    return offline._fashion_mnist()


def _timed_hooks(method, box: dict):
    """The method with its ``epoch_start`` hook timed into ``box["hook_s"]``."""
    hook = method.hooks.epoch_start
    if hook is None:
        return method

    def timed(epoch, ctx):
        t = time.perf_counter()
        out = hook(epoch, ctx)
        jax.block_until_ready(out)
        box["hook_s"] += time.perf_counter() - t
        box["rounds"].append(dict(epoch=epoch, s=time.perf_counter() - t))
        return out

    return method._replace(hooks=method.hooks._replace(epoch_start=timed))


def one_run(name: str, *, source, model_name: str, image_size: int, batch: int, epochs: int):
    d = spec(name).defaults
    model, params = load_pretrained(
        model_name, num_classes=source.num_classes, image_size=image_size
    )
    box = {"hook_s": 0.0, "rounds": []}
    method = _timed_hooks(get_method(name, **(d.kwargs or {})), box)
    lines = []
    c0 = dict(_COMPILES)
    t = time.perf_counter()
    res = train.fit(
        model=model,
        params=params,
        method=method,
        source=source,
        image_size=image_size,
        batch_size=batch,
        epochs=epochs,
        lr=d.lr,
        head_lr=d.head_lr,
        warmup_epochs=1.0,
        seed=0,
        progress=False,
        log=lines.append,
    ).results
    wall = time.perf_counter() - t
    hist = res.get("history", [])
    out = dict(
        method=name,
        wall_s=wall,
        compiles=_COMPILES["n"] - c0["n"],
        compile_s=_COMPILES["s"] - c0["s"],
        cache_hits=_COMPILES["hits"] - c0["hits"],
        epoch_start_s=box["hook_s"],
        rounds=box["rounds"],
        train_epochs_s=float(sum(h.get("epoch_seconds", 0.0) for h in hist)),
        step_traces=hist[-1].get("traces") if hist else None,
        test_accuracy=res.get("test_accuracy"),
        log=[s for s in lines if "recompute" in s or "capacity" in s or "head" in s],
    )
    out["rest_s"] = wall - out["epoch_start_s"] - out["train_epochs_s"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_s14")
    ap.add_argument("--image_size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--pool", type=int, default=2000, help="images in the npz")
    ap.add_argument("--train", type=int, default=300, help="train800val200 size (0: VTAB 1,000)")
    ap.add_argument("--test", type=int, default=500, help="test images (0: the rest of the pool)")
    ap.add_argument("--pairs", type=int, default=2, help="(lora, guft) pairs, interleaved")
    ap.add_argument("--methods", default="lora,guft")
    ap.add_argument("--npz", default="/tmp/guft_run_bench_{pool}.npz")
    ap.add_argument("--out", default="benchmarks/results/run_bench.json")
    ap.add_argument("--cache_dir", default=None, help='persistent compile cache ("": off)')
    a = ap.parse_args(argv)
    a.cache_dir = compile_cache.enable(a.cache_dir)
    print(f"persistent compilation cache: {a.cache_dir or 'off'}", flush=True)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)
    path = make_npz(a.npz.format(pool=a.pool), a.pool)
    kw = {}
    if a.train:
        kw.update(train_size=a.train - a.train // 5, val_size=a.train // 5)
    if a.test:
        kw["test_size"] = a.test
    source = get_source(f"npz:{path}", seed=0, **kw)
    sizes = {s: source.size(s) for s in ("train800val200", "test")}
    print(f"data {path}: {sizes}", flush=True)
    methods = a.methods.split(",")
    runs = []
    for p in range(a.pairs):
        for name in methods:
            r = one_run(
                name,
                source=source,
                model_name=a.model,
                image_size=a.image_size,
                batch=a.batch,
                epochs=a.epochs,
            )
            r["pair"] = p
            runs.append(r)
            print(
                f"pair {p} {name}: wall {r['wall_s']:.1f}s, train epochs "
                f"{r['train_epochs_s']:.1f}s, epoch_start {r['epoch_start_s']:.1f}s, "
                f"rest {r['rest_s']:.1f}s, compiles "
                f"{r['compiles']} ({r['compile_s']:.1f}s), cache hits {r['cache_hits']}, "
                f"traces {r['step_traces']}",
                flush=True,
            )
    ratios = []
    if len(methods) == 2:
        for p in range(a.pairs):
            w = {r["method"]: r["wall_s"] for r in runs if r["pair"] == p}
            ratios.append(w[methods[1]] / w[methods[0]])
    res = dict(
        machine=common.machine(),
        args=vars(a),
        data=sizes,
        runs=runs,
        ratios=ratios,
        ratio_median=float(np.median(ratios)) if ratios else None,
    )
    if ratios:
        print(f"{methods[1]} / {methods[0]} wall: {ratios} (median {res['ratio_median']:.3f})")
    common.write_json(a.out, res)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
