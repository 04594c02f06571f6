"""Tables and plots from run records: means/stds equal numpy, the table's shape, PNGs written."""

import numpy as np

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
