"""compare: selection, grouping, param diffs, statistics and outputs over real MLflow runs."""

import csv
import subprocess
import sys

import pytest
from artifact_checks import pixels_of, read_png

from workbench import compare
from workbench.tracking import MlflowTracker


def _run(uri, artifact_root, *, tau, seed, final, experiment="cmp", extra_tags=None):
    t = MlflowTracker(uri=uri, experiment=experiment, artifact_root=artifact_root)
    t.start(
        params={"agent.tau": tau, "seed": seed, "env.id": "Pendulum-v1"},
        tags={
            "workbench.config_hash": f"h{tau}",
            "workbench.seed": str(seed),
            **(extra_tags or {}),
        },
    )
    for i, step in enumerate((100, 200, 300)):
        t.log_metrics({"eval/return_mean": final * (i + 1) / 3}, step)
    t.log_metrics({"eval/final_return_mean": final, "perf/sps": 100.0}, 300)
    t.end("FINISHED")
    return t.run_id


@pytest.fixture
def runs(store):
    d, uri = store
    ids = {}
    for seed, final in enumerate([-100.0, -110.0, -120.0]):
        ids[("0.005", seed)] = _run(uri, d / "artifacts", tau=0.005, seed=seed, final=final)
    for seed, final in enumerate([-300.0, -310.0, -320.0]):
        ids[("0.02", seed)] = _run(
            uri, d / "artifacts", tau=0.02, seed=seed, final=final, extra_tags={"mark": "x"}
        )
    _run(uri, d / "artifacts", tau=0.5, seed=0, final=0.0, experiment="other")
    return uri, ids


def test_groups_by_config_hash_and_diffs_params(runs):
    uri, _ = runs
    selected = compare.select_runs(uri, experiments=["cmp"])
    assert len(selected) == 6
    groups = compare.group_runs(selected, "config_hash")
    assert sorted(groups) == ["h0.005", "h0.02"]
    diff = compare.differing_params(groups)
    assert diff == {"agent.tau": {"h0.005": "0.005", "h0.02": "0.02"}}  # seed is not a reason
    summaries = {s.group: s for s in compare.summarize_groups(groups, "eval/final_return_mean")}
    assert summaries["h0.005"].summary.mean == pytest.approx(-110.0)
    assert summaries["h0.02"].summary.median == pytest.approx(-310.0)
    curves = compare.group_curves(uri, groups)
    steps, center, low, high = curves["h0.005"]
    assert steps == [100, 200, 300]
    assert center[-1] == pytest.approx(-110.0)
    assert low[-1] <= center[-1] <= high[-1]


def test_selection_by_tag_filter_ids_and_all_experiments(runs):
    uri, ids = runs
    assert len(compare.select_runs(uri, tags=["mark=x"])) == 3
    flt = "params.`agent.tau` = '0.005'"
    assert len(compare.select_runs(uri, experiments=["cmp"], filter_string=flt)) == 3
    picked = [ids[("0.02", 0)], ids[("0.005", 1)]]
    assert {r.run_id for r in compare.select_runs(uri, run_ids=picked)} == set(picked)
    assert len(compare.select_runs(uri)) == 7  # every experiment
    by_param = compare.group_runs(compare.select_runs(uri), "param:agent.tau")
    assert sorted(by_param) == ["0.005", "0.02", "0.5"]


@pytest.mark.parametrize("bad", ["colour", "tag:", "param"])
def test_bad_group_by_is_explained(bad):
    with pytest.raises(ValueError, match="must be config_hash, run, tag:<name> or param:<name>"):
        compare.group_key(bad)


def test_unknown_experiment_is_explained(runs):
    uri, _ = runs
    with pytest.raises(ValueError, match="no experiment named 'nope'"):
        compare.select_runs(uri, experiments=["nope"])


def test_cli_prints_table_and_writes_csv_png(runs, tmp_path):
    uri, _ = runs
    out_csv, out_png = tmp_path / "c.csv", tmp_path / "c.png"
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "compare", "--experiment", "cmp",
         "--tracking-uri", uri, "--csv", str(out_csv), "--png", str(out_png)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "agent.tau" in proc.stdout and "h0.005" in proc.stdout
    with out_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [
        "group", "n", "eval/final_return_mean:iqm", "iqm_ci_low", "iqm_ci_high",
        "mean", "std", "median", "eval/return_mean:mean", "perf/sps:mean", "agent.tau",
    ]  # fmt: skip
    assert [r["group"] for r in rows] == ["h0.005", "h0.02"]
    assert [r["n"] for r in rows] == ["3", "3"]
    assert float(rows[0]["mean"]) == pytest.approx(-110.0)
    assert float(rows[1]["median"]) == pytest.approx(-310.0)
    assert [float(r["eval/return_mean:mean"]) for r in rows] == pytest.approx([-110.0, -310.0])
    assert [float(r["perf/sps:mean"]) for r in rows] == [100.0, 100.0]
    assert [r["agent.tau"] for r in rows] == ["0.005", "0.02"]
    # the curves: 7 x 4 inches at 120 dpi, one coloured line and band per group
    png = read_png(out_png, (840, 480))
    assert pixels_of(png, "C0") > 100 and pixels_of(png, "C1") > 100
