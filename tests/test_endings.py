"""Every way a run's process ends leaves the true status in MLflow, with its reason, and says
it: signals (SIGINT, SIGTERM, SIGHUP) mid-run and right after the run is created, an
exception, a full disk (the store cannot take the ending: the next command records it),
``kill -9`` (a later command ends the run FAILED "abandoned"), in ``workbench train`` and in
ablations, populations included."""

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from workbench.config import TrackingConfig, compose
from workbench.tracking.tags import PROCESS_TAG, REASON_TAG
from workbench.train import Interrupted, train

TINY = [
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "agent.learning_starts=200",
    "eval.every=400",
    "eval.episodes=1",
    "eval.video=false",
    "tracking.log_every=100",
    "progress=false",
]


def _cfg(store, *extra):
    return compose(["total_steps=1200", *TINY, f"tracking.dir={store[0]}", *extra])


def _runs(uri, experiment="pendulum"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}


def _train_cli(tmp_path, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "train", *TINY, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _signal_on_line(proc, text, sig):
    """Send ``sig`` once ``text`` shows on the process's stderr; all of stdout and stderr."""
    seen = ""
    for line in proc.stderr:
        seen += line
        if text in line:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    return out, seen + err


def _wait_for_locks(folder, n, proc, timeout=120):
    """The pids in the lock files of ``n`` runs (a run holds its lock from its creation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = []
        for lock in folder.glob("*/.lock") if folder.is_dir() else []:
            pid = lock.read_bytes().split(b"\0")[0].split(b"\n")[0].strip()
            if pid:
                pids.append(int(pid))
        if len(pids) >= n:
            return pids
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{n} run locks did not appear")


def _ending_line(err, run_id, status, reason):
    return f"run {run_id} ended {status}: {reason}" in err


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name
)
def test_a_signal_mid_run_ends_it_killed_and_says_so(tmp_path, sig):
    """SIGHUP is a closed terminal or ssh session: like Ctrl-C, a checkpoint, then KILLED."""
    proc = _train_cli(tmp_path, "total_steps=4000")
    _, err = _signal_on_line(proc, "step 400: eval return", sig)
    assert proc.returncode == 130, err[-3000:]
    (run,) = _runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db").values()
    reason = run.data.tags[REASON_TAG]
    assert run.info.status == "KILLED"
    assert reason.startswith(f"interrupted ({sig.name}) at step ")
    assert f"resume={run.info.run_id}" in reason  # a checkpoint to continue from
    assert _ending_line(err, run.info.run_id, "KILLED", reason)
    assert err.strip().splitlines()[-1] == f"workbench: {reason}"


def test_a_closed_terminal_ends_the_run_killed(tmp_path):
    """A real hang-up: the terminal the run writes to goes away (writes to it fail from then
    on), then SIGHUP, as a closed ssh session does. The ending is recorded all the same."""
    import pty

    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "train", *TINY, "total_steps=6000"],
        cwd=tmp_path,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    seen, deadline = b"", time.monotonic() + 120
    while b"step 400: eval return" not in seen and time.monotonic() < deadline:
        seen += os.read(master, 4096)
    os.close(master)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) != 0
    (run,) = _runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db").values()
    assert run.info.status == "KILLED"
    assert run.data.tags[REASON_TAG].startswith("interrupted (SIGHUP) at step ")


def test_a_signal_right_after_the_run_is_created_ends_it_killed(tmp_path):
    """The run exists from the "MLflow run ... (new)" line on; a signal then, before the loop
    (or in its first steps, on a fast machine), ends it KILLED: never FAILED "process exited
    without ending the run", never RUNNING."""
    proc = _train_cli(tmp_path, "total_steps=4000")
    _, err = _signal_on_line(proc, "(new)", signal.SIGTERM)
    assert proc.returncode == 130, err[-3000:]
    (run,) = _runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db").values()
    reason = run.data.tags[REASON_TAG]
    assert run.info.status == "KILLED"
    assert reason.startswith("interrupted (SIGTERM) ")
    assert _ending_line(err, run.info.run_id, "KILLED", reason)
    assert err.strip().splitlines()[-1] == f"workbench: {reason}"


def test_a_signal_before_the_loop_stops_before_training(store, monkeypatch, caplog):
    """Deterministically in the window between the run's creation and its first step."""
    from workbench.run import Run

    caplog.set_level(logging.INFO, logger="workbench.run")
    reset = Run.reset

    def reset_then_signal(self):
        reset(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Run, "reset", reset_then_signal)
    with pytest.raises(Interrupted, match=r"interrupted \(SIGTERM\) before training started"):
        train(_cfg(store), handle_signals=True)
    (run,) = _runs(store[1]).values()
    assert run.info.status == "KILLED"
    assert run.data.tags[REASON_TAG] == "interrupted (SIGTERM) before training started"
    assert _ending_line(caplog.text, run.info.run_id, "KILLED", run.data.tags[REASON_TAG])
    assert not (store[0] / "checkpoints" / run.info.run_id).exists()  # nothing to resume


def test_an_interrupt_while_the_run_is_being_made_ends_it_killed(store, monkeypatch):
    """Without signal handling (the library), Ctrl-C right after the run's creation."""
    from workbench import run as run_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod.Run, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(store))
    (run,) = _runs(store[1]).values()
    assert (run.info.status, run.data.tags[REASON_TAG]) == ("KILLED", "interrupted")


