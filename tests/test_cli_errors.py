"""Every error a user or the machine causes ends in one ``workbench:`` line and its code.

Classes (``workbench.errors``): a config, spec or argument problem exits 2 naming the key or
file; a runtime failure (dead or read-only store, full disk, divergence, no CUDA, an env that
cannot be made, a discrete action space, unknown env kwargs) exits 1 saying what to do;
anything unforeseen exits 1 and points at ``--debug``. No traceback unless ``--debug`` or
WORKBENCH_DEBUG=1 asks for one. Dead stores fail within seconds in every command, and the
read-only commands (compare, study-report, tune --report, eval) work on a read-only store.

``train`` and the read-only store run in subprocesses (Hydra, logging and exit codes as a
user sees them); the other commands in-process through ``main``. Already covered elsewhere:
the bad-input classes of train/tune/ablate (``test_bad_input.py``) and a dead store for
train (``test_e2e.py``).

Read-only without root is ``chmod -R a-w``; as root (CI here) chmod does not stop writes, so
the store is bind-mounted read-only onto itself in a private mount namespace
(``unshare -m``): the kernel refuses every write, root's too.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tuning_helpers import TINY_RUN, tiny_spec, write_spec

from workbench.cli import main
from workbench.errors import DEBUG_HINT, explain

TINY = TINY_RUN
FAST_S = 15  # a dead store is said within this, in every command


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens


DEAD_HTTP = f"http://127.0.0.1:{_closed_port()}"
DEAD_PG = f"postgresql://user:s3cr3tpw@127.0.0.1:{_closed_port()}/db"


def _said(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("workbench:")]


def _assert_one_line(code: int, err: str, want_code: int, fragment: str) -> None:
    said = _said(err)
    assert code == want_code, err[-3000:]
    assert len(said) == 1, err[-3000:]
    assert fragment in said[0], said[0]
    assert "Traceback" not in err, err[-3000:]
    assert "s3cr3tpw" not in err


def _cli(args, cwd, *, env=None, prefix=(), timeout=120):
    """``workbench ARGS`` in a subprocess: (exit code, stdout, stderr, seconds)."""
    began = time.monotonic()
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "workbench.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "NO_PROXY": "127.0.0.1", **(env or {})},
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - began


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``workbench ARGS`` in-process in an empty cwd: (exit code, stderr, seconds)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WORKBENCH_DEBUG", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(sys, "argv", ["workbench"])

    def run(*args: str) -> tuple[int, str, float]:
        began = time.monotonic()
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's refusals
            code = exit_.code
        return code, capsys.readouterr().err, time.monotonic() - began

    yield run


# ------------------------------------------------------------- train, through Hydra


@pytest.mark.parametrize(
    ("overrides", "code", "fragment"),
    [
        pytest.param(["agent.tau=5"], 2, "agent.tau=5.0: must be in", id="config-value"),
        pytest.param(["-m", "agent.tauu=1"], 2, "agent.tauu", id="config-key-via-hydra"),
        pytest.param(
            ["device=cuda"],
            1,
            "CUDA is not available",
            id="no-cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here"),
        ),
        pytest.param(["+env.kwargs.nope=1"], 1, "cannot be made with env.kwargs", id="env-kwargs"),
        pytest.param(["env.id=CartPole-v1"], 1, "continuous (Box) action space", id="discrete"),
        pytest.param(
            ["agent.actor_lr=1e30", "agent.critic_lr=1e30"], 1, "diverged", id="divergence"
        ),
        pytest.param([f"tracking.uri={DEAD_PG}"], 1, "cannot reach", id="dead-database"),
    ],
)
def test_train_errors_are_one_line(tmp_path, overrides, code, fragment):
    got, _, err, seconds = _cli(["train", *overrides, *TINY], tmp_path)
    _assert_one_line(got, err, code, fragment)
    assert seconds < 60
    assert "Error executing job" not in err  # Hydra's line, with every override in it


def test_a_sweep_with_a_bad_value_in_its_last_job_trains_no_job(tmp_path):
    """Every job of a multirun is checked before Hydra starts: none trains, nothing is made."""
    got, _, err, _ = _cli(["train", "-m", "seed=0,1", "agent.tau=0.01,5", *TINY], tmp_path)
    _assert_one_line(got, err, 2, "agent.tau=5.0: must be in (0.0, 1.0]")
    assert not (tmp_path / "mlruns").exists()


def test_debug_shows_the_traceback(tmp_path):
    """--debug before or after the command, or WORKBENCH_DEBUG=1: the traceback, then the
    same one line."""
    args = ["train", *TINY, "env.id=CartPole-v1"]
    for argv, env in (
        (["--debug", *args], None),
        ([args[0], "--debug", *args[1:]], None),
        (args, {"WORKBENCH_DEBUG": "1"}),
    ):
        code, _, err, _ = _cli(argv, tmp_path, env=env)
        assert code == 1
        assert "Traceback" in err and "EnvError" in err, err[-2000:]
        assert len(_said(err)) == 1


# ---------------------------------------------------------- other commands, in-process


def _spec(tmp_path: Path, **changes) -> str:
    return str(write_spec(tmp_path, tiny_spec(tmp_path, name="errs", **changes)))


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        # config / arguments: 2, naming the file or the key
        (lambda tmp: ["tune", str(tmp / "nope.yaml")], 2, "nope.yaml"),
        (lambda tmp: ["tune", _spec(tmp), "--workers", "0"], 2, "tune: argument --workers"),
        (lambda tmp: ["ablate", str(tmp / "nope.yaml")], 2, "nope.yaml"),
        (lambda tmp: ["eval", "0123abcd"], 2, "no run 0123abcd"),
        (lambda tmp: ["bench", "--no-e2e", "--sb3", "no", "agent.tau=2"], 2, "agent.tau"),
        (lambda tmp: ["learning-check", "agent.taux=1"], 2, "agent.taux"),
        (lambda tmp: ["study-report", "nothing", "--dir", str(tmp)], 2, "no study 'nothing'"),
        # a dead tracking server or database: 1, within seconds, in every command
        (lambda tmp: ["compare", "--tracking-uri", DEAD_HTTP], 1, "cannot reach the MLflow"),
        (lambda tmp: ["compare", "--tracking-uri", DEAD_PG], 1, "cannot reach the MLflow"),
        (lambda tmp: ["eval", "0123abcd", "--tracking-uri", DEAD_HTTP], 1, "cannot reach"),
        (lambda tmp: ["ui", "--uri", DEAD_PG, "--port", "5999"], 1, "cannot reach the MLflow"),
        (lambda tmp: ["tune", _spec(tmp), "--tracking-uri", DEAD_HTTP], 1, "cannot reach"),
        (lambda tmp: ["tune", _spec(tmp), "--storage", DEAD_PG], 1, "Optuna storage"),
        (lambda tmp: ["study-report", "x", "--storage", DEAD_PG], 1, "Optuna storage"),
    ],
    ids=[
        "tune-missing-spec",
        "tune-bad-argument",
        "ablate-missing-spec",
        "eval-unknown-run",
        "bench-bad-value",
        "learning-check-bad-key",
        "study-report-unknown",
        "compare-dead-server",
        "compare-dead-database",
        "eval-dead-server",
        "ui-dead-database",
        "tune-dead-server",
        "tune-dead-storage",
        "study-report-dead-storage",
    ],
)
def test_command_errors_are_one_line(cli, tmp_path, argv, code, fragment):
    got, err, seconds = cli(*argv(tmp_path))
    _assert_one_line(got, err, code, fragment)
    assert seconds < FAST_S


def test_dead_server_in_the_environment_fails_fast(cli, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI names a dead server: learning-check's workers say so at once."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD_HTTP)
    got, err, seconds = cli("learning-check", "--seeds", "0", "--workers", "1", *TINY)
    _assert_one_line(got, err, 1, "cannot reach the MLflow tracking server")
    assert seconds < FAST_S + 10  # a spawned worker imports torch first


def test_an_unforeseen_error_points_at_debug(cli, monkeypatch):
    from workbench.cli import compare

    def broken(args):
        raise KeyError("surprise")

    monkeypatch.setattr(compare, "cmd_compare", broken)
    got, err, _ = cli("compare")
    _assert_one_line(got, err, 1, "unexpected error: KeyError")
    assert DEBUG_HINT in err


@pytest.mark.parametrize(
    ("error", "code", "fragment"),
    [
        (OSError(28, "No space left on device", "/data/mlruns/x"), 1, "free some space"),
        (OSError(30, "Read-only file system", "/archive/mlruns"), 1, "writable copy"),
        (PermissionError(13, "Permission denied", "/etc/x"), 1, "permission denied (/etc/x)"),
        (FileNotFoundError(2, "No such file", "spec.yaml"), 2, "spec.yaml: no such file"),
        (ValueError("--group-by='x': must be ..."), 2, "--group-by"),
        (RuntimeError("CUDA error: no CUDA GPUs are available"), 1, "device=cpu"),
    ],
    ids=["disk-full", "read-only", "permission", "missing-file", "argument", "torch-cuda"],
)
def test_library_errors_are_translated(error, code, fragment):
    got, line = explain(error)
    assert got == code and fragment in line and "\n" not in line


def test_sqlite_errors_are_translated():
    import sqlite3

    import sqlalchemy.exc

    readonly = sqlite3.OperationalError("attempt to write a readonly database")
    wrapped = sqlalchemy.exc.OperationalError("INSERT ...", {}, readonly)
    code, line = explain(wrapped)
    assert code == 1 and "writable copy" in line and "INSERT" not in line
    code, line = explain(sqlite3.OperationalError("database or disk is full"))
    assert code == 1 and "free some space" in line


# --------------------------------------------------------------- full disk, read-only


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


AS_ROOT = pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m")


def _in_namespace(setup: str) -> list[str]:
    """A command prefix: run it in a private mount namespace after ``setup`` (mounts)."""
    return ["unshare", "-m", "sh", "-c", f'{setup} && exec "$@"', "_"]


@AS_ROOT
def test_a_full_disk_is_said_plainly(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    prefix = _in_namespace(f"mount -t tmpfs -o size=64k tmpfs {disk}")
    code, _, err, _ = _cli(["train", *TINY, f"tracking.dir={disk}/mlruns"], tmp_path, prefix=prefix)
    _assert_one_line(code, err, 1, "disk is full")
    assert "free some space" in err


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A store holding a study of one trial, whose run keeps its policy (for eval)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("archive")
    spec = tiny_spec(root, name="kept", n_trials=1, steps=200, eval_every=100)
    spec["base"]["overrides"].remove("tracking.save_policy=false")
    code, _, err, _ = _cli(["tune", str(write_spec(root, spec))], root)
    assert code == 0, err[-2000:]
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (trial,) = [
        r for r in runs if any(a.path == "policy" for a in client.list_artifacts(r.info.run_id))
    ]
    return root, trial.info.run_id


def _read_only(store: Path) -> tuple[list[str], object]:
    """(command prefix, undo) that make ``store`` read-only for a command."""
    if os.geteuid() != 0:
        for path in [store, *store.rglob("*")]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

        def undo() -> None:
            for path in [store, *store.rglob("*")]:
                path.chmod(path.stat().st_mode | stat.S_IWUSR)

        return [], undo
    if not _can_unshare():
        pytest.skip("root without unshare -m: cannot make a store read-only")
    return _in_namespace(f"mount --bind -o ro {store} {store}"), lambda: None


@pytest.mark.parametrize(
    "argv",
    [
        lambda run_id: ["compare"],
        lambda run_id: ["eval", run_id, "--episodes", "1"],
        lambda run_id: ["study-report", "kept", "--dir", "mlruns"],
        lambda run_id: ["tune", "kept.yaml", "--report"],
    ],
    ids=["compare", "eval", "study-report", "tune-report"],
)
def test_read_only_commands_work_on_a_read_only_store(archive, argv):
    root, run_id = archive
    prefix, undo = _read_only(root / "mlruns")
    try:
        code, out, err, _ = _cli(argv(run_id), root, prefix=prefix)
    finally:
        undo()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and not _said(err)
    assert out.strip()


def test_training_into_a_read_only_store_is_refused_in_one_line(archive):
    root, _ = archive
    prefix, undo = _read_only(root / "mlruns")
    try:
        code, _, err, _ = _cli(["train", *TINY], root, prefix=prefix)
    finally:
        undo()
    _assert_one_line(code, err, 1, "writable copy")


def test_compare_where_no_store_is_says_so_and_makes_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare", "--experiment", "pendulum"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench: no MLflow store at ") and err.count("\n") == 1
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
