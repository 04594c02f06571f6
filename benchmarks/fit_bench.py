"""Whole ``train.fit`` runs timed: against the bare jitted step, or method against method.

    python -m benchmarks.fit_bench --model ViT-S/16 --image_size 112 --batch 50 --epochs 3
    python -m benchmarks.fit_bench --compare runs                    # GUFT vs LoRA, whole runs
    python -m benchmarks.fit_bench --compare runs --pool 10000 --train 1000 --epochs 10
    python -m benchmarks.fit_bench --compare runs --lengths cpu,56px --cache_dir ""  # issue 28

``--compare bare`` (default; ``benchmarks/results/fit_bench.json``): for each method and input
kind (``host``: the source's numpy pipeline resizes and normalises on the host and each batch is
copied to the device; ``device``: the uint8 split is held on the device and resized inside jit,
:mod:`guft_jax.device_input`), ``train.fit`` runs on the real Animal-MNIST trainval split (1,000
images, 28 px, resized to ``--image_size``) and its steady-state epochs (epoch 2 on; epoch 1
holds the compile) are compared with the bare step: the same jitted step run back to back on one
batch already on the device, as many steps as an epoch has, which is what a perfect input
pipeline would sustain (:func:`benchmarks.harness.back_to_back`). Reported: images/s of both,
``fit / bare`` (target >= 0.9, issue 16), and each fit's wall time (compile, evaluation on the
2,000 test images and, for GUFT, saliency included). Bare-step and fit measurements alternate so
machine noise hits both.

``--compare runs`` (``benchmarks/results/fit_bench_runs.json``): whole-run wall time of GUFT
against LoRA, same data and model (DINOv2-S/14, batch 50). Both methods run with their shipped
defaults (``Defaults`` of the registry: lr, head lr, kwargs); GUFT's saliency passes, head warm-up,
recompiles and host work are inside its wall time. Runs are interleaved (``lora, guft, lora,
guft, ...``) and the ratio is taken per pair (the median is reported). ``--lengths cpu,56px``
runs the issue-28 sizes one after the other: the offline benchmark's ``cpu`` preset (Animal-MNIST,
its 1,000-image trainval, 28 px, 5 epochs) and 10 epochs of 1,000 Fashion-MNIST images at 56 px.
JAX's persistent compilation cache is on (:func:`guft_jax.compile_cache.enable`; ``--cache_dir
""`` turns it off, as for the acceptance figure: every compile is paid in the run). Per run: wall
seconds and their decomposition (:func:`decomposition`: compile, saliency, steps, host), XLA
compiles and their seconds (``jax.monitoring``'s backend compile events), persistent-cache hits,
the step's traces (``train.fit``'s count), seconds inside the method's ``epoch_start`` hook per
round and the train epochs' seconds. Without ``--lengths`` the default size fits a few minutes on
2 busy CPU cores: a 2,000-image pool of Fashion-MNIST, 300 train images, 10 epochs, test 500.

    python -m benchmarks.fit_bench --compare runs --lengths cpu,56px --cache_dir "" --reps 1

Defaults not given here (batch size, image size, epochs, warm-up of ``runs``) are the training
defaults of :class:`guft_jax.config.TrainConfig`.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, harness
from benchmarks.step_bench import step_case
from guft_jax import compile_cache, vit
from guft_jax import precision as precision_lib
from guft_jax.config import TrainConfig
from guft_jax.data import get_source, offline
from guft_jax.methods import get_method, spec
from guft_jax.pretrained import load_pretrained

COMPARES = ("bare", "runs")
MODE_DEFAULTS = {
    "bare": dict(
        model="ViT-S/16",
        image_size=112,
        epochs=3,
        methods="lora,full",
        dataset="animal_mnist",
        reps=2,
        out="benchmarks/results/fit_bench.json",
    ),
    "runs": dict(
        model="dinov2_s14",
        image_size=TrainConfig().image_size,
        epochs=TrainConfig().epochs,
        methods="lora,guft",
        dataset=None,
        reps=2,
        out="benchmarks/results/fit_bench_runs.json",
    ),
}


def registered(name: str):
    """``(method, defaults)``: the registered method with its registered defaults."""
    d = spec(name).defaults
    return get_method(name, **(d.kwargs or {})), d


# --- compare "bare" ----------------------------------------------------------------------------


def config_of(a, **changes) -> TrainConfig:
    """The runs' :class:`TrainConfig`: ``--image_size``, ``--batch``, ``--epochs`` and
    ``changes`` over the training defaults."""
    return TrainConfig(image_size=a.image_size, batch_size=a.batch, epochs=a.epochs, **changes)


def bare_images_per_s(model, method, params, config: TrainConfig, steps: int) -> float:
    """Images/s of ``steps`` back-to-back jitted steps on one device-resident batch."""
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.image_size, config.image_size, 3)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, config.batch_size).astype(np.int32))
    run = step_case("bare", model, method, params, x, y, lr=config.lr).build()
    return steps * config.batch_size / harness.back_to_back(run, steps)


def fit_row(model, method, params, source, config: TrainConfig) -> dict:
    """One fit's steady-state images/s, host fraction and wall time."""
    fr, wall = harness.timed_fit(model, params, method, source, config)
    r = fr.results
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


