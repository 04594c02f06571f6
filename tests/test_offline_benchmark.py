"""The offline benchmark's presets, rows, jobs, selection rule, records and command line (the
runs themselves are exercised by tests/test_cli.py and the benchmark; the pixel baseline runs
here on scikit-learn's digits)."""

import ast
import math
import pathlib

import pytest

from experiments import engine_runs, presets, report, rows
from experiments import offline_benchmark as ob
from experiments.rows import Job
from guft_jax.methods import Defaults, Method, method_names, register, spec, unregister
from guft_jax.methods.base import Variant


def _cfg(name, task="digits", seed=0, factor=1.0, **kw):
    kw = dict(dict(epochs=4, image_size=28), **kw)
    return rows.row(name).config(Job("final", task, name, seed, factor), **kw)


def test_best_choice_max_val_then_nearest_default():
    rs = [
        dict(lr_factor=0.3, val_accuracy=0.80),
        dict(lr_factor=1.0, val_accuracy=0.85),
        dict(lr_factor=3.0, val_accuracy=0.85),
    ]
    assert report.best_choice(rs)["lr_factor"] == 1.0  # tie: |log f| smallest
    rs[0]["val_accuracy"] = 0.9
    assert report.best_choice(rs)["lr_factor"] == 0.3
    cs = [dict(C=0.01, val_accuracy=0.7), dict(C=0.1, val_accuracy=0.7)]
    assert report.best_choice(cs)["C"] == 0.1


def test_comparison_verdicts_follow_the_means():
    recs = []
    for seed, (g, lo, fu) in enumerate([(0.9, 0.8, 0.95), (0.7, 0.8, 0.85)]):
        for m, acc in (("guft", g), ("lora", lo), ("full", fu)):
            recs.append(dict(task="t", method=m, seed=seed, test_accuracy=acc))
    lines = report.comparison(recs, "guft", ["lora", "full"])
    assert lines == [
        "t: guft 80.00 (n=2) >= lora 80.00 (n=2): yes",
        "t: guft 80.00 (n=2) < full 90.00 (n=2): no",
    ]
    # the preset questions that have rows: guft vs lora and full, guft's budget vs lora
    mean, budget = report.answers(recs, presets.QUESTIONS)
    assert mean.splitlines()[0] == presets.QUESTIONS[0].title and mean.endswith(lines[1])
    assert budget.splitlines()[0].startswith("Is guft >= LoRA") and budget.count("\n- ") == 1


def test_guft_density_pools_counts_over_sizes():
    key_a = "Transformer.encoderblock_0.MlpBlock_0.Dense_0.kernel"
    key_b = "Transformer.encoderblock_1.MlpBlock_0.Dense_0.kernel"
    sizes = {key_a: 100, key_b: 100}
    recs = [
        dict(method="guft", trained_per_tensor={key_a: 3, key_b: 1}, tensor_sizes=sizes),
        dict(method="guft", trained_per_tensor={key_a: 1, key_b: 0}, tensor_sizes=sizes),
        dict(method="lora", trained_per_tensor={key_a: 50}, tensor_sizes={key_a: 100}),
    ]
    by_layer, by_type = report.guft_density(recs, "guft")
    assert by_layer == {"block 0": 4 / 200, "block 1": 1 / 200}
    assert by_type == {"mlp.fc1.kernel": 5 / 400}


def test_configs_scale_the_selected_lr_and_route_masks():
    base = _cfg("lora")
    c = _cfg("lora", seed=1, factor=3.0)
    assert math.isclose(c.lr, 3 * base.lr) and c.head_lr == base.head_lr and c.seed == 1
    lin, lin0 = _cfg("linear", factor=0.3), _cfg("linear")
    assert math.isclose(lin.head_lr, 0.3 * lin0.head_lr) and lin.lr == lin0.lr
    assert rows.row("linear").tuned_lr(lin) == lin.head_lr and rows.row("lora").tuned_lr(c) == c.lr
    # no method is routed or rewritten: each keeps its own registered defaults
    g = _cfg("guft", epochs=10)
    assert g.method == "guft" and g.method_kwargs.recompute_epochs is None
    s = _cfg("snip", epochs=10)
    assert s.method == "snip" and s.method_kwargs.epoch == 1
    assert _cfg("magnitude", guft_path="dense").method_kwargs["sparse"] is False
    assert _cfg("guft").method_kwargs.sparse
    assert "sparse" not in _cfg("lora", guft_path="dense").method_kwargs
    # splits follow the job's kind; the task's test subsample is the preset data's
    sel = rows.row("lora").config(Job("select", "fashion_mnist", "lora"), epochs=1, image_size=28)
    assert (sel.train_split, sel.eval_split) == rows.SPLITS["select"]
    assert sel.test_size == presets.TASKS["fashion_mnist"].test_size == 2000
    assert (c.train_split, c.eval_split) == rows.SPLITS["final"] and c.test_size == 0


