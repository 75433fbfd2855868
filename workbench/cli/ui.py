"""``workbench ui``: the MLflow UI on the embedded store (or another tracking store)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

PORTS = range(1, 65536)

# MLflow's server, made to start in seconds on a small machine and say only what matters:
# - one worker: a UI for one researcher needs no more, and each worker imports all of MLflow
#   (4 by default: ~29 s before the first page on 2 cores, 5-6 s with one);
# - no job execution: it runs GenAI evaluations and trace rollups in 8 extra processes;
# - no access log: a page load is dozens of requests that would push the links out of sight;
# - the registry in the same store: said explicitly, so MLflow does not print that it chose it;
# - MLflow 3.17 imports starlette.middleware.wsgi, which warns that it is deprecated, once per
#   process: MLflow's own concern, nothing a user can act on.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
STARLETTE_WARNING = "ignore:starlette.middleware.wsgi is deprecated"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="MLflow UI on the embedded store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="1-65535 (default: 5000)")
    p.add_argument("--dir", default="mlruns", help="embedded store folder")
    p.add_argument("--uri", default=None, help="another tracking store instead")
    p.set_defaults(handler=cmd_ui)


def server_command(
    mlflow: str, uri: str, host: str, port: int, artifact_root: str | None
) -> list[str]:
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--registry-store-uri", uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    cmd += ["--uvicorn-opts=--no-access-log"]
    if artifact_root is not None:
        cmd += ["--default-artifact-root", artifact_root]
    return cmd


def server_env(environ: dict[str, str]) -> dict[str, str]:
    """The server's environment: ``environ`` and ``SERVER_ENV``, the user's warning filters kept."""
    warnings = [environ.get("PYTHONWARNINGS", ""), STARLETTE_WARNING]
    return {**environ, **SERVER_ENV, "PYTHONWARNINGS": ",".join(filter(None, warnings))}


def cmd_ui(args: argparse.Namespace) -> int:
    from workbench.tracking import (
        driver_url,
        embedded_uri,
        list_experiments,
        probe_store,
        redact,
        runs_view_url,
        ui_base_url,
    )

    if args.port not in PORTS:
        raise ValueError(f"--port={args.port}: must be in 1..65535")
    store = Path(args.dir).resolve()
    uri = driver_url(args.uri) if args.uri else embedded_uri(store)
    probe_store(uri, "Default")  # a dead store: one line now, not the server's retries
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    artifact_root = (store / "artifacts").as_uri() if args.uri is None else None
    cmd = server_command(mlflow, uri, args.host, args.port, artifact_root)
    url = ui_base_url(args.host, args.port)
    print(
        f"MLflow UI for {redact(uri)} on {url} (Ctrl-C to stop). "
        "The bare address opens MLflow's GenAI view; these links open each experiment on "
        "its runs:",
        file=sys.stderr,
    )
    # MLflow's own empty "Default" experiment is not one of ours
    experiments = [e for e in list_experiments(uri) if e != ("Default", "0")]
    width = max((len(name) for name, _ in experiments), default=0)
    for name, experiment_id in experiments:
        print(f"  {name:<{width}}  {runs_view_url(url, experiment_id)}", file=sys.stderr)
    if not experiments:
        print("  (no experiments yet: run `workbench train` first)", file=sys.stderr)
    os.execve(mlflow, cmd, server_env(dict(os.environ)))
    return 0  # not reached