def bare_method(a, name, model, params, source, steps, log) -> dict:
    """One method's fit-vs-bare rows over ``--reps`` alternations and each input kind."""
    method, d = registered(name)
    config = config_of(a, lr=d.lr, head_lr=d.lr, precision=a.precision)
    row = {}
    for rep in range(a.reps):
        for i, kind in enumerate(a.inputs.split(",")):
            if i == 0 or not a.bare_once:  # the bare step compiles anew on each call
                bare = bare_images_per_s(model, method, params, config, steps)
            f = fit_row(model, method, params, source, config.replace(input=kind))
            f["bare_images_per_s"] = bare
            f["fit_vs_bare"] = f["images_per_s"] / bare
            row.setdefault(kind, []).append(f)
            log(
                f"{name:10s} input={kind:6s} rep {rep}: fit {f['images_per_s']:8.1f} img/s, "
                f"bare step {bare:8.1f} img/s, fit/bare {f['fit_vs_bare']:.3f}, "
                f"host {f['host_fraction']:.2f} of the epoch, wall {f['wall_s']:.0f} s"
            )
    for kind, fs in row.items():
        med = float(np.median([f["fit_vs_bare"] for f in fs]))
        row[kind] = dict(runs=fs, fit_vs_bare_median=med)
        log(f"{name:10s} input={kind:6s} median fit/bare over {len(fs)} reps: {med:.3f}")
    return row


def compare_bare(a, log):
    """``--compare bare``: every method's fit against its bare step (JSON after each method)."""
    if a.epochs < 2:
        raise SystemExit("--epochs: must be >= 2 (epoch 1 holds the compile)")
    source = get_source(a.dataset, seed=0)
    model = precision_lib.with_precision(
        vit.build_model(a.model, num_classes=source.num_classes), a.precision
    )
    params = vit.init_params(model, jax.random.PRNGKey(0), a.image_size)
    steps = source.size(TrainConfig().train_split) // a.batch
    res = dict(machine=common.machine(), args=vars(a), steps_per_epoch=steps, runs={})
    for name in a.methods.split(","):
        res["runs"][name] = bare_method(a, name, model, params, source, steps, log)
        yield res


# --- compare "runs" ----------------------------------------------------------------------------


class CompileCounter:
    """XLA compiles, their seconds and persistent-cache hits, from ``jax.monitoring`` events;
    the seconds also by phase (``phase``: ``"run"``, or ``"epoch_start"`` while a method's hook
    runs) and those of the train step (``jit(step)``) outside the hook."""

    def __init__(self):
        self.n, self.s, self.hits = 0, 0.0, 0
        self.phase, self.hook_s, self.step_s = "run", 0.0, 0.0
        self.by_name: dict = {}  # "phase:jit(name)" -> [compiles, seconds]
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, fun_name: str = "", **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1
            self.s += float(duration)
            row = self.by_name.setdefault(f"{self.phase}:{fun_name}", [0, 0.0])
            row[0], row[1] = row[0] + 1, row[1] + float(duration)
            if self.phase == "epoch_start":
                self.hook_s += float(duration)
            elif fun_name == "jit(step)":
                self.step_s += float(duration)

    def _on_event(self, event: str, **kw) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def snapshot(self) -> tuple[int, float, int, float, float]:
        """``(compiles, seconds, cache hits, seconds in the hook, train-step seconds)``."""
        return self.n, self.s, self.hits, self.hook_s, self.step_s


def make_npz(path: str, pool: int) -> str:
    """``pool`` Fashion-MNIST images (28x28 grey, uint8) with their labels, as a user npz."""
    if os.path.exists(path):
        return path
    (x, y), _ = offline.read_fashion_mnist()
    idx = np.random.default_rng(0).permutation(len(y))[:pool]
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=x[idx], labels=y[idx])
    os.replace(tmp, path)
    return path


def timed_hooks(method, box: dict, counter: CompileCounter | None = None):
    """The method with its ``epoch_start`` hook timed into ``box["hook_s"]`` and
    ``box["rounds"]`` (the ``counter``'s phase is ``"epoch_start"`` meanwhile)."""
    hook = method.hooks.epoch_start
    if hook is None:
        return method

    def timed(epoch, ctx):
        t = time.perf_counter()
        if counter is not None:
            counter.phase = "epoch_start"
        try:
            out = hook(epoch, ctx)
            jax.block_until_ready(out)
        finally:
            if counter is not None:
                counter.phase = "run"
        box["hook_s"] += time.perf_counter() - t
        box["rounds"].append(dict(epoch=epoch, s=time.perf_counter() - t))
        return out

    return method._replace(hooks=method.hooks._replace(epoch_start=timed))


