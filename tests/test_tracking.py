"""The MLflow tracking module against a real embedded (sqlite) store in a temporary folder."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from artifact_checks import pixels_of, read_png
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workbench.config import TrackingConfig
from workbench.plots import learning_curve
from workbench.tracking import (
    EXIT_REASON,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    PARENT_TAG,
    REASON_TAG,
    MlflowTracker,
    NullTracker,
    StopRun,
    Tracker,
    TrackingError,
    download_artifacts,
    embedded_uri,
    ends_run,
    git_info,
    make_tracker,
    redact,
    resolve_uri,
)

REPO = Path(__file__).resolve().parents[1]

# MLflow 3.17's mappers use a loader strategy SQLAlchemy 2.1 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*noload:DeprecationWarning")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One store for the module: a fresh sqlite db costs ~1.5 s of migrations."""
    root = tmp_path_factory.mktemp("store") / "mlruns"
    return embedded_uri(root), root / "artifacts"


def _tracker(shared, experiment: str = "test", **kwargs) -> MlflowTracker:
    uri, artifacts = shared
    return MlflowTracker(uri=uri, experiment=experiment, artifact_root=artifacts, **kwargs)


def _all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_all_artifacts(client, run_id, info.path) if info.is_dir else [info.path])
    return out


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("postgresql+psycopg2://u:p%40ss@h:5432/db", "postgresql+psycopg2://u:***@h:5432/db"),
        ("https://host/api?password=hunter2&x=1", "https://host/api?password=***&x=1"),
        ("https://host/api?x=1&token=abc.def", "https://host/api?x=1&token=***"),
        ("host=db user=me password=pw1234 dbname=m", "host=db user=me password=*** dbname=m"),
        ("sqlite:////tmp/mlruns/mlflow.db", "sqlite:////tmp/mlruns/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("s3://bucket/key?X-Amz-Signature=deadbeef", "s3://bucket/key?X-Amz-Signature=***"),
        ("tau=0.005 passes=3", "tau=0.005 passes=3"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_redact_hides_secret_env_values(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-value")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    assert redact("pw s3cr3t-value and tok-123456 here") == "pw *** and *** here"


def test_embedded_uri_is_absolute_and_creates_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = embedded_uri("mlruns")
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert uri.startswith("sqlite:////")
    assert (tmp_path / "mlruns").is_dir()


def test_resolve_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path / "m") == embedded_uri(tmp_path / "m")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_uri(None, tmp_path / "m") == "http://tracking:5000"
    assert resolve_uri("sqlite:////x/y.db", tmp_path / "m") == "sqlite:////x/y.db"


def test_make_tracker_picks_backend_and_artifact_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert isinstance(make_tracker(TrackingConfig(backend="none"), run_name="r"), NullTracker)
    cfg = TrackingConfig(dir=str(tmp_path / "mlruns"), experiment="e", flush_every_s=3.0)
    tracker = make_tracker(cfg, run_name="r", parent_run_id="p")
    assert isinstance(tracker, MlflowTracker)
    assert tracker.uri == embedded_uri(tmp_path / "mlruns")
    assert tracker.artifact_root == (tmp_path / "mlruns" / "artifacts").resolve()
    assert (tracker.parent_run_id, tracker.flush_every_s, tracker.run_name) == ("p", 3.0, "r")
    remote = make_tracker(TrackingConfig(uri="http://127.0.0.1:9", experiment="e"), run_name="r")
    assert isinstance(remote, MlflowTracker)
    assert remote.artifact_root is None


def test_experiments_are_tagged_as_model_training_unless_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlruns"
    client = MlflowClient(embedded_uri(store))

    def run_in(experiment: str) -> str:
        tracker = make_tracker(TrackingConfig(dir=str(store), experiment=experiment), run_name="r")
        tracker.start(params={}, tags={})
        tracker.end()
        return client.get_experiment(tracker.experiment_id).tags.get(EXPERIMENT_KIND_TAG)

    assert run_in("new") == EXPERIMENT_KIND  # created by workbench
    client.create_experiment("untagged")
    assert run_in("untagged") == EXPERIMENT_KIND  # created elsewhere, without a kind
    client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert run_in("chosen") == "genai_development"


def test_trackers_satisfy_the_protocol(shared):
    assert isinstance(NullTracker(), Tracker)
    assert isinstance(_tracker(shared), Tracker)


def test_git_info(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_info(plain) == {}

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=repo, check=True)
    info = git_info(repo)
    assert len(info["git.commit"]) == 40
    assert info["git.dirty"] == "false"
    (repo / "a.py").write_text("x = 2\n")
    assert git_info(repo)["git.dirty"] == "true"


# ----------------------------------------------------------------------------- null tracker


def test_null_tracker_keeps_everything_in_memory(tmp_path):
    t = NullTracker()
    assert t.start(params={"agent.tau": 0.005}, tags={"seed": "0"}) is None
    assert t.run_id is None
    t.log_metrics({"train/episode_return": 1.5, "q/mean": float("nan")}, step=10)
    t.log_metrics({"train/episode_return": 2.5}, step=20)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "w.pt").write_bytes(b"x")
    (tmp_path / "f.txt").write_text("f")
    t.log_artifact(tmp_path / "f.txt")
    t.log_artifact(tmp_path / "f.txt", "extra")
    t.log_artifacts(tmp_path / "d", "policy")
    t.log_text("a: 1\n", "config.yaml")
    t.set_tags({"best": "3"})
    t.flush()
    t.end("FAILED", "diverged")
    t.end("FINISHED")
    assert t.metrics["train/episode_return"] == [(10, 1.5), (20, 2.5)]
    assert t.params == {"agent.tau": 0.005}
    assert t.tags["seed"] == "0" and t.tags["best"] == "3"
    assert t.artifacts == ["f.txt", "extra/f.txt", "policy/sub/w.pt", "config.yaml"]
    assert t.texts == {"config.yaml": "a: 1\n"}
    assert (t.status, t.reason) == ("FAILED", "diverged")
    with pytest.raises(ValueError, match="metric key"):
        t.log_metrics({"bad key!": 1.0}, step=0)
    with pytest.raises(ValueError, match="status"):
        t.end("DONE")


# ----------------------------------------------------------------------------- ends_run


class _Stopped(KeyboardInterrupt):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (None, "FINISHED", None),
        (KeyboardInterrupt(), "KILLED", "interrupted"),
        (_Stopped("checkpoint written at step 200"), "KILLED", "checkpoint written at step 200"),
        (StopRun("pruned at step 300"), "KILLED", "pruned at step 300"),
        (StopRun("enough", status="FINISHED"), "FINISHED", "enough"),
        (RuntimeError("simulator crashed"), "FAILED", "RuntimeError: simulator crashed"),
    ],
)
def test_ends_run_ends_by_how_the_block_ended_and_re_raises(error, status, reason):
    t = NullTracker()
    with contextlib.suppress(BaseException), ends_run(t):
        if error is not None:
            raise error
    assert (t.status, t.reason) == (status, reason)
    if error is not None:
        with pytest.raises(type(error)), ends_run(NullTracker()):
            raise error


