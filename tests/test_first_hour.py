"""What a researcher sees in the first hour: run names that tell runs apart, study metrics
that are true, and progress and tables that say what is going on, on a terminal or in a file."""

import io
import json
import logging
import re
import subprocess
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial
from rich.console import Console

from workbench import ablation, display, logs
from workbench.config import TrackingConfig, compose
from workbench.evaluate import Evaluator
from workbench.tracking import ParentRun, embedded_uri, make_tracker
from workbench.tracking.tags import (
    NOTE_TAG,
    OVERRIDES_TAG,
    REASON_TAG,
    SWEEP_PARAMS_TAG,
    run_name,
)
from workbench.tuning.launch import StudyMetrics
from workbench.tuning.study import FAIL_REASON

ANSI = re.compile(r"\x1b\[")

# --------------------------------------------------------------------------- run names


def test_a_run_name_carries_the_overrides_that_change_learning():
    cfg = compose(["agent.tau=0.01", "agent.actor_lr=3e-4", "seed=3"])
    tags = {
        OVERRIDES_TAG: "agent.tau=0.01 agent.actor_lr=3e-4 seed=3 tracking.dir=/x progress=false"
    }
    assert run_name(cfg, tags) == "ddpg-pendulum-s3-tau=0.01,actor_lr=3e-4"
    # what the name says already, or what does not change learning, is left out
    plain = compose(["env=pendulum", "agent=td3"])
    assert run_name(plain, {OVERRIDES_TAG: "env=pendulum agent=td3 device=cpu"}) == (
        "td3-pendulum-s0"
    )
    assert run_name(plain) == "td3-pendulum-s0"


def test_a_long_list_of_overrides_gives_a_short_hash_and_a_sweep_job_its_swept_values():
    many = ["agent.tau=0.01", "agent.actor_lr=0.0003", "agent.critic_lr=0.001", "noise=ou"]
    cfg = compose(many)
    name = run_name(cfg, {OVERRIDES_TAG: " ".join(many)})
    assert re.fullmatch(r"ddpg-pendulum-s0-[0-9a-f]{6}", name)
    other = compose([*many[:3], "noise=gaussian"])
    assert run_name(other, {OVERRIDES_TAG: " ".join([*many[:3], "noise=gaussian"])}) != name
    # a sweep job: the values swept, not the overrides every job shares
    tags = {OVERRIDES_TAG: " ".join(many), SWEEP_PARAMS_TAG: "agent.tau=0.01 seed=0"}
    assert run_name(cfg, tags) == "ddpg-pendulum-s0-tau=0.01"
    # a name the user gave is kept
    named = compose(["tracking.run_name=mine", "agent.tau=0.01"])
    assert run_name(named, {OVERRIDES_TAG: "agent.tau=0.01"}) == "mine"


def test_a_taken_run_name_gets_a_suffix_within_its_experiment_only(tmp_path):
    store = tmp_path / "mlruns"
    names = []
    for experiment in ("a", "a", "a", "b"):
        tracker = make_tracker(
            TrackingConfig(dir=str(store), experiment=experiment), run_name="ddpg-pendulum-s0"
        )
        tracker.start(params={}, tags={})
        tracker.end("FINISHED")
        names.append(tracker.run_name)
    assert names == [
        "ddpg-pendulum-s0",
        "ddpg-pendulum-s0-2",
        "ddpg-pendulum-s0-3",
        "ddpg-pendulum-s0",
    ]
    client = MlflowClient(embedded_uri(store))
    exp = client.get_experiment_by_name("a")
    stored = sorted(r.info.run_name for r in client.search_runs([exp.experiment_id]))
    assert stored == sorted(names[:3])


# --------------------------------------------------------------------------- study metrics


class _Parent:
    """Records what a study's workers log to the parent run."""

    def __init__(self):
        self.points: dict[str, dict[int, float]] = {}

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.points.setdefault(key, {})[step] = value


def _finished(study, number_state_value):
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for state, value, attrs in number_state_value:
        study.add_trial(
            create_trial(
                state=state,
                value=value,
                params={"x": 0.5},
                distributions=dist,
                user_attrs=attrs,
            )
        )