def decomposition(wall: float, compile_s: float, hook: tuple, epochs: tuple) -> dict:
    """A run's wall seconds as ``compile`` (every XLA compile), ``saliency`` (the method's
    ``epoch_start`` hook less its compiles: saliency passes, head warm-up, selection, host
    adoption), ``steps`` (the train epochs less the train step's compiles) and ``host`` (the
    rest: data, evaluation, init, logging), which add up to ``wall``.

    Args:
      wall: the run's wall seconds.
      compile_s: its compile seconds.
      hook: ``(seconds in the hook, compile seconds in it)``.
      epochs: ``(train epochs' seconds, train-step compile seconds)``.

    >>> decomposition(10.0, 4.0, (3.0, 1.0), (5.0, 2.0))
    {'compile': 4.0, 'saliency': 2.0, 'steps': 3.0, 'host': 1.0}
    """
    saliency, steps = hook[0] - hook[1], epochs[0] - epochs[1]
    host = wall - compile_s - saliency - steps
    return dict(compile=compile_s, saliency=saliency, steps=steps, host=host)


def one_run(name: str, a, source, counter: CompileCounter) -> dict:
    """One whole ``fit`` of ``name`` (its shipped defaults), with where its time went."""
    method, d = registered(name)
    model, params = load_pretrained(
        a.model, num_classes=source.num_classes, image_size=a.image_size
    )
    # Each run compiles as a fresh process would (programs that do not depend on the size, such
    # as GUFT's top-k, are not reused from an earlier run); the persistent cache, if on, stays.
    jax.clear_caches()
    box = {"hook_s": 0.0, "rounds": []}
    lines = []
    c0, by0 = counter.snapshot(), {k: list(v) for k, v in counter.by_name.items()}
    config = config_of(a, lr=d.lr, head_lr=d.head_lr)
    fr, wall = harness.timed_fit(
        model, params, timed_hooks(method, box, counter), source, config, log=lines.append
    )
    res = fr.results
    hist = res.get("history", [])
    n, secs, hits, hook_c, step_c = (u - v for u, v in zip(counter.snapshot(), c0, strict=True))
    by = {k: (v[0] - by0.get(k, [0, 0.0])[0], v[1] - by0.get(k, [0, 0.0])[1])
          for k, v in counter.by_name.items()}  # fmt: skip
    top = sorted(((v[1], k, v[0]) for k, v in by.items() if v[0]), reverse=True)[:8]
    out = dict(
        method=name,
        wall_s=wall,
        compiles=n,
        compile_s=secs,
        cache_hits=hits,
        epoch_start_s=box["hook_s"],
        rounds=box["rounds"],
        train_epochs_s=float(sum(h.get("epoch_seconds", 0.0) for h in hist)),
        step_traces=hist[-1].get("traces") if hist else None,
        compile_top=[dict(program=k, compiles=c, s=t) for t, k, c in top],
        test_accuracy=res.get("test_accuracy"),
        log=[x for x in lines if any(w in x for w in ("recompute", "capacity", "head", "block"))],
    )
    out["rest_s"] = wall - out["epoch_start_s"] - out["train_epochs_s"]
    out["decomposition"] = decomposition(
        wall, secs, (out["epoch_start_s"], hook_c), (out["train_epochs_s"], step_c)
    )
    return out


def split_sizes(source) -> dict:
    """Images in the splits a run trains on and is evaluated on (the training defaults)."""
    return {s: source.size(s) for s in (TrainConfig().train_split, TrainConfig().eval_split)}