def test_ends_run_lets_the_caller_choose_reason_tags_and_the_normal_ending():
    def reason(err):
        return None if isinstance(err, KeyboardInterrupt) else f"short: {str(err)[:5]}"

    def tags(ending):
        return {"state": "failed" if ending.error else ending.status.lower()}

    t = NullTracker()
    with pytest.raises(ValueError), ends_run(t, reason=reason, tags=tags):
        raise ValueError("a long message")
    assert (t.status, t.reason, t.tags["state"]) == ("FAILED", "short: a lon", "failed")

    t = NullTracker()
    with pytest.raises(KeyboardInterrupt), ends_run(t, reason=reason):
        raise KeyboardInterrupt
    assert (t.status, t.reason) == ("KILLED", "interrupted")

    t = NullTracker()
    with ends_run(t, tags=tags) as ending:
        ending.set("FAILED", "2 of 4 runs failed")
    assert (t.status, t.reason, t.tags["state"]) == ("FAILED", "2 of 4 runs failed", "failed")
    with pytest.raises(ValueError, match="status"), ends_run(NullTracker()) as ending:
        ending.set("DONE")

    with ends_run(None):  # an untracked study: nothing to end
        pass


def test_ends_run_handles_a_failure_to_tag_like_a_failure_in_the_block():
    class Broken(NullTracker):
        def set_tags(self, tags):
            raise TrackingError("store down")

    t = Broken()
    with pytest.raises(TrackingError), ends_run(t, tags=lambda e: {"state": "complete"}):
        pass
    assert (t.status, t.reason) == ("FAILED", "TrackingError: store down")


