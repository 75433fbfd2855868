"""Studies end to end with tiny runs: pruning, failures, workers, resume, kill -9, export."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from artifact_checks import read_png
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial
from tuning_helpers import tiny_spec, write_spec

from workbench.cli import main
from workbench.config import compose, conf_dir
from workbench.tracking import embedded_uri
from workbench.tuning.export import PRESET_EXCLUDED, recheck, trial_overrides
from workbench.tuning.launch import prepare, resolve_target, run_study, storage_for
from workbench.tuning.objective import Objective
from workbench.tuning.spec import parse_spec
from workbench.tuning.study import (
    ENV_STEPS,
    FAIL_REASON,
    MLFLOW_RUN,
    PARENT_ATTR,
    PRUNE_REASON,
    counts,
    make_storage,
)
from workbench.tuning.worker import Worker


def _spec(tmp_path, **changes):
    return parse_spec(yaml.safe_dump(tiny_spec(tmp_path, **changes)))


def _client(tmp_path):
    return MlflowClient(embedded_uri(tmp_path / "mlruns"))


def _runs(tmp_path, experiment):
    client = _client(tmp_path)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _load(spec):
    target = resolve_target(spec)
    return optuna.load_study(study_name=spec.name, storage=storage_for(spec, target))


def _add_a_far_better_trial(study):
    """A finished trial far better at every step than any real run (return 0 at each)."""
    dist = {"agent.tau": optuna.distributions.FloatDistribution(0.001, 0.05, log=True)}
    study.add_trial(
        create_trial(
            value=0.0,
            params={"agent.tau": 0.01},
            distributions=dist,
            intermediate_values={s: 0.0 for s in (100, 200, 300, 400)},
        )
    )


def _one_more_trial(spec, study) -> None:
    """A worker (K=1) that runs the study's next trial, then stops."""
    n = sum(counts(t) for t in study.trials) + 1
    objective = Objective(spec, parent_run_id=None, n_trials=n)
    Worker(study, objective, 1, deadline=None, on_trial_end=lambda *_: None).run()


def test_pruner_stops_a_bad_trial_before_its_last_step(tmp_path):
    spec = _spec(tmp_path, pruner={"name": "median", "n_startup_trials": 1})
    study, _ = prepare(spec)
    _add_a_far_better_trial(study)  # the real run is below the median
    _one_more_trial(spec, study)
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[ENV_STEPS] < spec.steps  # it really stopped early
    assert trial.user_attrs[PRUNE_REASON].startswith("pruned at step 100")
    assert list(trial.intermediate_values) == [100]
    by_name = {r.info.run_name: r for r in _runs(tmp_path, "study-tiny")}
    seed_run = by_name[f"trial-{trial.number:04d}-s0"]
    # FINISHED, tagged pruned: the MLflow UI draws KILLED as a failure
    assert seed_run.info.status == "FINISHED"
    assert seed_run.data.tags["workbench.status_reason"].startswith("pruned at step 100")
    assert seed_run.data.tags["workbench.trial_state"] == "pruned"
    trial_run = by_name[f"trial-{trial.number:04d}"]
    assert trial_run.data.tags["workbench.trial_state"] == "pruned"
    assert trial_run.info.status == "FINISHED"
    assert trial_run.data.tags["mlflow.note.content"].startswith("FINISHED: pruned at step")


