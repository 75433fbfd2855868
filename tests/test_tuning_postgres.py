"""A real PostgreSQL server (started here, in a temp dir, on a free port) serves a study that
two worker processes share — the multi-machine set-up, on one machine.

Marked ``postgres``; it runs by default and skips, saying why, where the server binaries
(initdb, pg_ctl: /usr/lib/postgresql/*/bin or $WORKBENCH_PG_BIN) or psycopg2 are missing.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from tuning_helpers import tiny_spec

from workbench.tuning.launch import run_study
from workbench.tuning.spec import parse_spec
from workbench.tuning.study import counts, make_storage

pytestmark = pytest.mark.postgres


def _pg_bin() -> Path | None:
    candidates = []
    if env := os.environ.get("WORKBENCH_PG_BIN"):
        candidates.append(Path(env))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(found).parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL server binaries not found (set WORKBENCH_PG_BIN)")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[postgres]'")
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(root, user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser")
        run_as = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-c"]
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        argv = [*run_as, " ".join(cmd)] if run_as[:1] == ["su"] else [*run_as, *cmd]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    try:
        run(str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(pg / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "start")
    except subprocess.CalledProcessError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {err.stderr.decode(errors='replace')[-500:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
            if run_as[:1] != ["su"]
            else [*run_as, f"{pg / 'pg_ctl'} -D {data} -m immediate stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_storage_serves_a_study_to_two_workers(tmp_path, postgres_url):
    spec = parse_spec(yaml.safe_dump(tiny_spec(tmp_path, name="pg", n_trials=3)))
    out = run_study(spec, workers=2, storage=postgres_url)
    assert out.exit_codes == [0, 0]
    storage = make_storage(postgres_url, heartbeat_interval=10, grace_period=60)
    study = optuna.load_study(study_name="pg", storage=storage)
    assert sum(counts(t) for t in study.trials) == 3
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert not (tmp_path / "mlruns" / "optuna" / "pg.db").exists()  # nothing fell back to sqlite


def test_a_training_run_tracks_to_postgres(tmp_path, monkeypatch, postgres_url):
    """``tracking.uri=postgresql://...`` as written: the driver we install is picked."""
    from mlflow.tracking import MlflowClient

    from workbench.config import compose
    from workbench.tracking import driver_url
    from workbench.train import train

    monkeypatch.chdir(tmp_path)  # MLflow puts a database store's artifacts under ./mlruns
    cfg = compose(
        [
            "total_steps=400",
            "agent.actor_hidden=[16]",
            "agent.critic_hidden=[16]",
            "agent.learning_starts=100",
            "eval.every=200",
            "eval.episodes=1",
            "eval.video=false",
            "progress=false",
            f"tracking.uri={postgres_url}",
            "tracking.experiment=pg",
        ]
    )
    result = train(cfg)
    client = MlflowClient(driver_url(postgres_url))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")] == [
        200,
        400,
    ]


def test_population_workers_share_a_postgres_study(tmp_path, postgres_url):
    """tune --workers 2 --population 2: two processes, two trials at a time each."""
    spec = parse_spec(yaml.safe_dump(tiny_spec(tmp_path, name="pgpop", n_trials=5)))
    out = run_study(spec, workers=2, storage=postgres_url, population=2)
    assert out.exit_codes == [0, 0]
    storage = make_storage(postgres_url, heartbeat_interval=10, grace_period=60)
    study = optuna.load_study(study_name="pgpop", storage=storage)
    assert sum(counts(t) for t in study.trials) == 5
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
