"""The offline benchmark's selection rule, configs, report helpers and argument errors (no
training: the runs themselves are exercised by tests/test_cli.py and the benchmark)."""

import math

import pytest

from experiments import offline_benchmark as ob
from experiments import report


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


def test_guft_density_pools_counts_over_sizes():
    key_a = "Transformer.encoderblock_0.MlpBlock_0.Dense_0.kernel"
    key_b = "Transformer.encoderblock_1.MlpBlock_0.Dense_0.kernel"
    recs = [
        dict(
            method="guft",
            trained_per_tensor={key_a: 3, key_b: 1},
            tensor_sizes={key_a: 100, key_b: 100},
        ),  # fmt: skip
        dict(
            method="guft",
            trained_per_tensor={key_a: 1, key_b: 0},
            tensor_sizes={key_a: 100, key_b: 100},
        ),  # fmt: skip
        dict(method="lora", trained_per_tensor={key_a: 50}, tensor_sizes={key_a: 100}),
    ]
    by_layer, by_type = report.guft_density(recs)
    assert by_layer == {"block 0": 4 / 200, "block 1": 1 / 200}
    assert by_type == {"mlp.fc1.kernel": 5 / 400}


def test_configs_scale_the_selected_lr_and_route_masks():
    base = ob._config("digits", "lora", seed=0, epochs=4, image_size=28)
    c = ob._config("digits", "lora", seed=1, epochs=4, image_size=28, lr_factor=3.0)
    assert math.isclose(c.lr, 3 * base.lr) and c.head_lr == base.head_lr and c.seed == 1
    lin = ob._config("digits", "linear", seed=0, epochs=4, image_size=28, lr_factor=0.3)
    lin0 = ob._config("digits", "linear", seed=0, epochs=4, image_size=28)
    assert math.isclose(lin.head_lr, 0.3 * lin0.head_lr) and lin.lr == lin0.lr
    # no method is routed or rewritten: each keeps its own registered defaults
    g = ob._config("digits", "guft", seed=0, epochs=10, image_size=28)
    assert g.method == "guft" and g.method_kwargs.recompute_epochs is None
    s = ob._config("digits", "snip", seed=0, epochs=10, image_size=28)
    assert s.method == "snip" and s.method_kwargs.epoch == 1
    dense = ob._config("digits", "magnitude", seed=0, epochs=2, image_size=28, guft_path="dense")
    assert dense.method_kwargs["sparse"] is False
    assert ob._config("digits", "guft", seed=0, epochs=4, image_size=28).method_kwargs.sparse
    lora = ob._config("digits", "lora", epochs=4, image_size=28, seed=0, guft_path="dense")
    assert "sparse" not in lora.method_kwargs