def test_a_third_signal_does_not_cut_the_ending_short(store):
    """Ctrl-C, Ctrl-C (stop at once), and a third while the run is being ended: ignored, so
    the run still ends KILLED (cut short, it would stay RUNNING)."""
    from workbench.tracking import NullTracker

    class SignalledWhileEnding(NullTracker):
        def end(self, status="FINISHED", reason=None):
            os.kill(os.getpid(), signal.SIGINT)
            return super().end(status, reason)

    class TwoSignals:
        def on_evaluation(self, step, metrics, agent):
            if step == 400:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.2)  # past the second within which a signal counts as the same
                os.kill(os.getpid(), signal.SIGINT)

    tracker = SignalledWhileEnding()
    with pytest.raises(KeyboardInterrupt, match="second signal"):
        train(_cfg(store), tracker, hooks=[TwoSignals()], handle_signals=True)
    assert tracker.status == "KILLED"
    assert tracker.reason == "interrupted at step 400"


# ----------------------------------------------------------------------------- failures


def test_an_exception_mid_run_fails_it_and_says_so(store, monkeypatch, caplog):
    from workbench.run import Run

    after_step = Run.after_step

    def failing(self, prev_step, done, t_end):
        if self.state.step >= 600:
            raise RuntimeError("the simulator lost its state")
        after_step(self, prev_step, done, t_end)

    monkeypatch.setattr(Run, "after_step", failing)
    with pytest.raises(RuntimeError, match="lost its state"):
        train(_cfg(store))
    (run,) = _runs(store[1]).values()
    reason = "RuntimeError: the simulator lost its state"
    assert (run.info.status, run.data.tags[REASON_TAG]) == ("FAILED", reason)
    assert _ending_line(caplog.text, run.info.run_id, "FAILED", reason)