def test_a_diverging_trial_is_failed_with_its_reason_and_the_study_goes_on(tmp_path):
    space = {"agent.critic_lr": {"type": "categorical", "choices": [0.001, 1.0e30]}}
    spec = _spec(tmp_path, space=space)
    study, _ = prepare(spec)
    study.enqueue_trial({"agent.critic_lr": 1.0e30})
    study.enqueue_trial({"agent.critic_lr": 0.001})
    out = run_study(spec)
    trials = out.study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "DivergenceError" in trials[0].user_attrs[FAIL_REASON]
    assert all(counts(t) for t in trials)
    runs = {r.info.run_name: r for r in _runs(tmp_path, "study-tiny")}
    assert runs["trial-0000"].info.status == "FAILED"
    assert runs["trial-0000"].data.tags["workbench.trial_state"] == "failed"
    assert "DivergenceError" in runs["trial-0000"].data.tags["workbench.status_reason"]
    assert runs["trial-0001"].data.tags["workbench.trial_state"] == "complete"
    assert runs["study-tiny"].info.status == "FINISHED"

    # the top trial re-trained on a fresh seed, beside its search score
    rows = recheck(out.study, spec, top_k=1, n_seeds=1, parent_run_id=out.parent_run_id)
    assert [(r["trial"], r["recheck_seeds"]) for r in rows] == [(1, [1000])]
    assert rows[0]["search_value"] == trials[1].value
    again = {r.info.run_name: r for r in _runs(tmp_path, "study-tiny")}
    assert again["recheck-trial-0001-s1000"].data.tags["workbench.role"] == "recheck"