# ----------------------------------------------------------------------------- mlflow runs


def test_run_round_trip(shared, tmp_path):
    uri, artifact_root = shared
    params = {f"group{i // 10}.key{i}": i * 0.5 for i in range(120)}
    params["env.kwargs"] = "x" * 7000
    params["tracking.uri"] = "postgresql://me:hunter2@db.example/mlflow"
    params["agent.actor_hidden"] = [256, 256]
    tags = {"seed": "3", "workbench.config_hash": "abc123", "git.commit": "f" * 40}

    t = _tracker(shared, experiment="round trip/1", run_name="rt")
    run_id = t.start(params=params, tags=tags)
    assert run_id and t.run_id == run_id
    keys = ["train/episode_return", "loss/critic", "loss/actor", "q/mean", "perf/sps"]
    for step in range(500):
        t.log_metrics({k: step + j for j, k in enumerate(keys)}, step=step * 10)  # 2,500 points
    t.log_metrics({"eval/return_mean": float("nan")}, step=5000)

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "actor.pt").write_bytes(b"\x00" * 100)
    (tmp_path / "ckpt" / "critic.pt").write_bytes(b"\x01" * 100)
    (tmp_path / "video.mp4").write_bytes(b"v")
    t.log_artifact(tmp_path / "video.mp4", "video")
    t.log_artifacts(tmp_path / "ckpt", "checkpoints")
    t.log_text("agent:\n  tau: 0.005\n", "config.yaml")
    fig = learning_curve([0, 10], [1.0, 2.0], [0.1, 0.2])
    t.log_figure(fig, "learning_curve.png")
    t.set_tags({"best": "2.0"})
    t.end("FINISHED")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "rt"
    logged = run.data.params
    assert len(logged) == len(params)
    assert logged["group0.key3"] == "1.5"
    assert logged["agent.actor_hidden"] == "[256, 256]"
    assert logged["env.kwargs"] == "x" * 6000
    assert logged["tracking.uri"] == "postgresql://me:***@db.example/mlflow"
    assert run.data.tags["seed"] == "3"
    assert run.data.tags["best"] == "2.0"
    assert run.data.tags["mlflow.source.git.commit"] == "f" * 40
    for j, key in enumerate(keys):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(s * 10, s + j) for s in range(500)]
    (nan_point,) = client.get_metric_history(run_id, "eval/return_mean")
    assert nan_point.value != nan_point.value  # NaN survives

    assert sorted(_all_artifacts(client, run_id)) == [
        "checkpoints/actor.pt",
        "checkpoints/critic.pt",
        "config.yaml",
        "learning_curve.png",
        "video/video.mp4",
    ]
    local = t.artifact_dir()
    assert local is not None and local.is_relative_to(artifact_root.resolve())
    assert (local / "checkpoints" / "actor.pt").read_bytes() == b"\x00" * 100
    assert (local / "checkpoints" / "critic.pt").read_bytes() == b"\x01" * 100
    assert (local / "video" / "video.mp4").read_bytes() == b"v"
    assert (local / "config.yaml").read_text() == "agent:\n  tau: 0.005\n"
    png = read_png(local / "learning_curve.png", (700, 400))  # the figure, 7 x 4 in at 100 dpi
    assert pixels_of(png, "tab:blue") > 100  # its eval line
    assert t.artifact_uri == run.info.artifact_uri


def test_end_failed_records_reason_and_second_end_is_harmless(shared):
    t = _tracker(shared)
    run_id = t.start(params={}, tags={})
    t.log_metrics({"loss/critic": 1.0}, step=1)
    t.end("FAILED", "critic loss is NaN at step 1200\nTraceback ...")
    t.end("FINISHED")  # ignored
    t.end("KILLED", "again")  # ignored
    run = MlflowClient(shared[0]).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[REASON_TAG].startswith("critic loss is NaN at step 1200")
    assert run.data.tags[NOTE_TAG] == "FAILED: critic loss is NaN at step 1200"
    assert run.data.metrics["loss/critic"] == 1.0  # flushed before terminating
    with pytest.raises(ValueError, match="status"):
        _tracker(shared).end("DONE")


