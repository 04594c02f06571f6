"""End-to-end ``fit()`` throughput against the bare jitted step, in one run.

    python -m benchmarks.fit_bench --model ViT-S/16 --image_size 112 --batch 50 --epochs 3

For each method and input kind (``host``: the source's numpy pipeline resizes and normalises on
the host and each batch is copied to the device; ``device``: the uint8 split is held on the
device and resized inside jit, :mod:`guft_jax.device_input`), ``train.fit`` runs on the real
Animal-MNIST train800val200 split (1,000 images, 28 px, resized to ``--image_size``) and its
steady-state epochs (epoch 2 on; epoch 1 holds the compile) are compared with the bare step:
the same jitted step timed back to back on one batch already on the device, as many steps as an
epoch has, which is what a perfect input pipeline would sustain. Reported: images/s of both,
``fit / bare`` (target >= 0.9, issue 16), and each fit's wall time (compile, evaluation on the
2,000 test images and, for GUFT, saliency included). Bare-step and fit measurements alternate so
machine noise hits both. Writes ``benchmarks/results/fit_bench.json``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from guft_jax import precision as precision_lib
from guft_jax import train, vit
from guft_jax.data import get_source
from guft_jax.methods import base as mbase
from guft_jax.methods import get_method, spec


def bare_step_images_per_s(model, method, params, *, image_size, batch, steps, lr) -> float:
    """Images/s of ``steps`` back-to-back jitted steps on one device-resident batch."""
    base = mbase.prepare_base(method, params)
    tx, state = train.optimizer_for(method, base, steps_per_epoch=steps, epochs=1, lr=lr)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    step = train.make_train_step(model, method, tx)
    mask = train.mask_of(method, state)
    state, loss = step(state, base, x, y, mask)  # compile + warm-up
    jax.block_until_ready(loss)
    t = time.perf_counter()
    for _ in range(steps):
        state, loss = step(state, base, x, y, mask)
    jax.block_until_ready(loss)
    return steps * batch / (time.perf_counter() - t)


def fit_once(model, method, params, source, *, image_size, batch, epochs, lr, kind, prec):
    t = time.perf_counter()
    r = train.fit(
        model=model,
        params=params,
        method=method,
        source=source,
        image_size=image_size,
        batch_size=batch,
        epochs=epochs,
        lr=lr,
        head_lr=lr,
        progress=False,
        log=lambda s: None,
        precision=prec,
        input=kind,
    ).results
    wall = time.perf_counter() - t
    steady = [h["images_per_s"] for h in r["history"][1:]]
    # host time to dispatch an epoch's steps over the epoch's time: near 1 = input/host-bound
    host = [h["dispatch_seconds"] / h["epoch_seconds"] for h in r["history"][1:]]
    return dict(
        wall_s=wall,
        images_per_s=float(np.median(steady)),
        epoch_images_per_s=[h["images_per_s"] for h in r["history"]],
        test_accuracy=r.get("test_accuracy"),
        host_fraction=float(np.median(host)),
        input=r["input"],
        precision=r["precision"],
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-S/16")
    ap.add_argument("--image_size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--inputs", default="host,device")
    ap.add_argument("--precision", default="auto", choices=precision_lib.CHOICES)
    ap.add_argument("--dataset", default="animal_mnist")
    ap.add_argument("--reps", type=int, default=2, help="alternations of (bare step, fit)")
    ap.add_argument("--out", default="benchmarks/results/fit_bench.json")
    ap.add_argument(
        "--bare_once",
        type=int,
        default=0,
        choices=(0, 1),
        help="1: time the bare step once per rep, not before each input kind (saves a compile)",
    )
    a = ap.parse_args(argv)
    if a.epochs < 2:
        ap.error("--epochs: must be >= 2 (epoch 1 holds the compile)")
    source = get_source(a.dataset, seed=0)
    model = precision_lib.with_precision(
        vit.build_model(a.model, num_classes=source.num_classes), a.precision
    )
    params = vit.init_params(model, jax.random.PRNGKey(0), a.image_size)
    steps = source.size("train800val200") // a.batch
    res = dict(
        machine=common.machine(),
        args=vars(a),
        steps_per_epoch=steps,
        runs={},
    )
    t0 = time.time()
    for name in a.methods.split(","):
        method = get_method(name, **(spec(name).defaults.kwargs or {}))
        lr = spec(name).defaults.lr
        row = {}
        for rep in range(a.reps):
            for i, kind in enumerate(a.inputs.split(",")):
                if i == 0 or not a.bare_once:  # the bare step compiles anew on each call
                    bare = bare_step_images_per_s(
                        model, method, params, image_size=a.image_size, batch=a.batch,
                        steps=steps, lr=lr,
                    )  # fmt: skip
                f = fit_once(
                    model,
                    method,
                    params,
                    source,
                    image_size=a.image_size,
                    batch=a.batch,
                    epochs=a.epochs,
                    lr=lr,
                    kind=kind,
                    prec=a.precision,
                )
                f["bare_images_per_s"] = bare
                f["fit_vs_bare"] = f["images_per_s"] / bare
                row.setdefault(kind, []).append(f)
                print(
                    f"{name:10s} input={kind:6s} rep {rep}: fit {f['images_per_s']:8.1f} img/s, "
                    f"bare step {bare:8.1f} img/s, fit/bare {f['fit_vs_bare']:.3f}, "
                    f"host {f['host_fraction']:.2f} of the epoch, "
                    f"wall {f['wall_s']:.0f} s",
                    flush=True,
                )
        for kind, fs in row.items():
            med = float(np.median([f["fit_vs_bare"] for f in fs]))
            row[kind] = dict(runs=fs, fit_vs_bare_median=med)
            print(f"{name:10s} input={kind:6s} median fit/bare over {len(fs)} reps: {med:.3f}")
        res["runs"][name] = row
        res["wall_s"] = time.time() - t0
        common.write_json(a.out, res)
    print(f"wrote {a.out} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