@pytest.mark.parametrize(
    "error, status, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "FAILED", "OSError: [Errno 28] No"),
        (KeyboardInterrupt(), "KILLED", "interrupted at step 800"),
    ],
    ids=["failed", "killed"],
)
def test_an_ending_the_store_cannot_take_is_said_and_recorded_later(
    store, monkeypatch, caplog, error, status, reason
):
    """A full disk, simulated in-process: the checkpoint write fails (or Ctrl-C comes) and
    the store refuses the ending. The run says so; the next ``train`` in the experiment
    records the ending it kept in its lock file."""
    from mlflow.exceptions import MlflowException

    from workbench import checkpoint

    def no_space(*args, **kwargs):
        raise error

    def store_full(self, run_id, status="FINISHED", end_time=None):
        raise MlflowException("database or disk is full")  # the run stays RUNNING

    monkeypatch.setattr(checkpoint, "save_checkpoint", no_space)
    monkeypatch.setattr(MlflowClient, "set_terminated", store_full)
    with pytest.raises(type(error)):
        train(_cfg(store, "checkpoint.every=800"))
    (run,) = _runs(store[1]).values()
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(
        m.startswith(f"run {run_id} ended {status} ({reason}")
        and "the store could not record that (database or disk is full)" in m
        and "the next `workbench train` in experiment 'pendulum'" in m
        for m in said
    ), said
    assert (store[0] / "checkpoints" / run_id / ".lock").exists()  # the ending is kept there

    monkeypatch.undo()
    train(_cfg(store, "total_steps=300"))  # the next run in the experiment
    old = _runs(store[1])[run_id]
    assert old.info.status == status
    assert old.data.tags[REASON_TAG].startswith(reason)
    assert "recorded by a later `workbench train`" in old.data.tags[REASON_TAG]
    assert "database or disk is full" in old.data.tags[REASON_TAG]
    assert not (store[0] / "checkpoints" / run_id).exists()  # no checkpoint: nothing left


@contextlib.contextmanager
def _tiny_disk(path: Path, size="24m"):
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {err}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_leaves_the_ending_for_the_next_train(tmp_path):
    """A real full disk: the store, its artifacts and the checkpoints on a small tmpfs that
    fills up mid-run. The process says the store could not record the ending; the next
    ``workbench train`` in the experiment records it once there is room again."""
    with _tiny_disk(tmp_path / "disk") as disk:
        proc = _train_cli(
            tmp_path, "total_steps=4000", "checkpoint.every=800", f"tracking.dir={disk}"
        )
        seen = ""
        for line in proc.stderr:
            seen += line
            if "step 400: eval return" in line:
                subprocess.run(
                    ["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=1M"], capture_output=True
                )
                break
        _, err = proc.communicate(timeout=120)
        err = seen + err
        assert proc.returncode != 0
        uri = f"sqlite:///{disk}/mlflow.db"
        (run,) = _runs(uri).values()
        run_id = run.info.run_id
        assert run.info.status == "RUNNING"
        line = next(x for x in err.splitlines() if f"run {run_id} ended FAILED (" in x)
        assert "but the store could not record that" in line and "disk is full" in line

        (disk / "filler").unlink()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "workbench.cli",
                "train",
                *TINY,
                "total_steps=300",
                f"tracking.dir={disk}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        old = _runs(uri)[run_id]
        assert old.info.status == "FAILED"
        reason = old.data.tags[REASON_TAG]
        assert "disk is full" in reason and "recorded by a later `workbench train`" in reason
        assert f"run {run_id} (" in out.stderr and "was left RUNNING: ended FAILED" in out.stderr


# ----------------------------------------------------------------------------- kill -9


def test_a_live_run_is_left_alone_and_a_dead_one_ends_abandoned(tmp_path):
    """``end_abandoned_runs`` tells a run that trains (its lock held) from one whose process
    was killed with ``kill -9`` (its lock free)."""
    from workbench.run import end_abandoned_runs

    proc = _train_cli(tmp_path, "total_steps=50000", "checkpoint.every=0")
    try:
        (pid,) = _wait_for_locks(tmp_path / "mlruns" / "checkpoints", 1, proc)
        assert pid == proc.pid
        tracking = TrackingConfig(dir=str(tmp_path / "mlruns"), experiment="pendulum")
        roots = [tmp_path / "mlruns" / "checkpoints"]
        assert end_abandoned_runs(tracking, roots, by="a test") == []
        (run,) = _runs(tracking_uri := f"sqlite:///{tmp_path}/mlruns/mlflow.db").values()
        assert run.info.status == "RUNNING"
    finally:
        proc.kill()
        proc.communicate()
    assert end_abandoned_runs(tracking, roots, by="a test") == [run.info.run_id]
    run = _runs(tracking_uri)[run.info.run_id]
    assert run.info.status == "FAILED"
    assert run.data.tags[REASON_TAG].startswith(f"abandoned: its process (pid {proc.pid}) ")
    assert run.data.tags[REASON_TAG].endswith("found by a test")
    assert not (roots[0] / run.info.run_id).exists()


