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
    from workbench.tracking import embedded_uri, redact

    store = Path(args.dir).resolve()
    uri = args.uri or embedded_uri(store)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if args.uri is None:
        cmd += ["--default-artifact-root", (store / "artifacts").as_uri()]
    print(
        f"MLflow UI for {redact(uri)} on http://{args.host}:{args.port} "
        "(training runs: 'Model training' toggle, top left, once per browser; Ctrl-C to stop)",
        file=sys.stderr,
    )
    os.execv(mlflow, cmd)
    return 0  # not reached