def test_study_counts_only_go_up_when_trials_end_out_of_order():
    """Two workers: trial 1 ends before trial 0. Stepped by trial number the counts zig-zag
    and the latest point (highest step) said 1 complete with 2 complete; stepped by the
    number of trials counted they are cumulative."""
    study = optuna.create_study(direction="maximize")
    parent = _Parent()
    metrics = StudyMetrics(parent, "maximize", n_trials=4)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    # trials 0 and 1 start; 1 completes first, then 0; then 2 is pruned, 3 fails (counted)
    t0, t1 = study.ask(dist), study.ask(dist)
    metrics(study, study.tell(t1, 2.0))
    metrics(study, study.tell(t0, 1.0))
    t2, t3 = study.ask(dist), study.ask(dist)
    metrics(study, study.tell(t2, state=TrialState.PRUNED))
    t3.set_user_attr(FAIL_REASON, "diverged")
    metrics(study, study.tell(t3, state=TrialState.FAIL))
    p = parent.points
    assert p["study/n_complete"] == {1: 1, 2: 2, 3: 2, 4: 2}
    assert p["study/n_pruned"] == {1: 0, 2: 0, 3: 1, 4: 1}
    assert p["study/n_failed"] == {1: 0, 2: 0, 3: 0, 4: 1}
    assert p["study/best_value"] == {1: 2.0, 2: 2.0, 3: 2.0, 4: 2.0}
    # a trial's own value stays at its trial number
    assert p["study/value"] == {1: 2.0, 0: 1.0}


def test_a_trial_line_says_which_trial_how_far_and_when_done(caplog):
    study = optuna.create_study()
    metrics = StudyMetrics(None, "minimize", n_trials=3)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    with caplog.at_level(logging.INFO, logger="workbench.tuning.launch"):
        metrics(study, study.tell(study.ask(dist), 1.5))
    assert re.search(r"trial 0 complete: value 1\.50 .*\[1/3, ETA \d+s\]", caplog.text)


def test_a_reopened_parent_that_finishes_is_not_left_tagged_resumed(tmp_path):
    tracking = TrackingConfig(dir=str(tmp_path / "mlruns"), experiment="study-x")
    first = ParentRun.open(tracking, run_name="study-x", existing=None, params={}, tags={})
    first.end("KILLED", "interrupted")
    again = ParentRun.open(tracking, run_name="study-x", existing=first.run_id, params={}, tags={})
    client = MlflowClient(embedded_uri(tmp_path / "mlruns"))
    assert client.get_run(first.run_id).data.tags[REASON_TAG] == "resumed"
    again.end("FINISHED")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert REASON_TAG not in run.data.tags and NOTE_TAG not in run.data.tags
    # an ending with a reason keeps it
    third = ParentRun.open(tracking, run_name="study-x", existing=first.run_id, params={}, tags={})
    third.end("FINISHED", "stopped at 3 of 5 trials (timeout)")
    assert client.get_run(first.run_id).data.tags[REASON_TAG].startswith("stopped at 3")


# --------------------------------------------------------------------------- progress


