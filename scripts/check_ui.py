"""Check what a researcher sees in the MLflow UI, in headless Chromium from a fresh profile.

    python scripts/check_ui.py [--out DIR]

Makes a throw-away store with a training run and an ablation parent run (its report rendered
by ``workbench.ablation``), starts ``workbench ui`` on a free port on 127.0.0.1, opens the
link it prints for the experiment and the ablation's ``report.html`` in the artifact viewer,
each in a new Chromium profile, and checks the pages: the Runs table with the run's name, and
the report with its figures. Screenshots and DOM dumps go to DIR. Exit 0 when all holds.
Needs Chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RUN_NAME = "ui-check-run"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def make_store(store: Path, out: Path) -> tuple[str, str]:
    """A training run and an ablation parent run with a report; (experiment id, parent id)."""
    import numpy as np

    from workbench import ablation
    from workbench.config import TrackingConfig
    from workbench.tracking import ParentRun, make_tracker

    tracking = TrackingConfig(dir=str(store), experiment="ui-check")
    tracker = make_tracker(tracking, run_name=RUN_NAME)
    tracker.start(params={"agent.tau": 0.005}, tags={})
    tracker.log_metrics({"eval/return_mean": -150.0}, step=1000)
    tracker.end("FINISHED")
    assert tracker.experiment_id is not None

    spec = ablation.AblationSpec(
        name="check", base=[], baseline="ddpg", variants={"ddpg": [], "td3": []}, seeds=[0, 1, 2]
    )
    parent = ParentRun.open(tracking, run_name="ablation-check", existing=None, params={}, tags={})
    steps = [1000, 2000]
    band = (steps, np.array([-900.0, -300.0]), np.array([-1000.0, -400.0]), np.array([-800, -200]))
    result = ablation.AblationResult(
        spec=spec,
        parent_run_id=parent.run_id,
        ran=6,
        skipped=0,
        failed=[],
        scores={"ddpg": [-300.0, -250.0, -280.0], "td3": [-160.0, -150.0, -170.0]},
        curves={"ddpg": band, "td3": band},
    )
    ablation._report(result, parent, out / "report")
    parent.end("FINISHED")
    return tracker.experiment_id, parent.run_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: Path, port: int, log: Path) -> tuple[subprocess.Popen, float, str]:
    """``workbench ui``; returns it, the seconds to its first page, and its printed output."""
    start = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench.cli", "ui", "--dir", str(store), "--port", str(port)],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    while time.monotonic() - start < 120:
        if proc.poll() is not None:
            raise SystemExit(f"workbench ui exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                return proc, time.monotonic() - start, log.read_text()
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"workbench ui did not answer within 120 s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def browse(browser: str, url: str, shot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot, each from a new profile."""
    common = ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"]
    common += ["--virtual-time-budget=20000", "--hide-scrollbars"]
    dom = ""
    for extra in ([f"--screenshot={shot}"], ["--dump-dom"]):
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run(
                [browser, *common, f"--user-data-dir={profile}", *extra, url],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        if "--dump-dom" in extra:
            dom = proc.stdout
    shot.with_suffix(".html").write_text(dom)
    return dom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ui-check"), help="screenshots, DOMs")
    args = parser.parse_args()
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        print("check_ui: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "mlruns"
    shutil.rmtree(store, ignore_errors=True)
    experiment_id, parent_id = make_store(store, args.out)
    port = free_port()
    proc, took, printed = start_ui(store, port, args.out / "ui.log")
    problems = []
    try:
        links = re.findall(r"ui-check\s+(http://\S+)", printed)
        if len(links) != 1:
            return print(f"check_ui: no link for the experiment in:\n{printed}") or 1
        (link,) = links
        print(f"workbench ui answered after {took:.1f} s; link: {link}")
        dom = browse(browser, link, args.out / "runs.png")
        if RUN_NAME not in dom or "Run Name" not in dom:
            problems.append(f"{link}: no Runs table with {RUN_NAME!r} (see runs.png)")
        report = (
            f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{parent_id}"
            "/artifacts/report/report.html?workflowType=machine_learning"
        )
        # the viewer shows HTML in an iframe of its own (not in the DOM dump): the screenshot
        # shows the page, the file says it carries its figures
        html = (args.out / "report" / "report.html").read_text()
        if html.count('src="data:image/png;base64,') != 2:
            problems.append("report.html: not two embedded figures")
        dom = browse(browser, report, args.out / "report.png")
        if "mlflow-html-iframe" not in dom or "report/report.html" not in dom:
            problems.append(f"{report}: the artifact viewer shows no HTML (see report.png)")
    finally:
        stop(proc)
    log = (args.out / "ui.log").read_text().splitlines()
    noise = [ln for ln in log if "Warning" in ln or "WARNING" in ln]
    problems += [f"workbench ui printed: {ln}" for ln in noise]
    for p in problems:
        print(f"check_ui: {p}", file=sys.stderr)
    print("check_ui: " + ("FAILED" if problems else f"all good; screenshots in {args.out}"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
