"""The VTAB-1K scripts: configs follow the protocol (docs: VTAB-1K), the sweep's dry run (tfds
mock_data, tiny ViT) runs the whole pipeline, and the aggregated table has the paper's shape with
the published reference rows beside."""

import json
import os
import re

import numpy as np
import pytest

from experiments.configs.common import validate
from experiments.vtab import aggregate, sweep
from experiments.vtab.configs import get_config
from guft_jax.data.vtab import GROUPS, TASKS
from guft_jax.guft import auto_schedule
from guft_jax.methods import method_names


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vtab_dry"))
    sweep.main(["--dry_run", "--out", out])
    return out


def test_dry_run_records_every_run_with_its_config(dry):
    recs = sweep.read_records(os.path.join(dry, "records.jsonl"))
    want = {(t, m, 0) for t in sweep.DRY_TASKS for m in sweep.DRY_METHODS}
    assert len(recs) == len(want) and {(r["task"], r["method"], r["seed"]) for r in recs} == want
    for r in recs:
        assert r["group"] == TASKS[r["task"]].group
        assert r["config"]["dataset"] == f"vtab/{r['task']}"
        assert r["config"]["model"] == "ViT-tiny/4" and r["config"]["epochs"] == 1
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_examples"] > 0
    assert {r["group"] for r in recs} == set(aggregate.GROUP_NAMES)
    assert os.path.exists(os.path.join(dry, "vtab_table.md"))


def test_rerun_skips_finished_runs(dry):
    before = open(os.path.join(dry, "records.jsonl")).read()
    sweep.main(["--dry_run", "--out", dry])
    assert open(os.path.join(dry, "records.jsonl")).read() == before


def test_table_shape_columns_and_means(dry):
    recs = sweep.read_records(os.path.join(dry, "records.jsonl"))
    table = aggregate.vtab_table(recs, method_order=list(sweep.DRY_METHODS))
    tasks = [t for g in aggregate.GROUP_NAMES for t in GROUPS[g]]
    assert table["tasks"] == tasks and len(tasks) == 19
    assert [len(GROUPS[g]) for g in aggregate.GROUP_NAMES] == [7, 4, 8]
    tail = ["Natural", "Specialized", "Structured", "19-task mean", "mean of group means"]
    assert table["columns"] == ["method", *tasks, *tail, "params", "seeds", "rank-1 (of our rows)"]
    ours = [r for r in table["rows"] if not r["reference"]]
    refs = [r for r in table["rows"] if r["reference"]]
    assert [r["method"] for r in ours] == list(sweep.DRY_METHODS)
    assert len(refs) == len(aggregate.REFERENCE)
    for row in ours:
        acc = {r["task"]: 100 * r["test_accuracy"] for r in recs if r["method"] == row["method"]}
        assert row["tasks"] == pytest.approx(acc)
        groups = []
        for g in aggregate.GROUP_NAMES:
            vals = [acc[t] for t in GROUPS[g] if t in acc]
            assert row[g] == pytest.approx(np.mean(vals)) and row["group_counts"][g] == len(vals)
            groups.append(np.mean(vals))
        assert row["mean19"] == pytest.approx(np.mean(list(acc.values())))
        assert row["mean_of_groups"] == pytest.approx(np.mean(groups))
    md = aggregate.markdown(table).splitlines()
    assert len(md) == 2 + len(table["rows"])
    assert all(line.count("|") == len(table["columns"]) + 1 for line in md)


def test_rank1_counts_ties_for_each_tied_row():
    t1, t2, t3 = "cifar100", "dtd", "eurosat"
    accs = {"a": {t1: 0.9, t2: 0.5, t3: 0.7}, "b": {t1: 0.8, t2: 0.6, t3: 0.7}}
    recs = [
        dict(task=t, method=m, seed=0, test_accuracy=v, trainable_params=1)
        for m, d in accs.items()
        for t, v in d.items()
    ]
    rows = {r["method"]: r for r in aggregate.vtab_table(recs, with_reference=False)["rows"]}
    assert rows["a"]["rank1"] == 2 and rows["b"]["rank1"] == 2