def test_two_workers_share_a_study_resume_adds_trials_and_the_preset_reproduces(
    tmp_path, monkeypatch, capsys
):
    path = write_spec(tmp_path, tiny_spec(tmp_path, enqueue_base=True, n_trials=3))
    assert main(["tune", str(path), "--workers", "2"]) == 0
    spec = parse_spec(path.read_text())
    study = _load(spec)
    assert sorted(t.number for t in study.trials if counts(t)) == [0, 1, 2]
    assert study.trials[0].params == {"noise": "gaussian", "agent.tau": 0.005}  # the preset
    parent = study.user_attrs[PARENT_ATTR]
    runs_before = {r.info.run_name for r in _runs(tmp_path, "study-tiny")}
    assert {"trial-0000", "trial-0001", "trial-0002", "trial-0000-s0"} <= runs_before

    # resume: the same command with a larger count adds one trial, same parent run
    assert main(["tune", str(path), "--trials", "4"]) == 0
    study = _load(spec)
    assert sorted(t.number for t in study.trials if counts(t)) == [0, 1, 2, 3]
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert study.user_attrs[PARENT_ATTR] == parent

    # the run tree: study parent, trial children with tags, seed runs under their trial
    client = _client(tmp_path)
    runs = {r.info.run_name: r for r in _runs(tmp_path, "study-tiny")}
    assert runs["study-tiny"].info.run_id == parent
    assert runs["study-tiny"].info.status == "FINISHED"
    for n in range(4):
        tr = runs[f"trial-{n:04d}"]
        assert tr.data.tags["mlflow.parentRunId"] == parent
        assert tr.data.tags["workbench.study"] == "tiny"
        assert tr.data.tags["workbench.trial"] == str(n)
        assert tr.data.tags["workbench.trial_state"] in ("complete", "pruned")
        assert "agent.tau" in tr.data.params
        sr = runs[f"trial-{n:04d}-s0"]
        assert sr.data.tags["mlflow.parentRunId"] == tr.info.run_id
        assert sr.data.tags["workbench.seed"] == "0"
        curve = client.get_metric_history(tr.info.run_id, "eval/return_mean")
        assert [m.step for m in curve] == [100, 200, 300, 400]
    # counts at step = trials counted so far (two workers may both log one step, alike)
    last = {}
    for key in ("study/n_complete", "study/n_pruned", "study/best_value"):
        points = {(m.step, m.value) for m in client.get_metric_history(parent, key)}
        assert len({step for step, _ in points}) == len(points)  # one value per step
        assert max(step for step, _ in points) == 4
        last[key] = max(points)[1]
    assert last["study/n_complete"] + last["study/n_pruned"] == 4
    assert client.get_run(parent).data.params["study.n_trials"] == "3"  # the first --trials
    assert client.get_run(parent).data.tags["workbench.n_trials"] == "4"  # the one now
    files = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/trials.csv", "report/summary.json", "report/optimization_history.png"} <= files
    # the logged report is of all four trials: the table, the summary and the history plot
    report = Path(client.download_artifacts(parent, "report", str(tmp_path / "dl")))
    with (report / "trials.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["number"]) for r in table] == [0, 1, 2, 3]
    for row in table:
        trial = study.trials[int(row["number"])]
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}[trial.state]
        assert row["state"] == state
        if trial.state == TrialState.COMPLETE:
            assert float(row["value"]) == pytest.approx(trial.value)
        assert float(row["params_agent.tau"]) == pytest.approx(trial.params["agent.tau"])
        assert row["params_noise"] == trial.params["noise"]
    best_trial = max(
        (t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value
    )
    summary = json.loads((report / "summary.json").read_text())
    assert (summary["study"], summary["n_trials"]) == ("tiny", 4)
    assert summary["best_trial"] == best_trial.number
    assert summary["best_value"] == pytest.approx(best_trial.value)
    assert summary["best_params"].keys() == best_trial.params.keys()
    assert summary["best_params"]["agent.tau"] == pytest.approx(best_trial.params["agent.tau"])
    assert summary["best_params"]["noise"] == best_trial.params["noise"]
    assert client.get_run(parent).data.tags["workbench.best_trial"] == str(best_trial.number)
    read_png(report / "optimization_history.png", (1000, 600))  # widened to 10 x 6 inches
    capsys.readouterr()

    # export through study-report into the user's config folder (not conf/: the source
    # tree stays clean), and compose it back from there
    user_conf = tmp_path / "user-conf"
    monkeypatch.setenv("WORKBENCH_USER_CONF", str(user_conf))
    before = sorted(p.name for p in (conf_dir() / "experiment").iterdir())
    code = main(["study-report", "tiny", "--dir", str(tmp_path / "mlruns"), "--export"])
    assert code == 0
    out, err = capsys.readouterr()
    assert "best trial written to" in err and "+experiment=tiny_best" in err
    assert "best: trial" in out and "top 4 trials" in out
    preset = user_conf / "experiment" / "tiny_best.yaml"
    assert preset.is_file()
    assert sorted(p.name for p in (conf_dir() / "experiment").iterdir()) == before
    want = compose(trial_overrides(spec, best_trial))
    got = compose(["+experiment=tiny_best"])
    for section in ("env", "agent", "noise", "schedule", "epsilon", "eval"):
        assert getattr(got, section) == getattr(want, section), section
    assert (got.seed, got.total_steps) == (want.seed, want.total_steps)
    assert not set(PRESET_EXCLUDED) & set(yaml.safe_load(preset.read_text()))


@pytest.mark.parametrize("population", [1, 2], ids=["sequential", "population"])
def test_a_worker_killed_mid_trial_leaves_nothing_running_and_the_study_finishes(
    tmp_path, population
):
    """kill -9 of a worker mid-trial (a sequential one, or a population training its two
    trials at once): the trials it held are found stale by their heartbeats, failed, retried
    with the same params by the next worker, and their MLflow runs end FAILED saying why."""
    # trials long enough to be seen running (both at once, for a population) when the
    # machine is loaded
    length = {"steps": 1600, "eval_every": 400}
    heartbeat = {"interval": 1, "grace_period": 3}
    spec_dict = tiny_spec(tmp_path, n_trials=2, heartbeat=heartbeat, **length)
    path = write_spec(tmp_path, spec_dict)
    spec = parse_spec(path.read_text())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workbench.cli",
                "tune",
                str(path),
                "--population",
                f"{population}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    try:
        deadline = time.monotonic() + 240
        victims: list = []
        seen: list = []
        while time.monotonic() < deadline and not victims and proc.poll() is None:
            time.sleep(0.2)
            db = tmp_path / "mlruns" / "optuna" / "tiny.db"
            if not db.exists():
                continue
            try:
                trials = _load(spec).trials
            except Exception:
                continue
            running = [t for t in trials if t.state == TrialState.RUNNING]
            seen = [(t.number, t.state.name) for t in trials]
            if len(running) == population and all(MLFLOW_RUN in t.user_attrs for t in running):
                victims = running
        assert victims, (
            f"{population} trial(s) never ran at once; worker exit {proc.poll()}, trials seen "
            f"{seen}; its log ends: {log.read_text()[-2000:]}"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stuck = [t for t in _load(spec).trials if t.state == TrialState.RUNNING]
    assert [t.number for t in stuck] == [v.number for v in victims]  # what kill -9 leaves

    out = run_study(spec)
    trials = out.study.trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(counts(t) for t in trials) == 2
    for victim in victims:
        dead = trials[victim.number]
        assert dead.state == TrialState.FAIL and not counts(dead)
        retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
        assert retried and retried[0].params == victim.params  # re-run with the same params
        run = _client(tmp_path).get_run(victim.user_attrs[MLFLOW_RUN])
        assert run.info.status == "FAILED"
        assert "heartbeat" in run.data.tags["workbench.status_reason"]
    # every counted trial has its MLflow run, finished, with its score
    for t in trials:
        if t.state == TrialState.COMPLETE:
            done = _client(tmp_path).get_run(t.user_attrs[MLFLOW_RUN])
            assert done.info.status == "FINISHED" and "trial/score" in done.data.metrics


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_objective_records_unusable_config_as_a_failure(tmp_path):
    spec = _spec(
        tmp_path, space={"agent.batch_size": {"type": "int", "low": 300000, "high": 300001}}
    )
    study, _ = prepare(spec)
    _one_more_trial(spec, study)
    trial = study.trials[-1]
    assert trial.state == TrialState.FAIL and counts(trial)
    assert "must not exceed agent.buffer_size" in trial.user_attrs[FAIL_REASON]


def test_report_only_and_missing_study(tmp_path, capsys):
    assert main(["study-report", "nothing", "--dir", str(tmp_path / "mlruns")]) == 2
    assert "no study 'nothing'" in capsys.readouterr().err
    assert not Path(tmp_path / "mlruns" / "optuna" / "nothing.db").exists()


def test_trials_that_break_for_other_reasons_do_not_count_and_stop_the_worker(
    tmp_path, monkeypatch
):
    from workbench import train as train_mod
    from workbench.tuning.objective import MAX_CONSECUTIVE_ERRORS, StudyError
    from workbench.tuning.study import ERROR_ATTR

    def broken(*args, **kwargs):
        raise RuntimeError("simulator crashed")

    monkeypatch.setattr(train_mod.Run, "reset", broken)
    spec = _spec(tmp_path, n_trials=5)
    with pytest.raises(StudyError, match="simulator crashed"):
        run_study(spec)
    trials = _load(spec).trials
    assert len(trials) == MAX_CONSECUTIVE_ERRORS
    assert all(t.state == TrialState.FAIL and not counts(t) for t in trials)
    assert all("RuntimeError: simulator crashed" in t.user_attrs[ERROR_ATTR] for t in trials)


@pytest.mark.parametrize("k", [1, 2], ids=["sequential", "population"])
def test_a_store_that_fails_stops_the_worker_and_its_trials_do_not_count(tmp_path, monkeypatch, k):
    """One tracking-failure policy for K=1 and K>1: a run whose store fails stops the worker
    with the store's error; its trial, and any other in flight, ends FAILED and is not
    counted; no state tag is written (it would fail again); no new trial starts."""
    from workbench import train as train_mod
    from workbench.tracking import TrackingError

    def down(self):
        raise TrackingError("the store went away")

    monkeypatch.setattr(train_mod.Run, "_report", down)
    spec = _spec(tmp_path, n_trials=4)
    with pytest.raises(TrackingError, match="went away"):
        run_study(spec, population=k)
    trials = _load(spec).trials
    assert len(trials) == k
    assert all(t.state == TrialState.FAIL and not counts(t) for t in trials)
    runs = {r.info.run_name: r for r in _runs(tmp_path, "study-tiny")}
    for n in range(k):
        trial_run = runs[f"trial-{n:04d}"]
        assert trial_run.info.status == "FAILED"
        assert trial_run.data.tags["workbench.status_reason"] == "the tracking store failed"
        assert trial_run.data.tags["workbench.trial_state"] == "running"  # no state tag
    assert runs["study-tiny"].info.status == "FAILED"


# --------------------------------------------------------------------------- populations


def test_a_population_study_refills_slots_as_trials_fail_or_finish(tmp_path):
    """tune --population 2: trials run two at a time; a diverging trial fails (counted) and
    the next takes its slot; the study ends at exactly n_trials, each trial with its runs."""
    space = {"agent.critic_lr": {"type": "categorical", "choices": [0.001, 1.0e30]}}
    spec = _spec(tmp_path, space=space, n_trials=4, sampler={"name": "random", "seed": 1})
    study, _ = prepare(spec)
    study.enqueue_trial({"agent.critic_lr": 1.0e30})
    for _ in range(3):
        study.enqueue_trial({"agent.critic_lr": 0.001})
    out = run_study(spec, population=2)
    trials = out.study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert "DivergenceError" in trials[0].user_attrs[FAIL_REASON]
    assert sum(counts(t) for t in trials) == 4
    runs = {r.info.run_name: r for r in _runs(tmp_path, "study-tiny")}
    assert runs["trial-0000"].data.tags["workbench.trial_state"] == "failed"
    for n in (1, 2, 3):
        assert runs[f"trial-{n:04d}"].data.tags["workbench.trial_state"] == "complete"
        seed_run = runs[f"trial-{n:04d}-s0"]
        assert seed_run.info.status == "FINISHED"
        assert seed_run.data.tags["mlflow.parentRunId"] == runs[f"trial-{n:04d}"].info.run_id
        assert "eval/final_return_mean" in seed_run.data.metrics
    assert runs["study-tiny"].info.status == "FINISHED"
    # the same values give the same score as in a sequential study (bit for bit on a CPU)
    assert trials[1].value == trials[2].value == trials[3].value


def test_a_population_study_prunes_and_refills(tmp_path):
    spec = _spec(tmp_path, pruner={"name": "median", "n_startup_trials": 1}, n_trials=4)
    study, _ = prepare(spec)
    _add_a_far_better_trial(study)
    out = run_study(spec, population=2)
    trials = out.study.trials
    assert [t.state for t in trials[1:]] == [TrialState.PRUNED] * 3  # two slots, three trials
    assert all(t.user_attrs[PRUNE_REASON].startswith("pruned at step 100") for t in trials[1:])
    runs = {r.info.run_name: r for r in _runs(tmp_path, "study-tiny")}
    assert {runs[f"trial-{n:04d}"].info.status for n in (1, 2, 3)} == {"FINISHED"}
    assert {runs[f"trial-{n:04d}"].data.tags["workbench.trial_state"] for n in (1, 2, 3)} == {
        "pruned"
    }


def test_population_refuses_a_search_over_shapes(tmp_path):
    from workbench.specfile import SpecError
    from workbench.tuning.worker import check_population

    space = {"agent.actor_hidden": {"type": "categorical", "choices": [[16], [32]]}}
    with pytest.raises(SpecError, match=r"space\.agent\.actor_hidden.*sets tensor shapes"):
        check_population(_spec(tmp_path, space=space), source="tiny")


def _open_storage(url: str) -> None:
    make_storage(url, heartbeat_interval=1, grace_period=3)


def test_workers_that_open_a_new_storage_together_all_get_it(tmp_path):
    """Processes opening one new storage at once race to create its tables; none may fail."""
    import multiprocessing as mp

    with mp.get_context("fork").Pool(4) as pool:
        for round_ in range(3):
            url = f"sqlite:///{tmp_path / f'race{round_}.db'}"
            pool.map(_open_storage, [url] * 4, chunksize=1)