def test_countdown_says_k_of_n_and_an_eta_from_the_rate_so_far(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    c = logs.Countdown(10, done=2)  # two were done before this process began
    assert c.update(2) == "2/10, ETA ?"
    now[0] += 60.0
    assert c.update(4) == "4/10, ETA 3m00s"  # 2 per minute, 6 left
    assert c.update(10) == "10/10, done"
    assert logs.Countdown(None).update(3) == "3 done"
    assert logs.duration(7300) == "2h01m"
    assert logs.duration(float("inf")) == "?"


def _terminal_display(monkeypatch, total):
    out = io.StringIO()
    term = Console(file=out, width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(display, "Console", lambda file=None: term)
    return display.ProgressDisplay(total), out


def _screen(raw: str) -> list[str]:
    """The lines a terminal would show, cursor codes dropped."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    return [line for chunk in text.split("\n") for line in chunk.split("\r") if line.strip()]


def test_the_progress_bar_shows_evaluation_and_no_nan_in_80_columns(monkeypatch):
    bar, out = _terminal_display(monkeypatch, 300_000)
    bar.update(150_000, last_return=-1234.5)  # sps not measured yet
    bar.evaluating(10)
    bar.evaluated(3)
    bar._progress.refresh()
    bar.evaluated(None)
    bar.close()
    lines = _screen(out.getvalue())
    assert all(len(line) <= 80 for line in lines), lines
    assert not any("nan" in line for line in lines)
    assert any(line.startswith("train") and "- sps" in line for line in lines)
    assert any(line.startswith("eval") and "3/10" in line for line in lines)


def test_a_redirected_run_draws_no_bar():
    bar = display.ProgressDisplay(1000)  # pytest's stderr is not a terminal
    assert not bar.enabled
    bar.evaluating(5)
    bar.evaluated(2)
    bar.close()


class _Display:
    def __init__(self):
        self.calls = []

    def evaluating(self, episodes):
        self.calls.append(("evaluating", episodes))

    def evaluated(self, done):
        self.calls.append(("evaluated", done))

    def update(self, step, **fields):
        pass


def test_an_evaluation_shows_its_episodes_and_names_its_run(caplog):
    env = gym.make("Pendulum-v1", max_episode_steps=5)
    tracker = make_tracker(TrackingConfig(backend="none"), run_name="x")
    tracker.run_name = "td3-s1"  # as an ablation's child run is called
    state = SimpleNamespace(record_eval=lambda *a: None)
    shown = _Display()
    cfg = SimpleNamespace(episodes=3, video_max_frames=10, video_fps=30)
    evaluator = Evaluator(
        cfg, env, lambda obs: np.zeros(1, np.float32), seed=0, tracker=tracker, state=state,
        display=shown,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="workbench.evaluate"):
        evaluator(500, final=True)
    assert shown.calls == [("evaluating", 3), *[("evaluated", n) for n in (1, 2, 3, None)]]
    assert "td3-s1: step 500: final evaluation (3 episodes)" in caplog.text
    assert "td3-s1: step 500: eval return" in caplog.text


# --------------------------------------------------------------------------- tables


def _rows():
    nan = float("nan")
    base = dict(variant="ddpg", n=10, iqm=-149.23, iqm_ci_low=-160.12, iqm_ci_high=-140.33)
    base.update(mean=-150.1, std=12.3, p_improvement=nan, poi_ci_low=nan, poi_ci_high=nan)
    other = dict(base, variant="td3-target-smoothing", iqm=-1192.2, iqm_ci_low=-1260.1)
    other.update(p_improvement=0.23, poi_ci_low=0.1, poi_ci_high=0.4, mwu_p=0.012)
    verdict = "worse than baseline (p = 0.012, P(improvement) = 0.23)"
    return [dict(base, mwu_p=nan, verdict="baseline"), dict(other, verdict=verdict)]


def test_the_ablation_table_fits_80_columns_one_line_per_variant():
    term = Console(file=io.StringIO(), width=80, color_system=None)
    result = SimpleNamespace(spec=SimpleNamespace(name="smoothing"))
    ablation.print_table(result, _rows(), term)
    lines = term.file.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    (row,) = [line for line in lines if line.startswith("td3-target-smoothing ")]
    assert "-1192 [-1260, -140.3]" in row and "0.23 [0.10, 0.40]" in row and "0.012" in row
    assert "  td3-target-smoothing: worse than baseline (p = 0.012, P(improvement) = 0.23)" in lines


def test_tables_written_to_a_file_are_plain_and_unwrapped():
    code = (
        "import json, sys; from types import SimpleNamespace as S;"
        "from workbench import ablation, display;"
        "ablation.print_table(S(spec=S(name='s')), json.loads(sys.argv[1]), display.console())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(_rows())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not ANSI.search(out.stdout)
    assert "mean ± std" in out.stdout  # wide: every column
    assert max(len(line) for line in out.stdout.splitlines()) <= display.FILE_WIDTH


# --------------------------------------------------------------------------- train's end


def test_a_sweep_names_its_jobs_and_says_where_each_run_is(tmp_path):
    tiny = [
        "total_steps=300", "agent.actor_hidden=[16]", "agent.critic_hidden=[16]",
        "agent.batch_size=32", "agent.learning_starts=200", "eval.every=300",
        "eval.episodes=1", "eval.video=false", "tracking.save_policy=false",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "train", "-m", *tiny, "agent.tau=0.01,0.02"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(embedded_uri(tmp_path / "mlruns"))
    exp = client.get_experiment_by_name("pendulum")
    runs = client.search_runs([exp.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == ["ddpg-pendulum-s0-tau=0.01", "ddpg-pendulum-s0-tau=0.02"]
    # the end of each job: the run, its experiment, its artifacts, how to look
    for run in runs:
        assert f"run {run.info.run_name} ({run.info.run_id}) in experiment 'pendulum'" in (
            proc.stderr
        )
        artifacts = run.info.artifact_uri.removeprefix("file://")
        assert f"  artifacts: {artifacts}" in proc.stderr
        assert (tmp_path / "mlruns").resolve().as_posix() in artifacts
    assert "  MLflow UI: http://127.0.0.1:5000/#/experiments/" in proc.stderr
    assert "(after `workbench ui`)" in proc.stderr
    # redirected: no progress bar, no colour codes, no carriage returns, no nan
    for text in (proc.stdout, proc.stderr):
        assert not ANSI.search(text) and "\r" not in text and "nan" not in text