def test_child_run_nests_under_parent(shared):
    parent = _tracker(shared, experiment="study")
    parent_id = parent.start(params={}, tags={"workbench.kind": "study"})
    child = _tracker(shared, experiment="study", parent_run_id=parent_id)
    child_id = child.start(params={"agent.tau": 0.01}, tags={"secret_url": "http://u:pw@h/"})
    child.end()
    parent.end()
    run = MlflowClient(shared[0]).get_run(child_id)
    assert run.data.tags[PARENT_TAG] == parent_id
    assert run.data.tags["secret_url"] == "http://u:***@h/"
    assert run.info.experiment_id == parent.experiment_id


def test_metrics_wait_in_the_buffer_until_it_is_full(shared, monkeypatch):
    t = _tracker(shared, max_buffer=100, flush_every_s=3600)
    t.start(params={}, tags={})
    assert t._client is not None
    batches: list[int] = []
    real = t._client.log_batch

    def counting(run_id, metrics=(), **kwargs):
        if metrics:
            batches.append(len(metrics))
        return real(run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(t._client, "log_batch", counting)
    for step in range(99):
        t.log_metrics({"train/x": float(step)}, step)
    time.sleep(0.3)
    assert batches == []  # nothing written below the threshold
    t.log_metrics({"train/x": 99.0}, 99)
    assert _wait_until(lambda: batches == [100])
    for step in range(100, 110):
        t.log_metrics({"train/x": float(step)}, step)
    t.flush()
    assert batches == [100, 10]
    t.end()
    assert len(MlflowClient(shared[0]).get_metric_history(t.run_id, "train/x")) == 110


def test_metrics_are_written_after_flush_every_s_without_more_logging(shared, monkeypatch):
    t = _tracker(shared, max_buffer=1000, flush_every_s=0.2)
    t.start(params={}, tags={})
    client = MlflowClient(shared[0])
    t.log_metrics({"train/x": 1.0, "train/y": 2.0}, 1)
    assert _wait_until(lambda: len(client.get_metric_history(t.run_id, "train/y")) == 1)
    t.end()


def test_a_failing_store_neither_raises_nor_loses_points(shared, monkeypatch):
    t = _tracker(shared, max_buffer=5, flush_every_s=3600)
    t.start(params={}, tags={})
    assert t._client is not None
    real = t._client.log_batch
    failures = [2]

    def flaky(run_id, metrics=(), **kwargs):
        if metrics and failures[0] > 0:
            failures[0] -= 1
            raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return real(run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(t._client, "log_batch", flaky)
    for step in range(12):
        t.log_metrics({"train/x": float(step)}, step)  # must not raise
    t.flush()
    t.end()
    history = MlflowClient(shared[0]).get_metric_history(t.run_id, "train/x")
    assert sorted(m.step for m in history) == list(range(12))
    assert failures == [0]


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mlflow-writer"]


def test_one_writer_thread_serves_every_run_and_a_failing_one_holds_up_no_other(
    shared, monkeypatch
):
    """A population's K runs (or a study's parent and trials) in one process share one
    writer thread, one batch per run; while one run's store calls fail and it backs off, the
    others' points still go out; the thread ends when the last run has."""
    runs = [_tracker(shared, max_buffer=10, flush_every_s=3600) for _ in range(3)]
    for t in runs:
        t.start(params={}, tags={})
    assert len(_writer_threads()) == 1
    failing = runs[0]
    assert failing._client is not None

    def down(run_id, metrics=(), **kwargs):
        raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(failing._client, "log_batch", down)
    for step in range(10):
        for t in runs:
            t.log_metrics({"train/x": float(step)}, step)
    client = MlflowClient(shared[0])
    for t in runs[1:]:
        assert _wait_until(lambda t=t: len(client.get_metric_history(t.run_id, "train/x")) == 10)
    assert failing._failing and len(failing._pending) == 10  # kept to retry
    monkeypatch.undo()
    for t in runs:
        t.end()
    assert len(client.get_metric_history(failing.run_id, "train/x")) == 10
    assert _wait_until(lambda: not _writer_threads(), timeout=30)  # slow on a loaded machine


def test_bad_metric_keys_fail_at_the_call(shared):
    t = _tracker(shared)
    t.start(params={}, tags={})
    for key in ("", "a@b", "/abs", "a//b", "../up", "x" * 300):
        with pytest.raises(ValueError, match="metric key"):
            t.log_metrics({key: 1.0}, 0)
    t.log_metrics({"ok/key_1.5 x:y": 1.0}, 0)
    t.end()


def test_deleted_experiment_is_a_clear_error(shared):
    t = _tracker(shared, experiment="to-delete")
    t.start(params={}, tags={})
    t.end()
    MlflowClient(shared[0]).delete_experiment(t.experiment_id)
    with pytest.raises(TrackingError, match="is deleted"):
        _tracker(shared, experiment="to-delete").start(params={}, tags={})


def test_download_artifacts(shared, tmp_path):
    t = _tracker(shared)
    run_id = t.start(params={}, tags={})
    t.log_text("weights", "policy/actor.txt")
    t.end()
    got = download_artifacts(shared[0], run_id, "policy", tmp_path / "dl")
    assert (got / "actor.txt").read_text() == "weights"
    with pytest.raises(ValueError, match="no run nonexistent"):
        download_artifacts(shared[0], "nonexistent", "policy", tmp_path / "dl2")
    with pytest.raises(ValueError, match="no artifact"):
        download_artifacts(shared[0], run_id, "missing", tmp_path / "dl3")
    with pytest.raises(ValueError, match="no run"):
        download_artifacts(embedded_uri(tmp_path / "empty"), run_id, "policy", tmp_path / "dl4")


@pytest.mark.parametrize(
    "uri",
    ["http://127.0.0.1:9", "postgresql://user:secret@127.0.0.1:9/mlflow"],
)
def test_unreachable_store_fails_fast_with_a_plain_message(uri):
    began = time.monotonic()
    with pytest.raises(TrackingError) as info:
        MlflowTracker(uri=uri, experiment="x").start(params={}, tags={})
    assert time.monotonic() - began < 10
    message = str(info.value)
    assert redact(uri) in message
    assert "secret" not in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- processes


def _race_worker(uri: str, root: str, barrier, queue) -> None:
    import mlflow.tracking  # noqa: F401  (pay the import before the barrier: race for real)

    from workbench.tracking import MlflowTracker

    barrier.wait(timeout=60)
    try:
        t = MlflowTracker(uri=uri, experiment="race", artifact_root=Path(root))
        t.start(params={"pid": os.getpid()}, tags={})
        t.end()
        queue.put(("ok", t.experiment_id))
    except Exception as err:
        queue.put(("error", repr(err)))


def test_two_processes_create_one_experiment_in_a_fresh_db(tmp_path):
    """Unguarded, this races: MLflow migrates a fresh sqlite db in every process that opens
    it ("duplicate column name", mlflow #4123)."""
    uri = embedded_uri(tmp_path / "mlruns")
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(uri, str(tmp_path / "art"), barrier, queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert results[0][1] == results[1][1]
    runs = MlflowClient(uri).search_runs([results[0][1]])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


_EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from workbench.tracking import MlflowTracker

    t = MlflowTracker(uri=sys.argv[1], experiment="exit", artifact_root=Path(sys.argv[2]))
    t.start(params={}, tags={})
    t.log_metrics({"train/x": 1.0}, 1)
    print(t.run_id)
    """
)


def test_process_exit_without_end_marks_the_run_failed(shared):
    uri, root = shared
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, uri, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    run_id = out.stdout.strip().splitlines()[-1]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[REASON_TAG] == EXIT_REASON
    assert run.data.metrics["train/x"] == 1.0


def _forked_worker(uri: str, root: str, queue) -> None:
    t = MlflowTracker(uri=uri, experiment="fork", artifact_root=Path(root))
    queue.put(t.start(params={}, tags={}))
    # returns without end(): fork workers leave through os._exit, skipping atexit


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_fork_worker_without_end_marks_the_run_failed(shared):
    uri, root = shared
    MlflowClient(uri).search_experiments()  # the parent holds pooled connections when forking
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_forked_worker, args=(uri, str(root), queue))
    proc.start()
    run_id = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[REASON_TAG] == EXIT_REASON
