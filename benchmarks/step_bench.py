"""Train-step cost of each method relative to full fine-tuning, measured in one run.

    python -m benchmarks.step_bench --models ViT-S/16,ViT-B/16 --image_size 224 --batch 32
    python -m benchmarks.step_bench --group losia --models ViT-S/16 --batch 8,32 --reps 7
    python -m benchmarks.step_bench --group guft_real     # DINOv2-S/14, Animal-MNIST

Every row is the engine's own jitted step (forward + backward + AdamW update + the method's step
hook), compiled once and timed round-robin with the others by :mod:`benchmarks.harness` (compile
seconds, XLA's peak-memory estimate of the compiled step, its FLOPs, the median step and its
ratio to full fine-tuning's in the same run). Three groups of rows:

- ``methods`` (default; ``benchmarks/results/step_bench.json``): every registered method with its
  registered defaults, per model (``--batch``: one size, or one per model). GUFT is timed at the
  paper's final budget (0.34% of the backbone, entries spread over tensors in proportion to their
  size) on its sparse path and on the dense reference path (``guft_dense``), and with each SDDMM
  implementation forced (``guft_gather``, ``guft_dense_dw``, ``guft_pallas``); its saliency pass
  (batch mode) is timed against as many plain forward+backward passes. Also the achieved FLOP/s
  as a fraction of a large float32 matmul's measured in the same run (a CPU "MFU").
  ``--precision fp32,bf16`` measures each method under each policy in the same round-robin
  (rows ``name@bf16``; ``step_vs_full`` against full fine-tuning at the same precision,
  ``step_vs_full_fp32`` against fp32 full fine-tuning); ``--peer torch`` adds the PyTorch peer
  (:mod:`benchmarks.torch_peer`) to the round-robin; ``--remat 1`` remats each block.
- ``losia`` (``benchmarks/results/losia_bench.json``): LoSiA-Pro against full fine-tuning and
  LoSiA, each ``--batch`` size of each model measured separately. The LoSiA rows run with their
  registered defaults (p = 1/8, T = 100) from step 0, so one layer is recording importance (its
  dense weight gradient runs) in every measured step, as in training; ``losia_pro_static`` is
  LoSiA-Pro without relocalisation (no importance tap, no dense weight gradient at all).
- ``guft_real`` (``benchmarks/results/guft_step_bench.json``): GUFT at a real selection. Real
  saliency selections cluster, unlike the magnitude selection of ``methods``: GUFT is first
  trained with its shipped defaults (rounds at epochs 1, 2, 3 of a 3-epoch ``train.fit`` on the
  real Animal-MNIST trainval split, pretrained DINOv2-S/14), then its step at that final
  selection is timed with each weight-gradient choice of the sparse path (``guft``: row x column
  blocks in both passes where a block is at most the block fraction of a matrix;
  ``guft_block_dw``: blocks for the weight gradient only, ``W0 + S`` densified in each pass;
  ``guft_noblock``: blocks disabled, the backend's SDDMM everywhere) beside ``full``, ``lora``
  and ``bitfit``. Also: how much of each matrix its block covers.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, harness
from guft_jax import guft as guft_lib
from guft_jax import kernels as kernels_lib
from guft_jax import masks, paths, saliency, train, vit
from guft_jax import precision as precision_lib
from guft_jax.config import TrainConfig
from guft_jax.data import get_source
from guft_jax.methods import base as mbase
from guft_jax.methods import get_method, method_names, spec
from guft_jax.pretrained import load_pretrained

# GUFT's sparse path with each SDDMM implementation forced, and the kernel choices of the
# ``guft_real`` rows (the sparse path's weight-gradient variants).
SDDMM_ROWS = {
    "guft_gather": dict(sddmm="gather"),
    "guft_dense_dw": dict(sddmm="dense"),
    "guft_pallas": dict(sddmm="pallas"),
}
BLOCK_ROWS = {
    "guft": dict(block_forward="on"),
    "guft_block_dw": dict(block_forward="off"),
    "guft_noblock": dict(block_forward="on", block_max_fraction=0.0),
}
METHODS = (*method_names(), "guft_dense", *SDDMM_ROWS)
LOSIA_ROWS = {
    "full": ("full", {}),
    "losia": ("losia", None),
    "losia_pro": ("losia_pro", None),
    "losia_pro_static": ("losia_pro", dict(relocalize=False)),
}
REAL_ROWS = ("full", "lora", "bitfit", *BLOCK_ROWS)
GROUPS = ("methods", "losia", "guft_real")


class GroupDefaults(NamedTuple):
    """A group's defaults of the options left unset on the command line (``None``: the training
    default, :class:`guft_jax.config.TrainConfig`)."""

    models: str
    image_size: int | None
    batch: str | None
    reps: int
    rows: str
    precision: str


GROUP_DEFAULTS = {
    "methods": GroupDefaults("ViT-S/16,ViT-B/16", 224, "32", 3, ",".join(METHODS), "fp32"),
    "losia": GroupDefaults("ViT-S/16", 224, "8,32", 7, ",".join(LOSIA_ROWS), "fp32"),
    "guft_real": GroupDefaults("dinov2_s14", None, None, 7, ",".join(REAL_ROWS), "auto"),
}


def registered(name: str, **override):
    """The registered method ``name`` with its registered default hyperparameters."""
    return get_method(name, **{**(spec(name).defaults.kwargs or {}), **override})


def _method_row(name: str):
    """A ``methods`` row's method. GUFT rows run at the paper's final budget (0.34%) spread over
    the tensors in proportion to their size: GUFT's own machinery with the magnitude score and
    per-tensor allocation fills the mask (no saliency pass needed to time a step)."""
    kw = dict(recompute_epochs=[1], ratios=[0.0034], score="magnitude", allocation="per_tensor")
    if name == "guft" or name in SDDMM_ROWS:
        return get_method("guft", kernels=SDDMM_ROWS.get(name), **kw)
    if name == "guft_dense":
        return get_method("guft", sparse=False, **kw)
    return registered(name)


def synthetic_inputs(model_name: str, *, image_size: int, batch: int, remat: bool = False):
    """``(model, params, x, y)``: a 100-class ViT (non-zero head, so the backbone's gradient is
    not exactly zero) and one random batch."""
    model = vit.build_model(model_name, num_classes=100)
    if remat:  # jax.checkpoint per encoder block
        model = model.clone(remat=True)
    params = vit.init_params(model, jax.random.PRNGKey(0), image_size)
    params = dict(params, head=jax.tree.map(lambda v: v + 0.01, params["head"]))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, image_size, image_size, 3))
    y = jnp.arange(batch, dtype=jnp.int32) % 100
    return model, params, x, y


def step_case(key, model, method, params, x, y, *, lr, state=None, info=None):
    """A :class:`harness.Case` timing the engine's train step of ``method`` on ``(x, y)``.

    Args:
      key: the row name.
      model: the (precision-cast) model.
      method: the method.
      params: the base params (the method's ``prepare_base`` runs once, outside the step).
      x: the batch's images.
      y: its labels.
      lr: the optimizer's learning rate.
      state: a train state to start from (its optimizer state re-initialised); None: a fresh
        one, with the method's first ``epoch_start`` run on the batch.
      info: extra fields for the row.
    """

    def build():
        base = mbase.prepare_base(method, params) if state is None else params
        tx, st = train.optimizer_for(method, base, steps_per_epoch=1000, epochs=1, lr=lr)
        if state is None:
            st = train.epoch_start(
                model, method, base, st, 1, batches=lambda: [(x, y)], epochs=1, log=lambda s: None
            )
        else:  # the step donates its state: a copy, with a fresh optimizer state
            st = jax.tree.map(jnp.copy, state)
            st = st._replace(opt_state=tx.init(st.trainable))
        step = train.make_train_step(model, method, tx)
        run = harness.jit_run(key, step, (st, base, x, y, train.mask_of(method, st)))
        st = run.args[0]
        n = sum(train.trained_counts(method, base, st.trainable, st.method_state).values())
        run.info.update(trainable=int(n), opt_state_bytes=harness.tree_bytes(st.opt_state))
        if "kernels" in method.hparams:  # the resolved kernel choices the step was traced with
            run.info["kernels"] = dict(method.hparams["kernels"])
        run.info.update(info or {})
        return run

    return harness.Case(key, build)


def matmul_flops_per_s(n=2048, reps=5, dtype=jnp.float32) -> float:
    """FLOP/s of one ``n``³ matmul on random data (zeros and ones run faster than real data)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    run = harness.jit_run("matmul", jax.jit(lambda u, v: u @ v), (a, b), carry=0)
    harness.round_robin({"matmul": run}, reps)
    return 2 * n**3 / float(np.median(run.times))


# --- group "methods" ---------------------------------------------------------------------------


def _method_cases(model, params, x, y, *, methods, precisions):
    multi = len(precisions) > 1
    for prec in precisions:
        pmodel = precision_lib.with_precision(model, prec)
        for name in methods:
            key = f"{name}@{prec}" if multi else name
            info = dict(
                precision=precision_lib.resolve_precision(prec),
                full_key=f"full@{prec}" if multi else "full",
            )
            m = _method_row(name)
            yield step_case(key, pmodel, m, params, x, y, lr=TrainConfig().lr, info=info)


def _peer_cases(model_name, *, image_size, batch, precisions, peer):
    """The PyTorch peer's rows (``benchmarks.torch_peer``), timed in the same round-robin."""
    from benchmarks import torch_peer

    multi = len(precisions) > 1
    for prec in precisions:
        for spec_ in peer:
            method, _, comp = spec_.partition("+")
            p = precision_lib.resolve_precision(prec)
            key = f"torch:{spec_}@{prec}" if multi else f"torch:{spec_}"

            def build(method=method, comp=comp, p=p, key=key):
                r = torch_peer.build(
                    model_name,
                    method,
                    image_size=image_size,
                    batch=batch,
                    precision=p,
                    compile_model=comp == "compile",
                )
                return harness.Run(
                    key,
                    r.step,
                    peak_bytes=r.peak_bytes,
                    info=dict(precision=p, trainable=r.trainable),
                )

            yield harness.Case(key, build)


def _method_rows(runs, *, batch, backbone):
    rows = {k: harness.summary(r, batch=batch) for k, r in runs.items()}
    f32 = rows.get("full@fp32", rows.get("full"))
    for row in rows.values():
        row["trainable_pct"] = 100 * row["trainable"] / backbone
        ref = rows.get(row.pop("full_key"))
        if ref is not None:
            harness.add_ratios(row, ref, "full")
        if f32 is not None:
            row["step_vs_full_fp32"] = row["step_s"] / f32["step_s"]
    return rows


def _peer_rows(runs, rows, *, batch, multi):
    out = {}
    for k, r in runs.items():
        out[k] = harness.summary(r, batch=batch)
        own = rows.get(f"full@{out[k]['precision']}" if multi else "full")
        if own:
            out[k]["our_full_vs_this"] = own["images_per_s"] / out[k]["images_per_s"]
    return out


def bench_methods(
    model_name,
    *,
    image_size,
    batch,
    reps,
    methods,
    log,
    precisions=("fp32",),
    peer=(),
    saliency_pass=True,
    remat=False,
) -> dict:
    """The ``methods`` group for one model: ``dict(methods, saliency, backbone_params, peer,
    failed)``."""
    model, params, x, y = synthetic_inputs(
        model_name, image_size=image_size, batch=batch, remat=remat
    )
    backbone = vit.count_params({k: v for k, v in params.items() if k != "head"})
    failed = {}
    cases = _method_cases(model, params, x, y, methods=methods, precisions=precisions)
    runs = harness.prepare(cases, log, failed)
    peers = harness.prepare(
        _peer_cases(
            model_name, image_size=image_size, batch=batch, precisions=precisions, peer=peer
        ),
        log,
        failed,
    )
    harness.round_robin({**runs, **peers}, reps)
    rows = _method_rows(runs, batch=batch, backbone=backbone)
    peer_rows = _peer_rows(peers, rows, batch=batch, multi=len(precisions) > 1)
    sal = _saliency_vs_plain(model, params, x, y, reps) if saliency_pass else None
    return dict(methods=rows, saliency=sal, backbone_params=backbone, peer=peer_rows, failed=failed)


def _saliency_vs_plain(model, params, x, y, reps):
    """GUFT's saliency pass vs the same number of plain fwd+bwd passes (and one global top-k)."""
    loss = jax.jit(
        lambda theta, xx, yy: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": theta}, xx), yy
        )
    )
    eligible = masks.eligible_leaves(params, preset="blocks")
    theta = {k: paths.get(params, paths.path_of(k)) for k in eligible}

    def per_ex(th, xx, yy):
        return loss(paths.replaced(params, {paths.path_of(k): v for k, v in th.items()}), xx, yy)

    acc = saliency.make_accumulator(per_ex, mode="batch")
    grad = jax.jit(jax.grad(lambda th, xx, yy: jnp.mean(per_ex(th, xx, yy))))
    n_batches = max(2, reps)
    batches = [(np.asarray(x), np.asarray(y))] * n_batches
    saliency.compute(per_ex, theta, batches[:1], accumulator=acc)  # compile
    jax.block_until_ready(grad(theta, x, y))
    t = time.perf_counter()
    g, _ = saliency.compute(per_ex, theta, batches, accumulator=acc)
    jax.block_until_ready(g)
    sal_s = time.perf_counter() - t
    t = time.perf_counter()
    for xx, yy in batches:
        jax.block_until_ready(grad(theta, xx, yy))
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    k = masks.budget(0.001, sum(math.prod(s) for s in eligible.values()))
    jax.block_until_ready(masks.topk_mask(g, k))
    topk_s = time.perf_counter() - t
    return dict(
        batches=n_batches,
        saliency_s=sal_s,
        plain_fwd_bwd_s=plain_s,
        ratio=sal_s / plain_s,
        topk_s=topk_s,
        topk_k=k,
    )


