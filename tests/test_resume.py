"""Interruption and resume: a checkpointed run continues into the same MLflow run and, on a
CPU, ends exactly where the uninterrupted run with the same seed ends."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from workbench.checkpoint import CheckpointError, RunLock, list_checkpoints, prepare_resume
from workbench.config import ConfigError, compose
from workbench.tracking import metric_history
from workbench.train import DivergenceError, Interrupted, train

TINY = [
    "total_steps=1600",
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "agent.learning_starts=200",
    "eval.every=400",
    "eval.episodes=2",
    "eval.video=false",
    "tracking.log_every=100",
    "progress=false",
]
METRICS = ("eval/return_mean", "train/episode_return", "loss/critic", "explore/sigma")


class _Signal:
    """Sends this process a signal after the evaluation at ``step`` (Pendulum episodes are
    200 steps, so the run is at an episode boundary then), ``times`` times."""

    def __init__(self, step, sig=signal.SIGINT, times=1, gap_s=0.0):
        self.step, self.sig, self.times, self.gap_s = step, sig, times, gap_s

    def on_evaluation(self, step, metrics, agent):
        if step == self.step:
            for i in range(self.times):
                if i:
                    time.sleep(self.gap_s)
                os.kill(os.getpid(), self.sig)


def _cfg(store, *extra):
    return compose([*TINY, f"tracking.dir={store[0]}", *extra])


def _run(store, run_id):
    return MlflowClient(store[1]).get_run(run_id)


def _history(store, run_id):
    return {k: metric_history(store[1], run_id, k) for k in METRICS}


def _only_run(store, experiment="pendulum"):
    client = MlflowClient(store[1])
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


@pytest.mark.parametrize(
    "extra",
    [
        [],
        # every other piece of state: twin critics and delays, OU noise per env, running
        # obs statistics, epsilon-random actions, two envs, the plain buffer
        [
            "agent=td3",
            "noise=ou",
            "env.n_envs=2",
            "env.normalize_obs=true",
            "epsilon.start=0.2",
            "perf.replay_compact=false",
            "agent.layer_norm=true",
            "perf.device_metrics=false",
        ],
        ["noise=param", "schedule=linear", "schedule.end=0.02"],
    ],
    ids=["ddpg", "td3-ou-2envs-plain", "param-noise"],
)
def test_interrupted_run_resumes_into_the_same_run_and_matches_the_uninterrupted(store, extra):
    whole = train(_cfg(store, *extra, "tracking.experiment=whole"))

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        train(_cfg(store, *extra), hooks=[_Signal(800)], handle_signals=True)
    run = _only_run(store)
    assert run.info.status == "KILLED"
    reason = run.data.tags["workbench.status_reason"]
    assert f"resume={run.info.run_id}" in reason and "at step 800" in reason
    assert info.value.checkpoint.name == "step-000000000800.pt"
    assert signal.getsignal(signal.SIGINT) is before  # restored

    resumed = train(_cfg(store, *extra, f"resume={run.info.run_id}"))
    assert resumed.run_id == run.info.run_id and resumed.status == "FINISHED"
    run = _run(store, run.info.run_id)
    assert run.info.status == "FINISHED" and "workbench.status_reason" not in run.data.tags
    assert run.data.tags["workbench.resumed_at_step"] == "800"

    # same evaluation curve and final return, every metric point once at the same steps
    assert resumed.eval_steps == whole.eval_steps == [400, 800, 1200, 1600]
    assert resumed.eval_returns == whole.eval_returns
    assert resumed.final_return_mean == whole.final_return_mean
    assert _history(store, resumed.run_id) == _history(store, whole.run_id)
    # a finished run needs no checkpoint: its folder is gone
    assert not list_checkpoints(store[0] / "checkpoints" / run.info.run_id)
    assert run.data.tags["workbench.checkpoint_dir"] == "(deleted: the run finished)"


def test_periodic_checkpoints_are_pruned_and_a_mid_episode_one_resumes(store, caplog):
    # wait_steps=0: written at once, mid-episode (steps 700, 1400: not episode boundaries)
    cfg = _cfg(store, "checkpoint.every=700", "checkpoint.keep=1", "checkpoint.wait_steps=0")
    with pytest.raises(KeyboardInterrupt):
        # a second Ctrl-C (over a second later) stops at once, without a new checkpoint
        train(cfg, hooks=[_Signal(1200, times=2, gap_s=1.2)], handle_signals=True)
    run = _only_run(store)
    assert run.info.status == "KILLED"
    reason = run.data.tags["workbench.status_reason"]
    assert "step-000000000700.pt" in reason and "at step 1200" in reason
    folder = store[0] / "checkpoints" / run.info.run_id
    assert [p.name for p in list_checkpoints(folder)] == ["step-000000000700.pt"]
    assert run.data.tags["workbench.checkpoint_dir"] == str(folder)

    resumed = train(_cfg(store, f"resume={run.info.run_id}"))
    assert resumed.status == "FINISHED" and resumed.steps == 1600
    assert "mid-episode checkpoint" in caplog.text
    # points logged between the checkpoint (700) and the kill (1200) appear twice
    steps = [s for s, _ in metric_history(store[1], run.info.run_id, "eval/return_mean")]
    assert sorted(steps) == [400, 800, 800, 1200, 1200, 1600]


def test_one_ctrl_c_arriving_twice_is_one_interrupt(store):
    """Terminal Ctrl-C plus the SIGTERM a parent forwards: still a checkpoint, then stop."""
    cfg = _cfg(store, "eval.every=300")
    hook = _Signal(900, times=2)  # SIGINT and, at once, another
    with pytest.raises(Interrupted, match=r"at step 1000"):
        train(cfg, hooks=[hook], handle_signals=True)


def test_sigterm_waits_for_the_episode_boundary(store):
    with pytest.raises(Interrupted, match=r"SIGTERM\) at step 1000"):
        cfg = _cfg(store, "eval.every=300")
        train(cfg, hooks=[_Signal(900, signal.SIGTERM)], handle_signals=True)


def test_resume_refuses_what_it_cannot_continue(store):
    with pytest.raises(Interrupted):
        train(_cfg(store), hooks=[_Signal(400)], handle_signals=True)
    run_id = _only_run(store).info.run_id
    cfg = _cfg(store, f"resume={run_id}")

    # changing what is learned
    with pytest.raises(ConfigError, match=r"agent.tau: cannot be changed when resuming"):
        prepare_resume(cfg, [f"resume={run_id}", "agent.tau=0.5", "perf.compile=false"])
    # the run is still training somewhere
    lock = RunLock(store[0] / "checkpoints" / run_id)
    lock.acquire()
    try:
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
            train(cfg)
    finally:
        lock.release()
    # a checkpoint that belongs to another run
    other = store[0] / "checkpoints" / ("0" * 32)
    other.mkdir()
    for p in list_checkpoints(store[0] / "checkpoints" / run_id):
        (other / p.name).write_bytes(p.read_bytes())
    with pytest.raises(CheckpointError, match="belongs to run"):
        train(_cfg(store, f"resume={'0' * 32}"))
    # nothing to resume from; a bad id
    with pytest.raises(CheckpointError, match="no checkpoint for run"):
        train(_cfg(store, f"resume={'1' * 32}"))
    with pytest.raises(ConfigError, match="resume='last'"):
        _cfg(store, "resume=last")

    assert train(cfg).status == "FINISHED"
    with pytest.raises(CheckpointError, match="no checkpoint for run"):
        train(cfg)  # finished: its checkpoints are gone


def test_resume_may_change_the_device_and_what_else_never_changes_learning(store):
    whole = train(_cfg(store, "tracking.experiment=whole"))
    with pytest.raises(Interrupted):
        train(_cfg(store), hooks=[_Signal(800)], handle_signals=True)
    run_id = _only_run(store).info.run_id
    # the README and config.RUNTIME_KEYS allow these; the config hash must not object
    overrides = [f"resume={run_id}", "device=cpu", "torch_threads=1", "tracking.log_every=200"]
    cfg, state = prepare_resume(_cfg(store, *overrides), overrides)
    assert cfg.device == "cpu" and cfg.tracking.log_every == 200
    resumed = train(cfg, resume_state=state)
    assert resumed.status == "FINISHED" and resumed.run_id == run_id
    assert resumed.eval_returns == whole.eval_returns


def test_a_finished_run_is_not_reopened(store):
    cfg = _cfg(store, "checkpoint.keep_after_finish=true", "checkpoint.every=400")
    run_id = train(cfg).run_id
    from workbench.tracking import TrackingError

    with pytest.raises(TrackingError, match="already FINISHED"):
        train(_cfg(store, f"resume={run_id}"))


class _PoisonActor:
    def on_evaluation(self, step, metrics, agent):
        with torch.no_grad():
            for p in agent.actor.parameters():
                p.fill_(float("nan"))


def test_a_non_finite_action_fails_the_run(store):
    with pytest.raises(DivergenceError, match="non-finite action"):
        train(_cfg(store, "noise=none"), hooks=[_PoisonActor()])
    run = _only_run(store)
    assert run.info.status == "FAILED"
    assert "non-finite action" in run.data.tags["workbench.status_reason"]


def test_async_env_workers_survive_ctrl_c():
    """A terminal's Ctrl-C reaches the env workers too; they must outlive it so the training
    process can finish its step and write its checkpoint."""
    import numpy as np

    from workbench.envs import make_vec_env

    envs = make_vec_env("Pendulum-v1", 2, vectorization="async")
    try:
        envs.reset(seed=0)
        for p in envs.processes:
            os.kill(p.pid, signal.SIGINT)
        time.sleep(0.2)
        obs, *_ = envs.step(np.zeros((2, 1), np.float32))
        assert obs.shape == (2, 3) and all(p.is_alive() for p in envs.processes)
    finally:
        envs.close()


def _cli(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(folder, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob("*/step-*.pt")) if folder.is_dir() else []
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_cli_killed_run_resumes_with_one_command(tmp_path, sig):
    """A real ``workbench train`` process: SIGTERM checkpoints and exits 130; after kill -9
    the run stays RUNNING in MLflow, and resuming continues it from the periodic checkpoint."""
    args = [o for o in TINY if not o.startswith(("total_steps", "eval.every"))]
    args = ["total_steps=6000", *args, "checkpoint.every=1000", "eval.every=1000"]
    proc = _cli(*args, cwd=tmp_path)
    ckpt = _wait_for_checkpoint(tmp_path / "mlruns" / "checkpoints", proc)
    run_id = ckpt.parent.name
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, err
        assert f"workbench train resume={run_id}" in err
        assert client.get_run(run_id).info.status == "KILLED"
    else:
        assert proc.returncode == -signal.SIGKILL
        assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it

    proc = _cli(f"resume={run_id}", "progress=false", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f'"run_id": "{run_id}", "status": "FINISHED", "steps": 6000' in out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["workbench.overrides"].startswith("total_steps=6000")  # the original
    steps = {s for s, _ in metric_history(client.tracking_uri, run_id, "eval/return_mean")}
    assert steps == {1000, 2000, 3000, 4000, 5000, 6000}


def test_ctrl_c_checkpoints_every_member_of_a_population_and_each_resumes(store):
    """A population under Ctrl-C: each member writes its checkpoint at its episode boundary
    and ends KILLED saying how to continue; resumed alone, each ends where its uninterrupted
    run ends (to float rounding: a member equals its single run to rounding)."""
    from workbench.train import Member, train_population

    cfgs = [_cfg(store, f"seed={s}", "tracking.experiment=pop") for s in (0, 1)]
    whole = [train(_cfg(store, f"seed={s}", "tracking.experiment=whole")) for s in (0, 1)]
    members = [Member(cfgs[0], hooks=[_Signal(800)]), Member(cfgs[1])]
    results = train_population(members, handle_signals=True)
    for member, result in zip(members, results, strict=True):
        assert result.status == "KILLED" and result.steps == 800
        assert isinstance(member.error, Interrupted)
        assert member.error.checkpoint.name == "step-000000000800.pt"
        assert f"resume={result.run_id}" in result.reason
    for s, result, alone in zip((0, 1), results, whole, strict=True):
        resumed = train(
            _cfg(store, f"seed={s}", "tracking.experiment=pop", f"resume={result.run_id}")
        )
        assert resumed.run_id == result.run_id and resumed.status == "FINISHED"
        assert resumed.eval_steps == alone.eval_steps == [400, 800, 1200, 1600]
        assert resumed.eval_returns == pytest.approx(alone.eval_returns, rel=1e-4)
