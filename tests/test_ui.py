"""What a researcher sees in the MLflow UI: the links workbench prints, ``workbench ui`` itself
(its options, its server's start), experiment descriptions and the ablation's HTML report."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from workbench.config import TrackingConfig
from workbench.tracking import make_tracker
from workbench.tracking.tags import NOTE_TAG
from workbench.tracking.ui import (
    describe_experiment,
    runs_view_line,
    runs_view_url,
    ui_base_url,
    ui_command,
)

ROOT = Path(__file__).resolve().parents[1]


def _run(store_dir: Path, experiment: str = "pend", name: str = "r") -> tuple[str, str]:
    tracker = make_tracker(TrackingConfig(dir=str(store_dir), experiment=experiment), run_name=name)
    tracker.start(params={}, tags={})
    tracker.end("FINISHED")
    assert tracker.run_id is not None and tracker.experiment_id is not None
    return tracker.run_id, tracker.experiment_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- links


def test_runs_view_url_opens_the_runs_table_of_the_store_or_server():
    query = "?workflowType=machine_learning"
    assert runs_view_url("sqlite:////x/mlruns/mlflow.db", "3") == (
        f"http://127.0.0.1:5000/#/experiments/3{query}"
    )
    assert runs_view_url("postgresql://u:pw@db/x", "3", ui_url="http://h:81/") == (
        f"http://h:81/#/experiments/3{query}"
    )
    # a server is its own UI; its credentials never go into a printed link
    link = runs_view_url("https://user:s3cret@mlflow.example.org/prefix/", "12")
    assert link == f"https://mlflow.example.org/prefix/#/experiments/12{query}"
    assert "s3cret" not in link and "user" not in link


def test_ui_base_url_is_what_a_local_browser_reaches():
    assert ui_base_url("0.0.0.0", 5000) == "http://127.0.0.1:5000"
    assert ui_base_url("::", 80) == "http://127.0.0.1:80"
    assert ui_base_url("::1", 5001) == "http://[::1]:5001"
    assert ui_base_url("10.0.0.2", 5002) == "http://10.0.0.2:5002"


def test_ui_command_names_the_store_to_serve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    assert ui_command(default, "mlruns") == "workbench ui"
    assert ui_command(other, "elsewhere") == "workbench ui --dir elsewhere"
    assert ui_command("postgresql://u:pw@db/x") == "workbench ui --uri 'postgresql://u:***@db/x'"
    assert ui_command("http://host:5000") is None


def test_runs_view_line_links_the_experiment_of_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_id, experiment_id = _run(tmp_path / "store")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    line = runs_view_line(uri, run_id, "store")
    assert line == (
        f"MLflow UI: http://127.0.0.1:5000/#/experiments/{experiment_id}"
        "?workflowType=machine_learning (after `workbench ui --dir store`)"
    )
    assert runs_view_line(uri, None) is None
    assert runs_view_line(uri, "0" * 32) is None  # no such run: no line, no error


def test_describe_experiment_sets_the_description_once(tmp_path):
    run_id, experiment_id = _run(tmp_path / "mlruns")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert describe_experiment(uri, run_id, "  ") is None  # nothing to say: nothing set
    assert NOTE_TAG not in client.get_experiment(experiment_id).tags
    assert describe_experiment(uri, run_id, "Does target smoothing matter?\n") is None
    assert client.get_experiment(experiment_id).tags[NOTE_TAG] == "Does target smoothing matter?"
    client.set_experiment_tag(experiment_id, NOTE_TAG, "written in the UI")
    assert describe_experiment(uri, run_id, "another spec's text") is None
    assert client.get_experiment(experiment_id).tags[NOTE_TAG] == "written in the UI"
    assert describe_experiment(uri, "0" * 32, "x")  # why not, as text; never raises


# ----------------------------------------------------------------------------- workbench ui


def test_workbench_ui_prints_a_link_per_experiment_and_starts_a_lean_server(
    tmp_path, monkeypatch, capsys
):
    """MLflow 3.17's UI opens on its GenAI view whatever the experiment's kind tag says; the
    links ``workbench ui`` prints open each experiment on its runs."""
    from workbench.cli import main

    _, experiment_id = _run(tmp_path / "mlruns")
    started = []
    monkeypatch.setattr(os, "execve", lambda path, cmd, env: started.append((cmd, env)))
    assert main(["ui", "--dir", str(tmp_path / "mlruns"), "--port", "5123"]) == 0
    err = capsys.readouterr().err
    link = f"http://127.0.0.1:5123/#/experiments/{experiment_id}?workflowType=machine_learning"
    assert f"pend  {link}" in err
    ((cmd, env),) = started
    assert cmd[1] == "ui" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--registry-store-uri") + 1] == cmd[cmd.index("--backend-store-uri") + 1]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536"])
def test_workbench_ui_refuses_a_port_out_of_range(tmp_path, monkeypatch, capsys, port):
    from workbench.cli import main

    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("started a server"))
    assert main(["ui", "--dir", str(tmp_path / "mlruns"), "--port", port]) == 2
    err = capsys.readouterr().err
    assert err == f"workbench: --port={port}: must be in 1..65535\n"
    assert not (tmp_path / "mlruns").exists()


def test_workbench_ui_serves_in_seconds_without_warnings(tmp_path):
    """The real server: up and answering the API, and nothing on its output that looks like a
    problem (MLflow's deprecation warnings, its registry notice, job-runner chatter)."""
    _run(tmp_path / "mlruns", name="served-run")
    port = _free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench.cli", "ui", "--dir", "mlruns", "--port", str(port)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10"
        body = ""
        while time.monotonic() - start < 90 and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = response.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        took = time.monotonic() - start
        assert '"name": "pend"' in body or '"name":"pend"' in body, log.read_text()
    finally:
        os.killpg(proc.pid, 2)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    text = log.read_text()
    for noise in ("Warning", "WARNING", "Registry store URI", "huey", "executor"):
        assert noise not in text, text
    assert took < 60, f"{took:.1f} s to serve:\n{text}"  # ~29 s before, with 4 workers


# ----------------------------------------------------------------------------- in a browser


@pytest.mark.slow  # a browser and a server: ~20 s; `python scripts/check_ui.py` runs it too
@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
    reason="needs Chromium (apt-get install chromium)",
)
def test_printed_link_opens_the_runs_table_in_a_fresh_chromium(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_ui.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "runs.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- ablation report


def test_ablation_html_report_carries_its_figures_and_escapes_names(tmp_path):
    """MLflow's artifact viewer shows markdown as text; the HTML report shows its figures
    (embedded, so the single file is the whole report) and the spec's words as words."""
    import base64

    from workbench import ablation

    spec = ablation.AblationSpec(
        name="a<b", base=[], baseline="ddpg", variants={"ddpg": [], "td3": []}, seeds=[0, 1]
    )
    spec.description = "does <twin> & delay matter?"
    result = ablation.AblationResult(
        spec, None, 4, 0, [], {"ddpg": [-3.0, -2.0], "td3": [-1.0, 0.0]}, {}
    )
    rows = ablation._rows(result)
    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    text = ablation._html(result, rows, {"IQM per variant": png, "Learning curves": png})
    assert (
        text.count(f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"')
        == 2
    )
    assert "<h1>Ablation: a&lt;b</h1>" in text
    assert "does &lt;twin&gt; &amp; delay matter?" in text
    assert "<td>td3</td><td>2</td>" in text and "<td>baseline</td>" in text


def test_runs_view_line_gives_up_quickly_on_a_dead_server():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    assert runs_view_line(f"http://127.0.0.1:{port}", "0" * 32) is None
    assert time.monotonic() - start < 10