def test_a_run_without_a_lock_is_judged_by_its_process(store):
    """Killed between its creation and its lock: its process tag says whether it lives."""
    from workbench.run import end_abandoned_runs
    from workbench.tracking import embedded_uri

    dead = subprocess.Popen(["true"])
    dead.wait()
    client = MlflowClient(embedded_uri(store[0]))
    exp = client.create_experiment("e", artifact_location=str(store[0] / "artifacts"))
    host = socket.gethostname()
    runs = {
        name: client.create_run(exp, tags={PROCESS_TAG: process}).info.run_id
        for name, process in [
            ("dead", f"{host}:{dead.pid}"),
            ("alive", f"{host}:{os.getpid()}"),
            ("elsewhere", f"another-{host}:{dead.pid}"),
            ("untagged", ""),
        ]
    }
    tracking = TrackingConfig(dir=str(store[0]), experiment="e")
    assert end_abandoned_runs(tracking, [store[0] / "checkpoints"], by="a test") == [runs["dead"]]
    statuses = {name: client.get_run(i).info.status for name, i in runs.items()}
    assert statuses == {
        "dead": "FAILED",
        "alive": "RUNNING",
        "elsewhere": "RUNNING",
        "untagged": "RUNNING",
    }


@pytest.mark.parametrize("killed", ["worker", "ablation"])
def test_an_ablation_killed_hard_leaves_no_run_running(tmp_path, killed):
    """``kill -9`` of an ablation worker training a population of two runs (or of the whole
    ablation, parent process included): both children end FAILED ("abandoned"), when the
    ablation ends (the worker alone killed) or when it is run again, and the re-run gives each
    cell exactly one FINISHED run."""
    from workbench.ablation import load_spec, run_ablation

    base = "[" + ", ".join(f"'{o}'" for o in TINY) + "]"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""
            name: kill
            base: {base}
            steps: 300
            seeds: [0]
            baseline: slow
            variants:
              slow: [agent.tau=0.005]
              fast: [agent.tau=0.05]
            tracking:
              dir: {tmp_path / "mlruns"}
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "ablate", str(spec), "--population", "2"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        pids = _wait_for_locks(tmp_path / "mlruns" / "checkpoints", 2, proc)
        assert len(set(pids)) == 1 and pids[0] != proc.pid  # one worker, both members
        if killed == "worker":
            os.kill(pids[0], signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"

    def children():
        runs = _runs(uri, "ablation-kill")
        return {i: r for i, r in runs.items() if "workbench.variant" in r.data.tags}

    first = children()
    assert len(first) == 2
    ended = "FAILED" if killed == "worker" else "RUNNING"  # nobody left to end them
    assert {r.info.status for r in first.values()} == {ended}, err[-3000:]

    result = run_ablation(load_spec(spec), workers=1, population=2, out_dir=tmp_path / "report")
    assert result.failed == []
    for run_id in first:
        run = children()[run_id]
        assert run.info.status == "FAILED"
        assert run.data.tags[REASON_TAG].startswith(f"abandoned: its process (pid {pids[0]}) ")
        assert "found by `workbench ablate`" in run.data.tags[REASON_TAG]
    runs = _runs(uri, "ablation-kill").values()
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = [
        r for r in runs if r.info.status == "FINISHED" and "workbench.variant" in r.data.tags
    ]
    cells = sorted(
        (r.data.tags["workbench.variant"], r.data.tags["workbench.seed"]) for r in finished
    )
    assert cells == [("fast", "0"), ("slow", "0")]
