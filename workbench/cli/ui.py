"""``workbench ui``: the MLflow UI on the embedded store (or another tracking store)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="MLflow UI on the embedded store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--dir", default="mlruns", help="embedded store folder")
    p.add_argument("--uri", default=None, help="another tracking store instead")
    p.set_defaults(handler=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    from workbench.tracking import driver_url, embedded_uri, list_experiments, probe_store, redact

    store = Path(args.dir).resolve()
    uri = driver_url(args.uri) if args.uri else embedded_uri(store)
    probe_store(uri, "Default")  # a dead store: one line now, not the server's retries
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if args.uri is None:
        cmd += ["--default-artifact-root", (store / "artifacts").as_uri()]
    url = f"http://{args.host}:{args.port}"
    print(
        f"MLflow UI for {redact(uri)} on {url} (Ctrl-C to stop). MLflow opens on its GenAI "
        "view: training runs are under the 'Model training' toggle, top left (the browser "
        "remembers it); these links open each experiment on its runs:",
        file=sys.stderr,
    )
    # MLflow's own empty "Default" experiment is not one of ours
    experiments = [e for e in list_experiments(uri) if e != ("Default", "0")]
    width = max((len(name) for name, _ in experiments), default=0)
    for name, experiment_id in experiments:
        link = f"{url}/#/experiments/{experiment_id}?workflowType=machine_learning"
        print(f"  {name:<{width}}  {link}", file=sys.stderr)
    if not experiments:
        print("  (no experiments yet: run `workbench train` first)", file=sys.stderr)
    os.execv(mlflow, cmd)
    return 0  # not reached
