"""Ablation specs, runner, resume and report, end to end with tiny runs."""

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from artifact_checks import pixels_of, read_png, where_is
from mlflow.tracking import MlflowClient

from workbench.ablation import load_spec, run_ablation
from workbench.specfile import SpecError

TINY = (
    "[env=pendulum, 'agent.actor_hidden=[16]', 'agent.critic_hidden=[16]', agent.batch_size=32, "
    "agent.learning_starts=100, eval.every=200, eval.episodes=1, eval.video=false, "
    "tracking.log_every=100]"
)


GREY_BLUE = ("tab:gray", "tab:blue")
SUMMARY_COLUMNS = [
    "variant", "n", "iqm", "iqm_ci_low", "iqm_ci_high", "mean", "median", "std",
    "p_improvement", "poi_ci_low", "poi_ci_high", "mwu_p", "verdict",
]  # fmt: skip


def _spec(tmp_path, body: str, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _tiny(tmp_path, *, seeds="[0, 1]", extra=""):
    return _spec(
        tmp_path,
        f"""
        name: tiny
        description: does a twin critic help?
        base: {TINY}
        steps: 400
        seeds: {seeds}
        baseline: ddpg
        variants:
          ddpg: [agent=ddpg]
          twin: [agent=ddpg, agent.n_critics=2]
        tracking:
          dir: {tmp_path / "mlruns"}
        {extra}
        """,
    )


def _body(variants="{a: [], b: []}", baseline="a", seeds="2", extra=""):
    return f"name: x\nbaseline: {baseline}\nseeds: {seeds}\nvariants: {variants}\n{extra}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_body(extra="colour: red\n"), "colour='red': unknown key; allowed: "),
        (_body("\n  a: []\n  a: [agent=td3]"), "duplicate key 'a' (line 6)"),
        (_body(baseline="c"), "baseline='c': must be one of the variants (a, b)"),
        (_body(seeds="0"), "seeds=0: must be a count >= 1"),
        (_body(seeds="[1, 1]"), "must be distinct"),
        (_body("{a: []}"), "at least two variant"),
        (_body("{a: [], b: [agent=sac]}"), "variant 'b': overrides do not compose"),
        (_body("{a: [], b: [agent.tau=3]}"), "variant 'b'"),
        (_body("{a: [], b: [agent.taux=3]}"), "agent.taux"),
        ("baseline: a\nseeds: 2\nvariants: {a: [], b: []}\n", "name=None: missing required key"),
    ],
)
def test_bad_specs_are_rejected_before_any_run(tmp_path, body, message):
    with pytest.raises(SpecError) as err:
        load_spec(_spec(tmp_path, body))
    assert message in str(err.value)
    assert not (tmp_path / "mlruns").exists()


def test_shipped_specs_load():
    names = {p.stem for p in Path("studies/ablations").glob("*.yaml")}
    assert {"td3_components", "exploration", "noise_schedule", "tau"} <= names
    for name in names:
        spec = load_spec(f"studies/ablations/{name}.yaml")
        assert spec.baseline in spec.variants


