"""A password in a tracking or storage URI never leaves the process.

Against a live ``mlflow server`` on 127.0.0.1 (it ignores credentials, so a URI carrying
them works as it would against a server that checks them): ``train``, ``tune`` and
``ablate`` with ``http://user:PASSWORD@...``, then every byte they wrote is searched: stdout,
stderr (MLflow's own "View run ... at: URL" line included), the server's database (params,
tags) and artifact folder (config.yaml, specs, reports), and the working directory (logs,
reports). The study's own Optuna storage is left out: it holds the spec as the user wrote it.
Reports and exported presets of a study on a PostgreSQL storage are checked without a
server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from tuning_helpers import TINY_OVERRIDES, TINY_RUN, tiny_spec, write_spec

from workbench.tracking import redact

SECRET = "Pw4SecretZ"
TINY = TINY_RUN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live MLflow tracking server on 127.0.0.1: (port, its folder)."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"),
        ],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: it starts workers of its own
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield port, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"},
    )  # fmt: skip


def _files_holding(root: Path, secret: str, skip: str = "\0") -> list[str]:
    return [
        str(p)
        for p in root.rglob("*")
        if p.is_file() and skip not in str(p) and secret.encode() in p.read_bytes()
    ]


def test_no_password_leaves_through_a_live_server(server, tmp_path):
    from mlflow.tracking import MlflowClient

    port, server_dir = server
    uri = f"http://user:{SECRET}@127.0.0.1:{port}"
    outputs = []

    train = _cli(["train", *TINY, f"tracking.uri={uri}", "tracking.experiment=secrets"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    outputs.append(train)
    run_id = json.loads(train.stdout.strip().splitlines()[-1])["run_id"]

    spec = tiny_spec(tmp_path, name="secret-study", n_trials=1, steps=200, eval_every=100)
    tune = _cli(["tune", str(write_spec(tmp_path, spec)), "--tracking-uri", uri], tmp_path)
    assert tune.returncode == 0, tune.stderr[-3000:]
    outputs.append(tune)

    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(
        "name: secret-ablation\nbaseline: a\nseeds: 1\nsteps: 200\n"
        "variants: {a: [], b: [agent.tau=0.01]}\n"
        f"base: {json.dumps(TINY_OVERRIDES)}\n"
        f"tracking: {{uri: '{uri}', dir: '{tmp_path / 'mlruns'}'}}\n"
    )
    ablate = _cli(["ablate", str(ablation)], tmp_path)
    assert ablate.returncode == 0, ablate.stderr[-3000:]
    outputs.append(ablate)

    for proc in outputs:
        assert SECRET not in proc.stdout + proc.stderr
        assert "View run" not in proc.stdout  # MLflow's line, with the URI as given
    assert "View experiment" not in train.stdout

    # params, tags and artifacts as the server holds them, and as a client reads them
    client = MlflowClient(f"http://127.0.0.1:{port}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 5  # the run; study parent and trial; ablation parent and 2 cells
    for run in runs:
        assert SECRET not in json.dumps([run.data.params, run.data.tags])
    assert client.get_run(run_id).data.params["tracking.uri"] == redact(uri)
    config = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "fetched"))
    assert f"uri: http://user:***@127.0.0.1:{port}" in Path(config).read_text()
    assert _files_holding(server_dir, SECRET) == []
    # logs, reports and specs written in the working directory (the specs are the user's)
    assert _files_holding(tmp_path, SECRET, skip="optuna/") == [str(ablation)]


def test_reports_and_presets_of_a_postgres_study_hold_no_password(tmp_path, capsys):
    """A study on ``postgresql://user:PASSWORD@...``, its tracking store there too, a trial
    failed with the URI in its reason: the report files, the terminal report and the
    exported preset carry none of it."""
    from workbench.tuning import export, report
    from workbench.tuning.spec import parse_spec
    from workbench.tuning.study import FAIL_REASON, OVERRIDES

    pg = f"postgresql://user:{SECRET}@db.example:5432/studies"
    raw = tiny_spec(tmp_path, name="pg", storage=pg)
    raw["base"]["overrides"].append(f"tracking.uri={pg}")
    spec = parse_spec(yaml.safe_dump(raw), source="pg.yaml")

    study = optuna.create_study(direction="maximize")  # in memory: no database here
    good = study.ask({"agent.tau": optuna.distributions.FloatDistribution(0.001, 0.05)})
    good.set_user_attr(OVERRIDES, [f"agent.tau={good.params['agent.tau']}"])
    study.tell(good, -150.0)
    bad = study.ask()
    bad.set_user_attr(FAIL_REASON, redact(f"TrackingError: cannot reach {pg}"))
    study.tell(bad, state=optuna.trial.TrialState.FAIL)

    out = report.write_report(study, spec, tmp_path / "report")
    report.print_report(study, spec, console=None)
    preset = export.export_best(study, spec, tmp_path / "preset.yaml")
    assert preset.is_file() and (out / "trials.csv").is_file()
    assert _files_holding(tmp_path, SECRET, skip="pg.yaml") == []
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"postgresql://user:{SECRET}@host:5432/db", "postgresql://user:***@host:5432/db"),
        (f"postgresql+psycopg2://u:{SECRET}@h/db", "postgresql+psycopg2://u:***@h/db"),
        (f"tracking.uri=http://me:{SECRET}@127.0.0.1:5000", "http://me:***@127.0.0.1:5000"),
        (f"mysql://root:{SECRET}@h/db?password={SECRET}", "mysql://root:***@h/db?password=***"),
        (f"uri: 'http://x:{SECRET}@h'\nother: 1", "uri: 'http://x:***@h'\nother: 1"),
    ],
)
def test_redact_hides_the_password_and_keeps_the_rest(text, shown):
    assert redact(text).endswith(shown) and SECRET not in redact(text)


def test_text_artifacts_are_redacted_before_they_are_stored(tmp_path):
    """A folder with a spec naming a store by URI is logged as a redacted copy; the
    original stays as the user wrote it, and files without secrets are untouched."""
    from workbench.tracking.writer import _without_secrets

    folder = tmp_path / "report"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "spec.yaml").write_text(f"uri: postgresql://u:{SECRET}@h/db\n")
    (folder / "weights.bin").write_bytes(bytes(range(256)))
    with _without_secrets(folder) as logged:
        assert logged != folder
        assert (logged / "sub" / "spec.yaml").read_text() == "uri: postgresql://u:***@h/db\n"
        assert (logged / "weights.bin").read_bytes() == bytes(range(256))
    assert SECRET in (folder / "sub" / "spec.yaml").read_text()
    clean = tmp_path / "clean.txt"
    clean.write_text("nothing to hide")
    with _without_secrets(clean) as logged:
        assert logged == clean
