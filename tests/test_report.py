"""Tables and plots from run records: means/stds equal numpy, the table's shape, PNGs written."""

import numpy as np
import pytest

from experiments import report


def _records():
    rng = np.random.default_rng(0)
    recs = []
    for m, p in (("linear", 0), ("lora", 294912), ("guft", 1000)):
        for t in ("a", "b"):
            for s in range(3):
                recs.append(
                    dict(
                        method=m,
                        task=t,
                        seed=s,
                        test_accuracy=float(rng.uniform(0.5, 0.9)),
                        trainable_params=p,
                        backbone_params=10**6,
                        step_s=0.1,
                        trained_per_tensor={"Transformer.encoderblock_0.x.kernel": 10},
                        tensor_sizes={"Transformer.encoderblock_0.x.kernel": 1000},
                        config=dict(method=m),
                    )
                )
    return recs


def test_aggregate_matches_numpy():
    recs = _records()
    agg = report.aggregate(recs)
    acc = [r["test_accuracy"] for r in recs if r["method"] == "lora" and r["task"] == "b"]
    assert agg[("lora", "b")]["n"] == 3
    np.testing.assert_allclose(agg[("lora", "b")]["mean"], np.mean(acc))
    np.testing.assert_allclose(agg[("lora", "b")]["std"], np.std(acc, ddof=1))
    np.testing.assert_allclose(agg[("guft", "a")]["pct"], 0.1)


def test_markdown_table_shape_and_mean_column():
    recs = _records()
    t = report.markdown_table(recs, method_order=["linear", "lora", "guft"]).splitlines()
    assert len(t) == 2 + 3
    assert t[0].split("|")[1:-1] == [
        " method ",
        " a ",
        " b ",
        " mean ",
        " trainable params ",
        " % of backbone ",
        " step s ",
        " seeds ",
    ]
    agg = report.aggregate(recs)
    mean = 100 * (agg[("lora", "a")]["mean"] + agg[("lora", "b")]["mean"]) / 2
    assert f"{mean:.2f}" == t[3].split("|")[4].strip()


def test_plots_are_written(tmp_path):
    recs = _records()
    report.plot_accuracy_vs_params(recs, str(tmp_path / "a.png"))
    report.plot_guft_density(recs, str(tmp_path / "d.png"))
    for f in ("a.png", "d.png"):
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_step_over_full_and_peak_columns_from_the_records():
    recs = [
        dict(
            method=m,
            task="a",
            seed=0,
            test_accuracy=0.8,
            trainable_params=p,
            backbone_params=100,
            step_s=s,
            peak_bytes=mb * 2**20,
        )  # fmt: skip
        for m, p, s, mb in (("full", 100, 0.4, 300), ("lora", 1, 0.1, 100))
    ]
    recs.append(dict(recs[1], method="linear", peak_bytes=None))
    t = report.markdown_table(recs, method_order=["full", "lora", "linear"]).splitlines()
    head = [c.strip() for c in t[0].split("|")[1:-1]]
    assert head[-3:] == ["step / full", "peak MB", "seeds"]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in t[2:]}
    assert cells["full"][-3:-1] == ["1.00", "300"]
    assert cells["lora"][-3:-1] == ["0.25", "100"]
    assert cells["linear"][-2] == "—"
    # no full row and no peaks (older records): the columns are left out
    plain = report.markdown_table(recs[2:]).splitlines()[0]
    assert "step / full" not in plain and "peak MB" not in plain


def test_rank_rows_follow_their_run_with_the_truncated_counts():
    run = dict(method="dylora", task="a", seed=0, test_accuracy=0.8, trainable_params=8,
               backbone_params=100, step_s=0.2, rank_accuracy={"8": 0.8, "2": 0.7, "1": 0.6},
               rank_params={"1": 1, "2": 2, "8": 8})  # fmt: skip
    other = dict(run, method="lora", rank_accuracy=None)
    rows = report.rank_rows([run, other])
    assert [(r["method"], r["test_accuracy"], r["trainable_params"]) for r in rows] == [
        ("dylora@r1", 0.6, 1),
        ("dylora@r2", 0.7, 2),
        ("dylora@r8", 0.8, 8),
    ]
    t = report.markdown_table([run, other], method_order=["dylora", "lora"]).splitlines()
    names = [r.split("|")[1].strip() for r in t[2:]]
    assert names == ["dylora", "dylora@r1", "dylora@r2", "dylora@r8", "lora"]
    assert t[3].split("|")[-3].strip() == "—"  # a truncation has no step time of its own


def test_mask_rows_come_from_the_registration():
    """A row is a mask row when its registered method takes an ``eligible`` preset (GUFT, its
    variants, the one-shot masks), whatever the row's name."""
    recs = _records()
    recs.append(dict(recs[-1], method="guft_paper", config=dict(method="guft", lr=1.0)))
    recs.append(dict(recs[0], method="snip", config=dict(method="snip")))
    recs.append(dict(recs[0], method="pixels", config=dict(C=1.0)))
    assert report.mask_rows(recs) == ["guft", "guft_paper", "snip"]
    table = report.density_table(recs).splitlines()
    assert table[2] == "| module type | guft | guft_paper | snip |"


def test_report_cli_rewrites_the_table_in_the_preset_order(tmp_path, capsys):
    import json

    recs = [dict(r, preset="demo") for r in _records()]
    recs.sort(key=lambda r: r["method"])  # guft, linear, lora: not the demo's order
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    report.main([str(tmp_path)])
    md = (tmp_path / "table.md").read_text()
    names = [line.split("|")[1].strip() for line in md.splitlines()[2:5]]
    assert names == ["linear", "lora", "guft"]  # the demo preset's rows
    assert "GUFT vs LoRA and full fine-tuning" in md and md in capsys.readouterr().out
    with pytest.raises(ValueError, match="one folder"):
        report.main([])