def runs_source(a, log):
    """The ``runs`` data: ``--dataset``, or an npz of ``--pool`` Fashion-MNIST images split into
    ``--train`` (4:1 train:val) and ``--test`` images."""
    if a.dataset:
        return get_source(a.dataset, seed=0)
    path = make_npz(a.npz.format(pool=a.pool), a.pool)
    kw = {}
    if a.train:
        kw.update(train_size=a.train - a.train // 5, val_size=a.train // 5)
    if a.test:
        kw["test_size"] = a.test
    source = get_source(f"npz:{path}", seed=0, **kw)
    log(f"data {path}: {split_sizes(source)}")
    return source


def run_lengths() -> dict:
    """``--lengths``' named run sizes (overrides of the command line): ``cpu``, the offline
    benchmark's ``cpu`` preset (its task's own trainval and test splits, its image size and
    epochs); ``56px``, 10 epochs of 1,000 Fashion-MNIST images at 56 px (test 500)."""
    from experiments.presets import PRESETS

    cpu = PRESETS["cpu"]
    return {
        "cpu": dict(dataset=cpu.tasks[0], image_size=cpu.image_size, epochs=cpu.epochs),
        "56px": dict(dataset=None, image_size=56, epochs=10, train=1000, test=500),
    }


def summarise(runs: list, methods: list, reps: int, log) -> dict:
    """Per-pair wall ratios (second method over first), their median, each method's median
    decomposition and every run's step-trace count."""
    ratios = []
    if len(methods) == 2:
        for p in range(reps):
            w = {r["method"]: r["wall_s"] for r in runs if r["pair"] == p}
            ratios.append(w[methods[1]] / w[methods[0]])
            log(f"{methods[1]} / {methods[0]} wall, pair {p}: {ratios[-1]:.3f}")
    parts = {}
    for name in methods:
        mine = [r["decomposition"] for r in runs if r["method"] == name]
        parts[name] = {k: float(np.median([d[k] for d in mine])) for k in mine[0]}
        parts[name]["wall"] = float(np.median([r["wall_s"] for r in runs if r["method"] == name]))
    return dict(
        ratios=ratios,
        ratio_median=float(np.median(ratios)) if ratios else None,
        decomposition_median=parts,
        traces={name: [r["step_traces"] for r in runs if r["method"] == name] for name in methods},
    )


def compare_runs(a, log):
    """``--compare runs``: interleaved whole runs of each method, ``--reps`` times, at each of
    ``--lengths`` (none: the command line's size); the JSON is rewritten after each length."""
    a.cache_dir = compile_cache.enable(a.cache_dir)
    log(f"persistent compilation cache: {a.cache_dir or 'off'}")
    counter = CompileCounter()
    methods = a.methods.split(",")
    named = run_lengths()
    todo = [(n, named[n]) for n in a.lengths.split(",")] if a.lengths else [("args", {})]
    res = dict(machine=common.machine(), args=vars(a), lengths={})
    for length, changes in todo:
        b = argparse.Namespace(**{**vars(a), **changes})
        source = runs_source(b, log)
        runs = []
        for p in range(b.reps):
            for name in methods:
                r = dict(one_run(name, b, source, counter), pair=p)
                runs.append(r)
                d = r["decomposition"]
                log(
                    f"{length} pair {p} {name}: wall {r['wall_s']:.1f}s = compile "
                    f"{d['compile']:.1f} + saliency {d['saliency']:.1f} + steps "
                    f"{d['steps']:.1f} + host {d['host']:.1f}; compiles {r['compiles']}, cache "
                    f"hits {r['cache_hits']}, traces {r['step_traces']}"
                )
        res["lengths"][length] = dict(
            size=dict(image_size=b.image_size, epochs=b.epochs, dataset=b.dataset),
            data=split_sizes(source),
            runs=runs,
            **summarise(runs, methods, b.reps, log),
        )
        yield res


def parse(argv=None) -> argparse.Namespace:
    """The command line; options left unset take ``--compare``'s defaults."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", default="bare", choices=COMPARES)
    ap.add_argument("--model")
    ap.add_argument("--image_size", type=int)
    ap.add_argument("--batch", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--methods", help="comma-separated registered methods")
    ap.add_argument("--dataset", help="a data source name (runs: default the Fashion-MNIST npz)")
    ap.add_argument("--reps", type=int, help="bare: (bare step, fit) alternations; runs: pairs")
    ap.add_argument("--pairs", type=int, dest="reps", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    ap.add_argument("--inputs", default="host,device", help="bare: input kinds")
    ap.add_argument("--precision", default="auto", choices=precision_lib.CHOICES)
    ap.add_argument(
        "--bare_once",
        type=int,
        default=0,
        choices=(0, 1),
        help="bare: 1 times the bare step once per rep, not before each input kind",
    )
    ap.add_argument("--pool", type=int, default=2000, help="runs: images in the npz")
    ap.add_argument("--train", type=int, default=300, help="runs: trainval size (0: 1,000)")
    ap.add_argument("--test", type=int, default=500, help="runs: test images (0: the rest)")
    ap.add_argument("--npz", default="/tmp/guft_run_bench_{pool}.npz", help="runs: the npz")
    ap.add_argument("--cache_dir", default=None, help='runs: persistent compile cache ("": off)')
    ap.add_argument(
        "--lengths",
        default="",
        help="runs: comma-separated named sizes (cpu: the cpu preset's; 56px: 10 epochs of "
        "1,000 images at 56 px), each overriding the size options; empty: the options as given",
    )
    a = ap.parse_args(argv)
    harness.apply_defaults(a, MODE_DEFAULTS[a.compare])
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    log = lambda s: print(s, flush=True)
    return harness.write_each(
        (compare_bare if a.compare == "bare" else compare_runs)(a, log), a.out, log
    )


if __name__ == "__main__":
    main()