def run_methods(a, log) -> dict:
    """The ``methods`` group over ``--models`` (one ``--batch`` per model, or one for all)."""
    peer = ("full", "full+compile", "lora", "bitfit") if a.peer == "torch" else ()
    precisions = [p.strip() for p in a.precision.split(",") if p.strip()]
    res = dict(
        machine=common.machine(), args=vars(a), matmul_flops_per_s=matmul_flops_per_s(), models={}
    )
    if jax.default_backend() != "cpu":  # the accelerator's bf16 ceiling, measured in this run
        res["matmul_bf16_flops_per_s"] = matmul_flops_per_s(8192, 10, jnp.bfloat16)
    models = a.models.split(",")
    batches = [int(b) for b in str(a.batch).split(",")]
    batches = batches * len(models) if len(batches) == 1 else batches
    for name, batch in zip(models, batches, strict=True):
        log(f"{name} @ {a.image_size}px, batch {batch}")
        r = bench_methods(
            name,
            image_size=a.image_size,
            batch=batch,
            reps=a.reps,
            methods=a.rows.split(","),
            log=log,
            precisions=precisions,
            peer=peer,
            saliency_pass=bool(a.saliency),
            remat=bool(a.remat),
        )
        for o in r["methods"].values():
            if o["flops_per_s"]:
                o["mfu_vs_matmul"] = o["flops_per_s"] / res["matmul_flops_per_s"]
                if "matmul_bf16_flops_per_s" in res:  # MFU against the measured bf16 peak
                    o["mfu_vs_bf16_matmul"] = o["flops_per_s"] / res["matmul_bf16_flops_per_s"]
        r["batch"] = batch
        res["models"][name] = r
        log(table(name, r))
        for pn, po in r["peer"].items():
            log(
                f"| {pn} | step {po['step_s']:.4f}s | {po['images_per_s']:.0f} img/s | "
                f"ours(full)/this {po.get('our_full_vs_this', float('nan')):.3f} | "
                f"peak {(po['peak_bytes'] or 0) / 2**30:.2f} GiB |"
            )
        yield res  # written after each model