def test_reference_rows_are_consistent():
    """Each published row's 19-task mean is the task-weighted mean of its groups (7, 4 and 8
    tasks) and its group mean their plain mean, to the table's rounding (group means are given to
    0.1, so either mean may be off by 0.05 + 0.005): a mistyped number breaks one of the two."""
    n = {g: len(GROUPS[g]) for g in aggregate.GROUP_NAMES}
    assert tuple(n.values()) == (7, 4, 8)
    for name, (nat, spe, stru, m19, mg, _) in aggregate.REFERENCE.items():
        if m19 is None:
            assert spe is None and stru is None and mg is None, name
            continue
        groups = (nat, spe, stru)
        weighted = sum(v * k for v, k in zip(groups, n.values(), strict=True)) / 19
        assert abs(weighted - m19) <= 0.055, (name, weighted, m19)
        assert abs(sum(groups) / 3 - mg) <= 0.055, (name, sum(groups) / 3, mg)


@pytest.mark.parametrize("family", sorted(method_names()))
def test_every_config_validates_and_follows_the_protocol(family):
    for task in TASKS:
        c = get_config(f"{task},{family}")
        validate(c)
        assert (c.model, c.image_size, c.batch_size, c.epochs) == ("ViT-B/16", 224, 64, 100)
        assert (c.head_lr, c.weight_decay, c.warmup_epochs) == (1e-3, 1e-4, 10.0)
        assert c.lr == (0.2 if family == "fourierft" else 1e-3)
        assert c.train_split == "train800val200" and c.eval_split == "test"
    if family == "guft":
        # the GUFT paper's E_list [1, 6, 11]: the automatic schedule of a 100-epoch run
        assert c.method_kwargs.recompute_epochs is None
        assert auto_schedule(c.epochs, len(c.method_kwargs.ratios)) == [1, 6, 11]
        assert list(c.method_kwargs.ratios) == [0.001] * 3


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--dry_run", "--tasks", "cifar100,imagenet"], "--tasks"),
        (["--dry_run", "--methods", "lora,prompt"], "--methods"),
        (["--dry_run", "--seeds", "0,x"], "--seeds"),
        (["--tasks", "cifar100"], "--checkpoint"),
    ],
)
def test_bad_arguments_name_the_field(argv, field, tmp_path):
    with pytest.raises(ValueError, match=re.escape(field)):
        sweep.main([*argv, "--out", str(tmp_path)])


def test_print_only_writes_one_command_per_missing_run(tmp_path, capsys):
    out = str(tmp_path)
    argv = ["--out", out, "--tasks", "cifar100,dtd", "--methods", "lora,guft", "--seeds", "0,1"]
    sweep.main([*argv, "--checkpoint", "/ckpt/ViT-B_16.npz", "--print_only"])
    lines = capsys.readouterr().out.strip().splitlines()
    cmds = [x for x in lines if "experiments.run" in x]
    assert len(cmds) == 8 and lines[-1].endswith("--collect")
    assert all("--config.checkpoint=/ckpt/ViT-B_16.npz" in x for x in cmds)
    # --collect gathers a finished run's results.json into the records
    res = dict(test_accuracy=0.5, trainable_params=3, backbone_params=9, history=[],
               config={"batch_size": 64})  # fmt: skip
    os.makedirs(sweep.run_dir(out, "dtd", "lora", 1))
    with open(os.path.join(sweep.run_dir(out, "dtd", "lora", 1), "results.json"), "w") as f:
        json.dump(res, f)
    sweep.main([*argv, "--collect"])
    recs = sweep.read_records(os.path.join(out, "records.jsonl"))
    assert [(r["task"], r["method"], r["seed"], r["test_accuracy"]) for r in recs] == [
        ("dtd", "lora", 1, 0.5)
    ]