def test_tiny_ablation_end_to_end_and_resume(tmp_path, caplog):
    spec = load_spec(_tiny(tmp_path))
    out = tmp_path / "report"
    with caplog.at_level("INFO", logger="workbench.parallel"):
        result = run_ablation(spec, workers=2, out_dir=out)
    assert (result.ran, result.skipped, result.failed) == (4, 0, [])
    # the driver's line over the whole grid, from the units its workers say have ended
    said = [r.getMessage() for r in caplog.records if r.name == "workbench.parallel"]
    assert said[-1].startswith("ablation: 4/4 cells done, 0 running, 0 failed [4/4"), said
    assert sorted(result.scores) == ["ddpg", "twin"]
    assert all(len(v) == 2 for v in result.scores.values())
    # summary.csv: one row per variant, with the statistics of that variant's scores
    with (out / "summary.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = {r["variant"]: r for r in reader}
    assert reader.fieldnames == SUMMARY_COLUMNS
    assert sorted(rows) == ["ddpg", "twin"]
    for variant, row in rows.items():
        scores = result.scores[variant]
        assert int(row["n"]) == 2
        assert float(row["mean"]) == pytest.approx(np.mean(scores))
        assert float(row["median"]) == pytest.approx(np.median(scores))
        assert float(row["iqm_ci_low"]) <= float(row["iqm"]) <= float(row["iqm_ci_high"])
    assert rows["ddpg"]["verdict"] == "baseline" and rows["ddpg"]["p_improvement"] == "nan"
    assert 0.0 <= float(rows["twin"]["p_improvement"]) <= 1.0
    assert "too few seeds" in rows["twin"]["verdict"]
    # report.md: the table has a row per variant with its runs, mean and verdict
    md = (out / "report.md").read_text()
    assert md.startswith("# Ablation: tiny\n")
    for variant, row in rows.items():
        (line,) = [ln for ln in md.splitlines() if ln.startswith(f"| {variant} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [variant, "2"]
        assert cells[3].startswith(f"{float(row['mean']):.1f} ± ")
        assert cells[-1] == row["verdict"]
    assert "![IQM per variant](iqm.png)" in md and "![Learning curves](curves.png)" in md
    # the figures: 7-inch-wide plots at 120 dpi, one line per variant in the curves
    iqm = read_png(out / "iqm.png", (840, 264))  # 0.5 inch a variant + 1.2
    # a CI bar per variant: the baseline's grey on top, twin's blue below it
    per_row = {c: where_is(iqm, c, alpha=0.35).sum(axis=1) for c in GREY_BLUE}
    assert all(n.max() > 50 for n in per_row.values())
    assert per_row["tab:gray"].argmax() < per_row["tab:blue"].argmax()
    curves = read_png(out / "curves.png", (840, 480))
    assert pixels_of(curves, "C0") > 100 and pixels_of(curves, "C1") > 100

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("ablation-tiny")
    assert exp.tags["mlflow.note.content"] == "does a twin critic help?"  # the UI shows it
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("workbench.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("workbench.role") == "child"]
    assert len(parent) == 1 and len(children) == 4
    assert parent[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    pairs = sorted(
        (r.data.tags["workbench.variant"], r.data.tags["workbench.seed"]) for r in children
    )
    assert pairs == [("ddpg", "0"), ("ddpg", "1"), ("twin", "0"), ("twin", "1")]
    # the parent run holds the same files, byte for byte, the IQMs as one image and as tags
    logged = Path(client.download_artifacts(parent[0].info.run_id, "report", str(tmp_path)))
    for name in ("report.md", "report.html", "summary.csv", "iqm.png", "curves.png"):
        assert (logged / name).read_bytes() == (out / name).read_bytes(), name
    for variant, row in rows.items():
        text = parent[0].data.tags[f"workbench.iqm.{variant}"]
        assert text.startswith(f"{float(row['iqm']):.1f} [") and text.endswith("(n=2)")
    images = [a.path for a in client.list_artifacts(parent[0].info.run_id, "images")]
    assert any(p.startswith("images/ablation~iqm+step+4+") for p in images), images
    assert not [k for k in parent[0].data.metrics if k.startswith("iqm/")]

    # re-run with one more seed: the four finished runs are reused, only seed 2 runs
    client.set_terminated(children[0].info.run_id, "KILLED")  # and a killed one is redone
    spec = load_spec(_tiny(tmp_path, seeds="[0, 1, 2]"))
    again = run_ablation(spec, workers=2, out_dir=out)
    assert (again.ran, again.skipped) == (3, 3)
    assert all(len(v) == 3 for v in again.scores.values())
    md = (out / "report.md").read_text()  # the report is redone over three seeds
    assert "| ddpg | 3 |" in md and "| twin | 3 |" in md
    parents = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("workbench.role") == "parent"
    ]
    assert len(parents) == 1  # the same parent run continues


def test_cli_ablate_rejects_a_bad_spec(tmp_path):
    path = _spec(tmp_path, "name: x\nbaseline: a\nseeds: 2\nvariants: {a: [], b: [env=nope]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "ablate", str(path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "variant 'b': overrides do not compose" in proc.stderr
    assert not (tmp_path / "mlruns").exists()


def test_cli_ablate_names_each_failed_run(tmp_path, monkeypatch, capsys):
    """A run that failed is listed by variant and seed, and the command exits 1."""
    import signal

    from workbench import ablation
    from workbench.cli import main

    spec = ablation.AblationSpec("x", [], "a", {"a": [], "b": []}, [0, 1])
    failed = [ablation.Job("b", 1, (), "hash")]
    result = ablation.AblationResult(spec, "parent", 4, 0, failed, {}, {})
    monkeypatch.setattr(ablation, "load_spec", lambda path, quick=None: spec)
    monkeypatch.setattr(ablation, "run_ablation", lambda spec, **kwargs: result)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}  # main() sets them
    try:
        assert main(["ablate", str(tmp_path / "spec.yaml")]) == 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out = capsys.readouterr().out
    assert "ran 4, reused 0 finished run(s), 1 failed" in out
    assert "failed: b seed 1" in out


class _KillAt:
    def __init__(self, step):
        self.step = step

    def on_evaluation(self, step, metrics, agent):
        if step == self.step:
            raise KeyboardInterrupt


def test_a_killed_run_continues_from_its_checkpoint(tmp_path):
    """Re-running an ablation continues a killed child from its checkpoint, in the same MLflow
    run, instead of starting it over."""
    from workbench.ablation import ABLATION_TAG, ROLE_TAG, VARIANT_TAG, plan
    from workbench.config import compose
    from workbench.tracking import make_tracker
    from workbench.train import train

    spec = load_spec(_tiny(tmp_path, seeds="[0]"))
    spec.base.append("checkpoint.every=200")
    job = plan(spec)[0]
    cfg = compose(list(job.overrides))
    killed = make_tracker(cfg.tracking, run_name="ddpg-s0")
    tags = {ABLATION_TAG: "tiny", VARIANT_TAG: job.variant, ROLE_TAG: "child"}
    with pytest.raises(KeyboardInterrupt):
        train(cfg, killed, hooks=[_KillAt(400)], tags=tags)  # after the checkpoint at 200

    result = run_ablation(spec, workers=1, out_dir=tmp_path / "report")
    assert (result.ran, result.failed) == (2, [])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("ablation-tiny")
    mine = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("workbench.variant") == job.variant
    ]
    assert [r.info.run_id for r in mine] == [killed.run_id]  # continued, not redone
    assert mine[0].info.status == "FINISHED"
    assert mine[0].data.tags["workbench.resumed_at_step"] == "200"


def test_ctrl_c_checkpoints_every_run_and_a_rerun_continues_them(tmp_path):
    """Ctrl-C on ``workbench ablate`` (SIGINT to the whole process group, as a terminal
    sends it): each worker checkpoints its run and stops; the re-run continues both."""
    import os
    import signal
    import time

    path = _tiny(tmp_path, seeds="[0]")
    base = TINY[:-1] + ", checkpoint.every=1000]"
    path.write_text(path.read_text().replace(TINY, base).replace("steps: 400", "steps: 5000"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "ablate", str(path), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    folder = tmp_path / "mlruns" / "checkpoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # both runs past their first checkpoint
        if folder.is_dir() and len(list(folder.glob("*/step-*.pt"))) >= 2:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("ablation-tiny")
    children = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("workbench.role") == "child"
    ]
    assert len(children) == 2
    for run in children:
        assert run.info.status == "KILLED"
        assert "checkpoint written" in run.data.tags["workbench.status_reason"]

    result = run_ablation(load_spec(path), workers=2, out_dir=tmp_path / "report")
    assert (result.ran, result.failed) == (2, [])
    again = {
        r.info.run_id: r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("workbench.role") == "child"
    }
    assert set(again) == {r.info.run_id for r in children}  # the same two runs, continued
    for run in again.values():
        assert run.info.status == "FINISHED" and "workbench.resumed_at_step" in run.data.tags


def _tau(tmp_path, name: str) -> object:
    """Two variants that differ only in a per-member value (tau), x 2 seeds."""
    return load_spec(
        _spec(
            tmp_path,
            f"""
            name: {name}
            base: {TINY}
            steps: 400
            seeds: [0, 1]
            baseline: slow
            variants:
              slow: [agent.tau=0.005]
              fast: [agent.tau=0.05]
            tracking:
              dir: {tmp_path / "mlruns"}
            """,
            name=f"{name}.yaml",
        )
    )


def _children(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("workbench.role") == "child"
    ]


def test_population_ablation_equals_the_sequential_one_and_is_reused(tmp_path, capfd):
    """``--population 4``: the four cells train as one population, each its own FINISHED
    child run with the usual tags, the final scores of the cells run one by one (to float
    rounding), and a re-run reuses them all."""
    from workbench.ablation import group_jobs, plan

    spec = _tau(tmp_path, "pop")
    assert [len(u) for u in group_jobs(plan(spec), 4)] == [4]
    result = run_ablation(spec, workers=2, population=4, out_dir=tmp_path / "pop")
    assert (result.ran, result.skipped, result.failed) == (4, 0, [])
    assert "training 4 runs as one population" in capfd.readouterr().err
    assert (tmp_path / "pop" / "report.md").stat().st_size > 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    children = _children(client, "ablation-pop")
    assert len(children) == 4
    parent = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert parent == {result.parent_run_id}
    pop = {}
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["workbench.ablation"] == "pop"
        assert tags["mlflow.runName"] == f"{tags['workbench.variant']}-s{tags['workbench.seed']}"
        pop[tags["workbench.variant"], tags["workbench.seed"]] = run.data.metrics[
            "eval/final_return_mean"
        ]

    seq = run_ablation(_tau(tmp_path, "seq"), workers=1, out_dir=tmp_path / "seq")
    assert (seq.ran, seq.failed) == (4, [])
    one_by_one = {
        (r.data.tags["workbench.variant"], r.data.tags["workbench.seed"]): r.data.metrics[
            "eval/final_return_mean"
        ]
        for r in _children(client, "ablation-seq")
    }
    for key, value in one_by_one.items():  # to float rounding (tests/test_population.py)
        assert pop[key] == pytest.approx(value, rel=1e-4), key
    for variant, scores in seq.scores.items():
        assert sorted(result.scores[variant]) == pytest.approx(sorted(scores), rel=1e-4)

    again = run_ablation(spec, workers=2, population=4, out_dir=tmp_path / "pop")
    assert (again.ran, again.skipped, again.failed) == (0, 4, [])
    assert len(_children(client, "ablation-pop")) == 4


def test_group_jobs_splits_by_shape_and_chunks_by_size():
    """Jobs that share every population.SHARED_KEYS value go together (a job that continues a
    checkpoint too), in chunks of at most K; another shape is another population; K=1 is
    one run at a time."""
    import dataclasses

    from workbench.ablation import AblationSpec, group_jobs, plan

    spec = AblationSpec(
        "g",
        ["env=pendulum", "agent.batch_size=32"],
        "a",
        {
            "a": [],
            "b": ["agent.tau=0.05", "agent.gamma=0.9"],
            "wide": ["agent.critic_hidden=[32,32]"],
            "ln": ["agent.layer_norm=true"],
            "c": ["agent.actor_lr=0.01"],
        },
        [0, 1],
        experiment="g",
    )
    jobs = plan(spec)

    def names(units):
        return [[f"{j.variant}{j.seed}" for j in unit] for unit in units]

    assert names(group_jobs(jobs, 6)) == [
        ["a0", "a1", "b0", "b1", "c0", "c1"],
        ["wide0", "wide1"],
        ["ln0", "ln1"],
    ]
    assert names(group_jobs(jobs, 4)) == [
        ["a0", "a1", "b0"],
        ["b1", "c0", "c1"],
        ["wide0", "wide1"],
        ["ln0", "ln1"],
    ]
    resumed = [dataclasses.replace(jobs[0], resume="run"), *jobs[1:4]]
    assert names(group_jobs(resumed, 4)) == [["a0", "a1", "b0", "b1"]]
    assert names(group_jobs(jobs, 1)) == [[f"{j.variant}{j.seed}"] for j in jobs]
    with pytest.raises(ValueError, match="population=0"):
        group_jobs(jobs, 0)


def test_cli_ablate_rejects_a_population_below_one(tmp_path, capsys):
    from workbench.cli import main

    assert main(["ablate", str(tmp_path / "spec.yaml"), "--population", "0"]) == 2
    assert "--population=0: must be >= 1" in capsys.readouterr().err