def test_jobs_are_typed_and_name_their_kind():
    j = Job("final", "digits", "lora", seed=2, factor=3.0, val_accuracy=0.5)
    assert (j.seed, j.factor, j.group) == (2, 3.0, ("final", "digits", "lora"))
    with pytest.raises(ValueError, match="Job.kind.*allowed"):
        Job("train", "digits", "lora")
    with pytest.raises(AttributeError):
        j.seed = 3  # frozen


def test_work_scales_with_tokens_and_the_step_cost():
    w28, w56 = ob.work("final", "full", 2, 28), ob.work("final", "full", 2, 56)
    assert w28 == 1000 // 50 * 2  # full fine-tuning's cost is the unit
    assert math.isclose(w56, w28 * (17 / 5) ** 0.8)
    assert math.isclose(
        ob.work("select", "lora", 2, 28), 800 // 50 * 2 * spec("lora").defaults.step_cost
    )
    assert ob.work("final", "pixels", 2, 28) == 0.0


def test_seconds_per_work_is_timed_from_earlier_records():
    assert ob.seconds_per_work([]) is None
    recs = [
        dict(method="full", wall_s=30.0, config=dict(epochs=2, image_size=28)),
        dict(method="lora", wall_s=9.0, config=dict(epochs=2, image_size=56)),
        dict(method="pixels", wall_s=5.0, config=dict(C=1.0, image_size=28)),  # no work
        dict(method="gone_row", wall_s=5.0, config=dict(epochs=2, image_size=28)),
    ]
    units = ob.work("final", "full", 2, 28) + ob.work("final", "lora", 2, 56)
    assert math.isclose(ob.seconds_per_work(recs), 39.0 / units)


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--methods", "lora,bogus"], "--methods"),
        (["--tasks", "cifar10"], "--tasks"),
        (["--epochs", "-1"], "--epochs"),
        (["--seeds", "a"], "--seeds"),
        (["--preset", "huge"], "preset"),
        (["--guft_path", "fast"], "guft_path"),
        (["--bogus", "1"], "bogus"),
    ],
)
def test_bad_arguments_name_the_field(argv, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        ob.main(["--preset", "full", "--out", str(tmp_path), *argv])


def test_options_apply_the_flags_over_the_preset():
    o = ob.parse_options(["--preset=cpu", "--methods", "full,lora", "--seeds=1,2", "--epochs=2"])
    assert isinstance(o.preset, presets.Preset) and o.out == "results/offline_cpu"
    assert o.rows == ["lora", "full"]  # every_row()'s order, not the command line's
    assert (o.preset.seeds, o.preset.epochs, o.preset.image_size) == ((1, 2), 2, 28)
    assert o.preset.pack == 5 and o.preset.guft_path == "sparse"  # cpu: masks stay unpacked
    full = ob.parse_options(["--preset", "full", "--pack", "2", "--workers", "3", "--fresh"])
    assert full.preset.guft_path == "dense" and (full.workers, full.fresh) == (3, True)
    assert full.rows == rows.every_row() and full.out == "results/offline"
    assert ob.parse_options([]).preset == presets.PRESETS["demo"].replace(guft_path="sparse")


def test_resume_skips_finished_runs_and_fresh_starts_over(tmp_path):
    import json

    argv = ["--preset", "demo", "--methods", "pixels", "--tasks", "digits", "--out", str(tmp_path)]
    stale = dict(task="old", method="pixels", seed=0, test_accuracy=0.0)
    (tmp_path / "records.jsonl").write_text(json.dumps(stale) + "\n")
    ob.main(argv)
    recs = report.read_jsonl(str(tmp_path / "records.jsonl"))
    assert [(r["task"], r["method"], r["seed"]) for r in recs] == [
        ("old", "pixels", 0),
        ("digits", "pixels", 0),
    ]
    assert recs[1]["preset"] == "demo" and recs[1]["config"]["C"] == 1.0
    ob.main(argv)  # everything done: nothing is appended
    assert len(report.read_jsonl(str(tmp_path / "records.jsonl"))) == 2
    ob.main([*argv, "--fresh"])
    recs = report.read_jsonl(str(tmp_path / "records.jsonl"))
    assert [(r["task"], r["seed"]) for r in recs] == [("digits", 0)]
    assert 0.5 < recs[0]["test_accuracy"] <= 1.0 and (tmp_path / "table.md").exists()


@pytest.fixture
def toy_method():
    """A registered method with a listed and an unlisted variant (unregistered afterwards)."""

    @register("toy_rows", defaults=Defaults(lr=2e-3, lr_grid=(0.5, 1.0, 2.0)),
              variants={"toy_big": Variant(dict(scale=4.0)),
                        "toy_alt": Variant(dict(scale=0.5), listed=True)})  # fmt: skip
    def toy(*, scale: float = 1.0) -> Method:
        raise NotImplementedError

    yield "toy_rows"
    unregister("toy_rows")


def test_variants_are_registration_data(toy_method):
    big, alt = rows.row("toy_big"), rows.row("toy_alt")
    assert alt.listed and alt.kwargs == {"scale": 0.5}
    assert (big.method, big.kwargs, big.listed) == ("toy_rows", {"scale": 4.0}, False)
    assert big.grid == rows.row("toy_rows").grid == (0.5, 1.0, 2.0)
    every = rows.every_row()
    assert "toy_rows" in every and "toy_alt" in every and "toy_big" not in every
    assert every.index("toy_alt") > every.index("toy_rows")  # variants after the methods
    assert list(every[: len(presets.CLAIM_ROWS)]) == list(presets.CLAIM_ROWS)
    # the built-in ones, from their own registrations
    c = _cfg("lora_r4", epochs=2)
    assert c.method == "lora" and c.method_kwargs.rank == 4 and c.method_kwargs.alpha == 8.0
    deep, shallow = _cfg("vpt", epochs=1), _cfg("vpt_shallow", epochs=1)
    assert deep.method == shallow.method == "vpt"
    assert deep.method_kwargs.deep and not shallow.method_kwargs.deep
    with pytest.raises(ValueError, match="allowed"):
        rows.row("lora_r5")


def test_a_variant_with_an_unknown_keyword_fails_at_registration():
    with pytest.raises(ValueError, match="register.variants.bad.*allowed"):

        @register("toy_bad", variants={"bad": Variant(dict(nope=1))})
        def toy(*, scale: float = 1.0) -> Method:
            raise NotImplementedError

    assert "toy_bad" not in method_names()


def test_grid_is_extended_once_past_the_edge_its_best_lies_on():
    grid = sorted(rows.row("lora").grid)  # (0.3, 1, 3)
    sel = [
        dict(task="a", method="lora", lr_factor=f, val_accuracy=v)
        for f, v in zip(grid, [0.5, 0.6, 0.7], strict=True)  # best at the top edge
    ] + [
        dict(task="b", method="lora", lr_factor=f, val_accuracy=v)
        for f, v in zip(grid, [0.5, 0.7, 0.6], strict=True)  # best inside: no extension
    ]
    (job,) = rows.extensions(sel, ["a", "b"], ["lora"])
    assert (job.kind, job.task, job.row, job.seed, job.extended) == ("select", "a", "lora", 0, True)
    assert job.factor == pytest.approx(grid[-1] ** 2 / grid[-2])
    sel.append(dict(task="a", method="lora", lr_factor=9.0, val_accuracy=0.8, extended=True))
    assert rows.extensions(sel, ["a", "b"], ["lora"]) == []  # once only
    low = [dict(task="a", method="lora", lr_factor=f, val_accuracy=1 - f / 10) for f in grid]
    assert rows.extensions(low, ["a"], ["lora"])[0].factor == pytest.approx(grid[0] ** 2 / grid[1])
    pix = [dict(task="a", method="pixels", C=c, val_accuracy=c) for c in rows.PIXELS.grid]
    assert rows.extensions(pix, ["a"], ["pixels"]) == []  # a fixed grid


def test_central_grid_and_final_jobs_at_the_chosen_factor():
    assert rows.central((0.1, 0.3, 1.0, 3.0, 10.0), 3) == (0.3, 1.0, 3.0)
    assert rows.central((3.0, 1.0), 0) == (3.0, 1.0)
    o = ob.Options(presets.PRESETS["cpu"].replace(rows=("pixels", "lora")), out="x")
    sel = ob.selection_jobs(o, done={("animal_mnist", "lora", 0.3)})
    assert [(j.row, j.factor) for j in sel] == [("pixels", 0.01), ("pixels", 0.1), ("pixels", 1.0),
                                                ("lora", 1.0), ("lora", 3.0)]  # fmt: skip
    selection = [dict(task="animal_mnist", method="lora", lr_factor=f, val_accuracy=v)
                 for f, v in ((0.3, 0.5), (3.0, 0.9))]  # fmt: skip
    choices = ob.choices_of(selection, ["animal_mnist"], o.rows)
    final = ob.final_jobs(o, set(), choices)
    assert [(j.kind, j.row, j.seed, j.factor, j.val_accuracy) for j in final] == [
        ("final", "pixels", 0, 1.0, None),
        ("final", "lora", 0, 3.0, 0.9),
    ]


def test_groups_pack_runs_of_one_row_only():
    jobs = [Job("select", "a", "lora", 0, f) for f in (1, 2, 3)] + [Job("select", "a", "full")]
    assert ob.pack_groups(jobs, 2) == [jobs[:2], jobs[2:3], jobs[3:]]
    masks = [Job("select", "a", "guft", 0, f) for f in (1, 2)]
    assert ob.pack_groups(masks, 2, pack_masks=False) == [masks[:1], masks[1:]]


def test_budget_verdicts_need_both_accuracy_and_budget():
    recs = [
        dict(
            method=m,
            task="t",
            seed=0,
            test_accuracy=acc,
            trainable_params=p,
            backbone_params=1000,
            step_s=0.1,
        )  # fmt: skip
        for m, acc, p in (("guft", 0.9, 3), ("lora", 0.8, 6), ("lora_r4", 0.95, 3))
    ]
    v = report.budget_verdicts(recs, "guft", ["lora", "lora_r4"])
    assert v[0].endswith("yes") and v[1].endswith("no")
    recs[0]["trainable_params"] = 9
    assert "larger budget" in report.budget_verdicts(recs, "guft", ["lora"])[0]


def test_presets_listing_every_row_include_every_registered_method():
    every = rows.every_row()
    assert set(method_names()) <= set(every) and {"pixels", "vpt_shallow"} <= set(every)
    assert "lora_r4" not in every  # a budget row: run where a preset names it
    assert presets.PRESETS["methods"].rows is None and presets.PRESETS["full"].rows is None
    assert not presets.PRESETS["methods"].select
    for p in presets.PRESETS.values():
        assert set(p.tasks) <= set(presets.TASKS)


def test_no_row_is_special_cased_in_code():
    """Method and row names are data (presets, registrations): none is a string literal of the
    benchmark's code."""
    names = set(method_names()) | {v for m in method_names() for v in spec(m).variants}
    names |= set(presets.BUDGET_ROWS) | set(presets.CLAIM_ROWS)
    root = pathlib.Path(__file__).resolve().parent.parent / "experiments"
    for f in ("offline_benchmark.py", "rows.py", "engine_runs.py", "report.py"):
        tree = ast.parse((root / f).read_text())
        lits = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
        assert not lits & names - {rows.PIXELS.name}, f
    assert rows.PIXELS.name == "pixels"  # the baseline's one literal: its dataclass default


def test_dylora_ranks_are_truncations_of_the_one_run(tiny, source):
    """Each per-rank accuracy is the one trained run evaluated at that rank: at r_max it is the
    run's own test accuracy, below it the run's deterministic pass at ``eval_rank=b`` (which
    tests/test_dylora.py shows equals LoRA of rank b with the first b factors)."""
    from guft_jax import train
    from guft_jax.config import TrainConfig
    from guft_jax.methods import get_method

    model, params = tiny
    m = get_method("dylora", rank=4, alpha=6.0)
    kw = dict(batch_size=16, image_size=16, normalization="imagenet")
    cfg = TrainConfig(epochs=2, lr=1e-2, progress=False, warmup_epochs=0, **kw)
    r = train.fit(model, params, m, source, cfg, hooks=lambda s: None)
    rank_eval = spec("dylora").rank_eval
    assert rank_eval.ranks == (1, 2, 4, 8)
    ranks = engine_runs.rank_accuracies(model, params, m, r.state, source, rank_eval,
                                        split="test", **kw)  # fmt: skip
    assert sorted(ranks) == [1, 2, 4]  # 8 > r_max: skipped
    assert ranks[4]["accuracy"] == r.results["test_accuracy"]
    assert ranks[4]["trainable_params"] == r.results["trainable_params"]
    for b in (1, 2):
        at_b = get_method("dylora", rank=4, alpha=6.0, eval_rank=b)
        step = train.make_eval_step(model, at_b)
        ev = train.evaluate(step, params, r.state, source, "test", **kw)
        assert ranks[b]["accuracy"] == ev["accuracy"]
        assert ranks[b]["trainable_params"] == b * r.results["trainable_params"] // 4


def test_final_record_carries_peak_and_rank_accuracies(tmp_path):
    row = rows.row("dylora")
    job = Job("final", "animal_mnist", "dylora", 0, 1.0, val_accuracy=0.6)
    c = row.config(job, epochs=1, image_size=28)
    res = dict(
        test_accuracy=0.5,
        test_examples=10,
        trainable_params=8,
        backbone_params=100,
        history=[dict(images_per_s=50.0)],
        traces=1,
        trained_per_tensor={},
        peak_bytes=2**20,
        rank_accuracy={"1": 0.4, "8": 0.5},
        rank_params={"1": 1, "8": 8},
    )
    rec = engine_runs.record(job, row, c, res, 1.0)
    assert rec["peak_bytes"] == 2**20 and rec["rank_accuracy"] == {"1": 0.4, "8": 0.5}
    assert rec["val_accuracy"] == 0.6 and rec["step_s"] == c.batch_size / 50.0
    sel = engine_runs.record(Job("select", "digits", "dylora", 0, 3.0), row, c, res | {
        "val200_accuracy": 0.7}, 2.0)  # fmt: skip
    assert sel == dict(task="digits", method="dylora", lr_factor=3.0, lr=c.lr, val_accuracy=0.7,
                       wall_s=2.0)  # fmt: skip
    table = report.markdown_table([rec], method_order=["dylora"]).splitlines()
    assert [r.split("|")[1].strip() for r in table[2:]] == ["dylora", "dylora@r1", "dylora@r8"]
    assert table[3].split("|")[2].strip() == "40.00 ± 0.00"
    report.write_tables(str(tmp_path), [rec], [], order=["dylora"])
    md = (tmp_path / "table.md").read_text()
    assert "| dylora@r8 |" in md and "- dylora@r{b}: the one dylora run" in md


def test_run_group_marks_the_preset_and_extended_jobs():
    p = presets.PRESETS["demo"]
    jobs = [Job("select", "digits", "pixels", 0, 1.0, extended=True)]
    (rec,) = ob.run_group(jobs, p)
    assert rec["preset"] == "demo" and rec["extended"] and rec["C"] == 1.0
    assert 0.5 < rec["val_accuracy"] <= 1.0


def test_packed_group_trains_each_run_at_its_own_lr():
    """A group of selection runs packed into one program (tiny ViT on digits): one result per
    run, each scored on val200, at its own lr; records name the candidate's factor."""
    from experiments.configs import tiny

    configs = []
    for lr in (1e-2, 3e-2):
        c = tiny.get_config("digits,lora")
        c.epochs, c.lr, c.train_split, c.eval_split = 1, lr, *rows.SPLITS["select"]
        configs.append(c)
    results = engine_runs.fit_group(configs, final=False)
    assert [r["packed_runs"] for r in results] == [2, 2]
    assert all(0.0 <= r["val200_accuracy"] <= 1.0 for r in results)
    losses = [r["history"][-1]["train_loss"] for r in results]
    assert losses[0] != losses[1]  # same seed and data: only the lr differs
    job = Job("select", "digits", "lora", 0, 3.0)
    rec = engine_runs.record(job, rows.row("lora"), configs[1], results[1], 1.0)
    assert (rec["lr_factor"], rec["lr"], rec["val_accuracy"]) == (
        3.0, 3e-2, results[1]["val200_accuracy"])  # fmt: skip


def test_diagnosis_rows_resolve_to_configs():
    """Every row of the diagnosis presets builds a config; a setting reaches the method."""
    for p in rows.DIAGNOSIS_PRESETS:
        for r in presets.PRESETS[p].rows:
            rows.row(r)
    r = rows.row("diff_pruning[refit_fraction=0.4]")
    c = r.config(Job("final", "digits", r.name), epochs=5, image_size=28)
    assert c.method_kwargs.refit_fraction == 0.4 and c.model == "dinov2_s14"
    r = rows.row("dry:fourierft[n=16]")
    c = r.config(Job("select", "digits", r.name), epochs=2, image_size=16)
    assert c.model == "ViT-tiny/4" and c.method_kwargs.n == 16
    assert "dry:linear" not in rows.every_row()


def test_a_variant_may_carry_its_own_lr():
    @register("toy_lr", defaults=Defaults(lr=2e-3, lr_grid=(0.5, 1.0)),
              variants={"toy_lr_fast": Variant(dict(scale=2.0), lr=8e-3)})  # fmt: skip
    def toy(*, scale: float = 1.0) -> Method:
        raise NotImplementedError

    try:
        assert _cfg("toy_lr").lr == 2e-3
        assert _cfg("toy_lr_fast").lr == 8e-3 and _cfg("toy_lr_fast", factor=0.5).lr == 4e-3
    finally:
        unregister("toy_lr")
    assert _cfg("vpt_shallow").lr == 1e-2 and _cfg("vpt").lr == spec("vpt").defaults.lr


def _register_toy(lr, replace=False):
    @register("toy_stale", defaults=Defaults(lr=lr, lr_grid=(0.5, 1.0, 2.0)), replace=replace)
    def toy(*, scale: float = 1.0) -> Method:
        raise NotImplementedError


def test_records_of_a_changed_setting_are_moved_aside_and_redone(tmp_path):
    import json

    lr, name = 2e-3, "toy_stale"
    _register_toy(lr)
    try:
        o = ob.parse_options(["--preset", "cpu", "--methods", name, "--tasks", "animal_mnist",
                              "--out", str(tmp_path)])  # fmt: skip
        p, er = o.preset, rows.row(name)

        def final(factor):
            c = er.config(Job("final", "animal_mnist", name, 0, factor), epochs=p.epochs,
                          image_size=p.image_size, guft_path=p.guft_path)  # fmt: skip
            return dict(task="animal_mnist", method=name, seed=0, test_accuracy=0.5,
                        config=json.loads(json.dumps(c.to_dict(), default=str)))  # fmt: skip

        sel = [dict(task="animal_mnist", method=name, lr_factor=f, lr=lr * f, val_accuracy=v)
               for f, v in ((0.5, 0.5), (1.0, 0.7), (2.0, 0.6))]  # fmt: skip
        choices = ob.choices_of(sel, p.tasks, o.rows)
        assert [ob.stale_reason(r, o, choices) for r in [*sel, final(1.0)]] == [None] * 4
        assert "lr" in ob.stale_reason(final(2.0), o, choices)  # not the chosen candidate's lr
        other = dict(final(1.0), task="digits")  # another task than this command's: untouched
        (tmp_path / "selection.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sel))
        recs = [final(1.0), other]
        (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        assert ob.drop_stale(o, choices) == 0

        # the registered lr changes: every candidate and the final run are stale, moved aside
        _register_toy(2 * lr, replace=True)
        assert ob.stale_reason(sel[0], o, choices) == (
            f"{name} on animal_mnist at x0.5: lr {0.5 * lr:g} -> {lr:g}"
        )
        assert ob.drop_stale(o, choices) == 4
        moved = report.read_jsonl(str(tmp_path / "stale.jsonl"))
        assert len(moved) == 4 and all(r["stale_because"] for r in moved)
        assert report.read_jsonl(str(tmp_path / "selection.jsonl")) == []
        assert report.read_jsonl(str(tmp_path / "records.jsonl")) == [other]
    finally:
        unregister(name)