def test_estimate_scales_with_tokens():
    jobs = [("final", "digits", "full", 0)]
    e28 = ob.estimate_seconds(jobs, epochs=2)
    e56 = ob.estimate_seconds(jobs, epochs=2, image_size=56)
    steps = 1000 // ob.BATCH * 2
    assert math.isclose(e28, steps * ob.FULL_STEP_S + ob.OVERHEAD_S)
    assert math.isclose(e56 - ob.OVERHEAD_S, (e28 - ob.OVERHEAD_S) * (17 / 5) ** 0.8)


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--methods", "lora,bogus"], "--methods"),
        (["--tasks", "cifar10"], "--tasks"),
        (["--epochs", "-1"], "--epochs"),
    ],
)
def test_bad_arguments_name_the_field(argv, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        ob.main(["--preset", "full", "--out", str(tmp_path), *argv])


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
    ob.main(argv)  # everything done: nothing is appended
    assert len(report.read_jsonl(str(tmp_path / "records.jsonl"))) == 2
    ob.main([*argv, "--fresh"])
    recs = report.read_jsonl(str(tmp_path / "records.jsonl"))
    assert [(r["task"], r["seed"]) for r in recs] == [("digits", 0)]
    assert 0.5 < recs[0]["test_accuracy"] <= 1.0 and (tmp_path / "table.md").exists()


def test_variants_configure_their_base_method():
    c = ob._config("digits", "lora_r4", seed=0, epochs=2, image_size=28)
    assert c.method == "lora" and c.method_kwargs.rank == 4 and c.method_kwargs.alpha == 8.0
    g = ob._config("digits", "guft_paper", seed=0, epochs=2, image_size=28)
    assert g.method == "guft" and g.method_kwargs.eligible == "all"
    assert ob.lr_factors("guft_excl") == ob.lr_factors("guft")
    with pytest.raises(ValueError, match="allowed"):
        ob.row_method("lora_r5")


def test_grid_is_extended_once_past_the_edge_its_best_lies_on():
    grid = sorted(ob.lr_factors("lora"))  # (0.3, 1, 3)
    sel = [
        dict(task="a", method="lora", lr_factor=f, val_accuracy=v)
        for f, v in zip(grid, [0.5, 0.6, 0.7], strict=True)  # best at the top edge
    ] + [
        dict(task="b", method="lora", lr_factor=f, val_accuracy=v)
        for f, v in zip(grid, [0.5, 0.7, 0.6], strict=True)  # best inside: no extension
    ]
    jobs = ob.extensions(sel, ["a", "b"], ["lora"])
    assert jobs == [("select", "a", "lora", pytest.approx(grid[-1] ** 2 / grid[-2]))]
    sel.append(dict(task="a", method="lora", lr_factor=9.0, val_accuracy=0.8, extended=True))
    assert ob.extensions(sel, ["a", "b"], ["lora"]) == []  # once only
    low = [dict(task="a", method="lora", lr_factor=f, val_accuracy=1 - f / 10) for f in grid]
    assert ob.extensions(low, ["a"], ["lora"])[0][3] == pytest.approx(grid[0] ** 2 / grid[1])


def test_groups_pack_runs_of_one_row_only():
    jobs = [("select", "a", "lora", f) for f in (1, 2, 3)] + [("select", "a", "full", 1)]
    groups = ob._groups(jobs, 2)
    assert groups == [jobs[:2], jobs[2:3], jobs[3:]]


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


def test_methods_preset_lists_every_registered_method_and_vpt_both_ways():
    from guft_jax.methods import method_names

    rows = ob.PRESETS["methods"]["methods"]
    assert set(method_names()) <= set(rows) and {"pixels", "vpt_shallow"} <= set(rows)
    assert set(ob.PRESETS["full"]["methods"]) == set(rows)
    assert not ob.PRESETS["methods"]["select"]
    deep = ob._config("animal_mnist", "vpt", seed=0, epochs=1, image_size=28)
    shallow = ob._config("animal_mnist", "vpt_shallow", seed=0, epochs=1, image_size=28)
    assert deep.method == shallow.method == "vpt"
    assert deep.method_kwargs.deep and not shallow.method_kwargs.deep


def test_dylora_ranks_are_truncations_of_the_one_run(tiny, source):
    """Each per-rank accuracy is the one trained run evaluated at that rank: at r_max it is the
    run's own test accuracy, below it the run's deterministic pass at ``eval_rank=b`` (which
    tests/test_dylora.py shows equals LoRA of rank b with the first b factors)."""
    from guft_jax import train
    from guft_jax.methods import get_method

    model, params = tiny
    m = get_method("dylora", rank=4, alpha=6.0)
    kw = dict(batch_size=16, image_size=16, normalization="imagenet")
    r = train.fit(model=model, params=params, method=m, source=source, epochs=2, lr=1e-2,
                  progress=False, log=lambda s: None, **kw)  # fmt: skip
    ranks = ob.rank_accuracies(model, params, m, r.state, source, (1, 2, 4, 8), split="test", **kw)
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
    c = ob._config("animal_mnist", "dylora", seed=0, epochs=1, image_size=28)
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
    rec = ob._record("final", "animal_mnist", "dylora", 0, c, res, None, 1.0)
    assert rec["peak_bytes"] == 2**20 and rec["rank_accuracy"] == {"1": 0.4, "8": 0.5}
    table = report.markdown_table([rec], method_order=["dylora"]).splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["dylora", "dylora@r1", "dylora@r8"]
    assert table[3].split("|")[2].strip() == "40.00 ± 0.00"
    ob.write_report(str(tmp_path), [rec], [], ["dylora"])
    md = (tmp_path / "table.md").read_text()
    assert "| dylora@r8 |" in md and "- dylora@r{b}: the one dylora run" in md