def table(name, r) -> str:
    """The ``methods`` rows of one model as a markdown table (and the saliency line)."""
    nan = float("nan")
    lines = [
        f"| {name} | trainable % | step s | img/s | step / full | opt state MB | opt / full "
        f"| peak MB | peak / full | MFU vs matmul | MFU vs bf16 matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, o in r["methods"].items():
        lines.append(
            f"| {m} | {o['trainable_pct']:.3f} | {o['step_s']:.4f} | {o['images_per_s']:.0f} | "
            f"{o.get('step_vs_full', nan):.3f} | {o['opt_state_bytes'] / 2**20:.2f} | "
            f"{o.get('opt_state_vs_full', nan):.4f} | {(o['peak_bytes'] or 0) / 2**20:.0f} | "
            f"{o.get('peak_vs_full', nan):.3f} | {o.get('mfu_vs_matmul') or nan:.3f} | "
            f"{o.get('mfu_vs_bf16_matmul') or nan:.3f} |"
        )
    s = r["saliency"]
    if s is not None:
        lines.append(
            f"\nsaliency pass over {s['batches']} batches: {s['saliency_s']:.2f}s vs plain "
            f"fwd+bwd {s['plain_fwd_bwd_s']:.2f}s (ratio {s['ratio']:.3f}); global top-k "
            f"(k={s['topk_k']:,}) {s['topk_s']:.2f}s"
        )
    return "\n".join(lines)


# --- group "losia" -----------------------------------------------------------------------------


def bench_losia(model_name, *, image_size, batch, reps, rows, log) -> dict:
    """The ``losia`` group at one batch size: each row's summary and its ratios to full's."""
    model, params, x, y = synthetic_inputs(model_name, image_size=image_size, batch=batch)
    cases = []
    for row in rows:
        name, kw = LOSIA_ROWS[row]
        m = registered(name) if kw is None else get_method(name, **kw)
        cases.append(step_case(row, model, m, params, x, y, lr=1e-4))
    failed = {}
    runs = harness.prepare(cases, log, failed)
    if failed:
        raise RuntimeError(f"losia rows failed: {failed}")
    harness.round_robin(runs, reps, log)
    out = {k: harness.summary(r) for k, r in runs.items()}
    return harness.with_ratios(out, "full")


def run_losia(a, log) -> dict:
    """The ``losia`` group: every ``--batch`` size of every model."""
    res = dict(machine=common.machine(load_avg_start=os.getloadavg()), args=vars(a), batches={})
    for name in a.models.split(","):
        for b in a.batch.split(","):
            key = b if "," not in a.models else f"{name}@{b}"
            res["batches"][key] = bench_losia(
                name,
                image_size=a.image_size,
                batch=int(b),
                reps=a.reps,
                rows=a.rows.split(","),
                log=log,
            )
    res["machine"]["load_avg_end"] = os.getloadavg()
    for b, rows in res["batches"].items():
        for row, o in rows.items():
            log(
                f"batch {b} {row:>18}: step {o['step_s']:.3f}s "
                f"({o.get('step_vs_full', 1):.2f}x full, "
                f"fastest {o.get('step_vs_full_min', 1):.2f}x), "
                f"flops {o.get('flops_vs_full', 1):.2f}x, "
                f"opt state {o.get('opt_state_vs_full', 1):.3f}x, "
                f"peak {o.get('peak_vs_full', float('nan')):.2f}x"
            )
    yield res


# --- group "guft_real" -------------------------------------------------------------------------


def trained_guft(model, params, source, *, image_size, batch, epochs, log):
    """GUFT (shipped defaults, rounds at epochs 1..3) trained by ``fit``: (method kwargs, final
    state)."""
    d = spec("guft").defaults
    kw = dict(d.kwargs or {})
    kw["recompute_epochs"] = list(range(1, len(kw.get("ratios", [0.001] * 3)) + 1))
    epochs = max(epochs, len(kw["recompute_epochs"]))
    config = TrainConfig(
        image_size=image_size,
        batch_size=batch,
        epochs=epochs,
        lr=d.lr,
        head_lr=d.head_lr,
        eval_split=None,
    )  # the selection is what is used
    r, _ = harness.timed_fit(model, params, get_method("guft", **kw), source, config, log=log)
    return kw, r.state


def block_coverage(params, state) -> dict:
    """Per kernel: block capacity area / matrix size, and filled unique rows x cols / size."""
    cap, used = [], []
    for k, b in state.method_state.blocks.items():
        n_in, n_out = guft_lib.store_dims(k, paths.get(params, paths.path_of(k)).shape)
        br, bc = np.asarray(b["rows"]), np.asarray(b["cols"])
        cap.append(br.size * bc.size / (n_in * n_out))
        used.append(np.sum(br < n_in) * np.sum(bc < n_out) / (n_in * n_out))
    return dict(
        kernels=len(cap),
        block_capacity_fraction_mean=float(np.mean(cap)),
        block_used_fraction_mean=float(np.mean(used)),
        kernels_taking_block=int(
            sum(c <= kernels_lib.KernelOptions().block_max_fraction for c in cap)
        ),
    )


def _real_cases(model, params, x, y, rows, guft_kw, gstate):
    for name in rows:
        if name in BLOCK_ROWS:  # the trained state, stepped with each kernel choice
            m, state = get_method("guft", kernels=BLOCK_ROWS[name], **guft_kw), gstate
        else:
            m, state = registered(name), None
        yield step_case(name, model, m, params, x, y, lr=TrainConfig().lr, state=state)


def run_guft_real(a, log) -> dict:
    """The ``guft_real`` group: GUFT trained on ``--dataset``, then timed beside the others."""
    source = get_source(a.dataset, seed=0)
    model, params = load_pretrained(
        a.models, num_classes=source.num_classes, image_size=a.image_size
    )
    model = precision_lib.with_precision(model, a.precision)
    kw, gstate = trained_guft(
        model, params, source, image_size=a.image_size, batch=a.batch, epochs=a.epochs, log=log
    )
    cover = block_coverage(params, gstate)
    log(f"blocks: {cover}")
    split = TrainConfig().train_split
    x, y = next(iter(source.batches(split, batch_size=a.batch, image_size=a.image_size)))
    x, y = jnp.asarray(x), jnp.asarray(y.astype(np.int32))
    failed = {}
    runs = harness.prepare(
        _real_cases(model, params, x, y, a.rows.split(","), kw, gstate), log, failed
    )
    harness.round_robin(runs, a.reps)
    out = harness.with_ratios(
        {k: harness.summary(r, batch=a.batch) for k, r in runs.items()}, "full"
    )
    for name, o in out.items():
        o["times"] = o["times_s"]
        o["peak_vs_lora"] = (o["peak_bytes"] or 0) / (out.get("lora", {}).get("peak_bytes") or 1)
        log(
            f"| {name} | {o['step_s']:.4f} s | {o['images_per_s']:.0f} img/s | "
            f"step/full {o.get('step_vs_full', float('nan')):.3f} | "
            f"peak {(o['peak_bytes'] or 0) / 2**20:.0f} MiB | peak/LoRA {o['peak_vs_lora']:.3f} |"
        )
    n_sel = int(sum(int(c) for c in gstate.method_state.count.values()))
    backbone = vit.count_params({k: v for k, v in params.items() if k != "head"})
    yield dict(
        machine=common.machine(),
        args=vars(a),
        precision=precision_lib.resolve_precision(a.precision),
        selected=n_sel,
        selected_pct=100 * n_sel / backbone,
        blocks=cover,
        methods=out,
        failed=failed,
    )


# --- command line ------------------------------------------------------------------------------


def parse(argv=None) -> argparse.Namespace:
    """The command line, each option left unset taking its group's default; bad values stop
    with the option's name and the allowed values."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", default="methods", choices=GROUPS)
    ap.add_argument("--models", help="comma-separated model names ('--model' too)")
    ap.add_argument("--model", dest="models", help=argparse.SUPPRESS)
    ap.add_argument("--image_size", type=int)
    ap.add_argument("--batch", help="methods: one batch size or one per model; losia: each")
    ap.add_argument("--reps", type=int, help="round-robin rounds")
    ap.add_argument("--rows", help="comma-separated rows of the group ('--methods' too)")
    ap.add_argument("--methods", dest="rows", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=f"policies from {', '.join(precision_lib.CHOICES)}")
    ap.add_argument("--out", help="the JSON file (default: the group's in benchmarks/results)")
    ap.add_argument("--peer", default="", help="methods: 'torch' adds the PyTorch peer")
    ap.add_argument(
        "--saliency",
        default=1,
        type=int,
        choices=(0, 1),
        help="methods: 1 also times GUFT's saliency pass against plain fwd+bwd",
    )
    ap.add_argument("--remat", default=0, type=int, choices=(0, 1), help="methods: remat blocks")
    ap.add_argument("--dataset", default="animal_mnist", help="guft_real: the training data")
    ap.add_argument("--epochs", type=int, default=3, help="guft_real: GUFT training (>= 3)")
    a = ap.parse_args(argv)
    _fill_defaults(ap, a)
    return a


def _fill_defaults(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    harness.apply_defaults(a, GROUP_DEFAULTS[a.group]._asdict())
    harness.apply_defaults(
        a, dict(image_size=TrainConfig().image_size, batch=str(TrainConfig().batch_size))
    )
    a.out = a.out or f"benchmarks/results/{OUTPUTS[a.group]}.json"
    allowed = {"methods": METHODS, "losia": tuple(LOSIA_ROWS), "guft_real": REAL_ROWS}[a.group]
    unknown = sorted(set(a.rows.split(",")) - set(allowed))
    if unknown:
        ap.error(f"--rows: unknown {unknown} for --group {a.group}; allowed: {', '.join(allowed)}")
    bad = [p for p in a.precision.split(",") if p.strip() not in precision_lib.CHOICES]
    if bad or (a.group != "methods" and "," in a.precision):
        ap.error(
            f"--precision: {a.precision!r} is not allowed; allowed: "
            f"{', '.join(precision_lib.CHOICES)} (a comma-separated list for methods)"
        )
    if a.peer not in ("", "torch") or (a.peer and a.group != "methods"):
        ap.error(f"--peer: {a.peer!r} is not allowed; allowed: torch (with --group methods)")
    if a.peer:
        from benchmarks import torch_peer

        if why := torch_peer.available():
            ap.error(f"--peer torch: {why}")
    if a.group == "guft_real":
        a.batch = int(a.batch)


OUTPUTS = {"methods": "step_bench", "losia": "losia_bench", "guft_real": "guft_step_bench"}
RUNNERS = {"methods": run_methods, "losia": run_losia, "guft_real": run_guft_real}


def main(argv=None) -> dict:
    a = parse(argv)
    log = lambda s: print(s, flush=True)
    return harness.write_each(RUNNERS[a.group](a, log), a.out, log)


if __name__ == "__main__":
    main()
