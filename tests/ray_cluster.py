"""A two-node Ray cluster, an MLflow server with its artifact proxy and a PostgreSQL server,
all on 127.0.0.1, and the workbench commands run against them as a user would; what came of
it is written as JSON for ``tests/test_ray.py`` to check.

Run inside a private network namespace, where 127.0.0.1 is the only address (Ray binds to the
machine's outward address even when told 127.0.0.1):

    unshare -n bash -c 'ip link set lo up; python tests/ray_cluster.py WORKDIR'

Each node has 1 CPU and a custom resource (node_a, node_b), so two one-CPU tasks land one
on each. Scenarios, in order: an ablation with the embedded sqlite store (refused: the
cluster has two nodes), a 4-trial study with 2 workers (PostgreSQL storage), a Hydra multirun
of 2 jobs through ``hydra/launcher=ray``, an ablation stopped by Ctrl-C (SIGINT to the
driver) while a cell trains on each node, and a 2 x 2 ablation during which node_b is
removed while it trains a cell. ``--measure`` adds what the shared stores cost per request.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

MLFLOW = "http://127.0.0.1:5000"
TINY = [
    "env=pendulum",
    "agent.actor_hidden=[8]",
    "agent.critic_hidden=[8]",
    "agent.batch_size=32",
    "agent.learning_starts=100",
    "eval.every=200",
    "eval.episodes=1",
    "eval.video=false",
    "tracking.log_every=100",
    "tracking.save_policy=false",
]
RAY_NODE_TAG = "workbench.ray.node"
STORE_BYTES = 100 * 1024**2  # each node's object store: the tasks pass only small arguments


def say(*parts: Any) -> None:
    print(f"[ray_cluster {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def start_mlflow(work: Path) -> subprocess.Popen:
    log = (work / "mlflow.log").open("w")
    return subprocess.Popen(
        [
            *[sys.executable, "-m", "mlflow", "server"],
            *["--backend-store-uri", f"sqlite:///{work / 'server.db'}"],
            *["--serve-artifacts", "--artifacts-destination", str(work / "artifacts")],
            *["--host", "127.0.0.1", "--port", "5000", "--workers", "1"],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_http(url: str, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def pg_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(found).parent)
    return next((c for c in candidates if (c / "initdb").is_file()), None)


class Postgres:
    """A throwaway PostgreSQL on 127.0.0.1:5432 (as the postgres user when run as root)."""

    def __init__(self, work: Path):
        # not below WORKDIR: pytest's temp folders are closed to the postgres user
        self.bin, self.data = pg_bin(), Path(tempfile.mkdtemp(prefix="workbench-ray-pg-"))
        self.run_as = []
        if os.geteuid() == 0:
            self.run_as = ["runuser", "-u", "postgres", "--"]

    def start(self) -> str | None:
        if self.bin is None:
            return None
        if self.run_as:
            user = pwd.getpwnam("postgres")
            os.chown(self.data, user.pw_uid, user.pw_gid)
        db = str(self.data / "db")
        initdb = [str(self.bin / "initdb"), "-D", db, "-A", "trust", "-U", "postgres", "--no-sync"]
        subprocess.run([*self.run_as, *initdb], check=True, capture_output=True)
        opts = f"-p 5432 -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = [str(self.bin / "pg_ctl"), "-D", db, "-l", str(self.data / "log"), "-o", opts]
        subprocess.run([*self.run_as, *start, "-w", "start"], check=True, capture_output=True)
        return "postgresql://postgres@127.0.0.1:5432/postgres"

    def stop(self) -> None:
        if self.bin is not None and (self.data / "db").exists():
            stop = [str(self.bin / "pg_ctl"), "-D", str(self.data / "db"), "-m", "immediate"]
            subprocess.run([*self.run_as, *stop, "stop"], capture_output=True)
        shutil.rmtree(self.data, ignore_errors=True)


def listening() -> list[int]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    return sorted({int(line.split()[3].rpartition(":")[2]) for line in out.splitlines() if line})


def workbench(args: list[str], work: Path, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", *args],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def finish(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    return {"rc": proc.returncode, "stdout": out, "stderr": err[-6000:]}


def runs_of(experiment: str) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(MLFLOW)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "tags": dict(r.data.tags),
            "metrics": dict(r.data.metrics),
        }
        for r in client.search_runs([exp.experiment_id], max_results=1000)
    ]


def ablation_spec(
    work: Path, name: str, steps: int = 400, seeds: Any = (0, 1), more: Any = ()
) -> Path:
    path = work / f"{name}.yaml"
    body = {
        "name": name,
        "base": [*TINY, *more],
        "steps": steps,
        "seeds": list(seeds),
        "baseline": "ddpg",
        "variants": {"ddpg": ["agent=ddpg"], "twin": ["agent=ddpg", "agent.n_critics=2"]},
    }
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def study_spec(work: Path, name: str = "raystudy", steps: int = 300, **more: Any) -> Path:
    path = work / f"{name}.yaml"
    body = {
        "name": name,
        "base": {"preset": "pendulum_ddpg", "overrides": [*TINY[1:5], *TINY[6:]]},
        "steps": steps,
        "eval_every": 100,
        "objective": {"score": "last_k", "k": 2, "seeds": 1},
        "space": {"agent.tau": {"type": "float", "low": 0.001, "high": 0.05, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": "none",
        "n_trials": 4,
        "enqueue_base": False,
        **more,
    }
    path.write_text(json.dumps(body))
    return path


def measure_stores(storage: str | None) -> dict[str, Any]:
    """What the shared stores serialise, per request (``--measure``; not a test): an MLflow
    ``log_batch`` of 10 metrics through the server, and one Optuna trial's storage traffic
    (ask, one suggest, 10 reports, tell) on PostgreSQL."""
    import statistics

    import optuna
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    out: dict[str, Any] = {}
    client = MlflowClient(MLFLOW)
    exp = client.create_experiment("measure")
    run = client.create_run(exp).info.run_id
    times = []
    for step in range(100):
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        client.log_batch(run, metrics=[Metric(f"m/{k}", 1.0, now, step) for k in range(10)])
        times.append(time.perf_counter() - t0)
    out["mlflow_log_batch_ms"] = round(1000 * statistics.median(times), 1)
    if storage is not None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from workbench.tuning.study import make_storage

        shared = make_storage(storage, heartbeat_interval=10, grace_period=60)
        study = optuna.create_study(study_name="measure", storage=shared)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            trial = study.ask()
            x = trial.suggest_float("x", 0, 1)
            for step in range(10):
                trial.report(x, step)
            study.tell(trial, x)
            times.append(time.perf_counter() - t0)
        out["optuna_trial_ms_postgres"] = round(1000 * statistics.median(times), 1)
    return out


SCENARIOS = ("refused", "study", "sweep", "stopped", "lossy", "study_lossy")


def main(work: Path, only: tuple[str, ...] = SCENARIOS, measure: bool = False) -> None:
    from ray.cluster_utils import Cluster

    result: dict[str, Any] = {"outside_check": "pending"}
    t_start = time.monotonic()
    mlflow = start_mlflow(work)
    pg = Postgres(work)
    cluster = None
    try:
        storage = pg.start() if "study" in ",".join(only) or measure else None
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "resources": {"node_a": 1},
                "include_dashboard": False,
                "node_ip_address": "127.0.0.1",
                "object_store_memory": STORE_BYTES,
            },
        )
        # 127.0.0.2 (loopback too): a driver on 127.0.0.1 attaches to the head's raylet, so
        # removing node_b cannot take the driver with it
        node_b = cluster.add_node(
            num_cpus=1,
            resources={"node_b": 1},
            object_store_memory=STORE_BYTES,
            node_ip_address="127.0.0.2",
        )
        address = cluster.address
        result["address"] = address
        result["nodes"] = {"head": cluster.head_node.node_id, "node_b": node_b.node_id}
        wait_http(f"{MLFLOW}/health", 90)
        result["up_s"] = round(time.monotonic() - t_start, 1)
        result["listening_inside"] = listening()
        (work / "ready").write_text(json.dumps(result["listening_inside"]))
        say("up in", result["up_s"], "s at", address)

        if measure:
            result["stores"] = measure_stores(storage)
            say("stores:", result["stores"])

        # 1. an embedded store with two nodes is refused, in one line
        if "refused" in only:
            spec = ablation_spec(work, "refused")
            t0 = time.monotonic()
            r = finish(workbench(["ablate", str(spec), "--ray", address], work), 120)
            result["refused"] = {**r, "wall_s": round(time.monotonic() - t0, 1)}

        # 2. a 4-trial study, 2 workers, one on each node
        if "study" not in only:
            pass
        elif storage is None:
            result["study"] = {"skipped": "PostgreSQL binaries not found"}
        else:
            t0 = time.monotonic()
            args = ["tune", str(study_spec(work)), "--ray", address, "--workers", "2"]
            args += ["--storage", storage, "--tracking-uri", MLFLOW]
            r = finish(workbench(args, work), 300)
            import optuna

            from workbench.tuning.study import make_storage

            shared = make_storage(storage, heartbeat_interval=10, grace_period=60)
            study = optuna.load_study(study_name="raystudy", storage=shared)
            result["study"] = {
                **r,
                "wall_s": round(time.monotonic() - t0, 1),
                "states": [t.state.name for t in study.trials],
                "runs": runs_of("study-raystudy"),
            }
            say("study done in", result["study"]["wall_s"], "s")

        # 3. a Hydra multirun through hydra/launcher=ray: one task per job
        if "sweep" in only:
            t0 = time.monotonic()
            args = ["train", "-m", "seed=0,1", "hydra/launcher=ray"]
            args += [f"hydra.launcher.address='{address}'", f"tracking.uri={MLFLOW}"]
            args += ["tracking.experiment=raysweep", "total_steps=300", *TINY]
            r = finish(workbench(args, work), 300)
            result["sweep"] = {**r, "wall_s": round(time.monotonic() - t0, 1)}
            result["sweep"]["runs"] = runs_of("raysweep")
            say("sweep done in", result["sweep"]["wall_s"], "s")

        # 4. Ctrl-C on the driver while a long cell trains on each node
        if "stopped" in only:
            # cells far too long to end by themselves, however slow the machine
            spec = ablation_spec(work, "stopped", steps=1_000_000, seeds=[0])
            t0 = time.monotonic()
            args = ["ablate", str(spec), "--ray", address, "--tracking-uri", MLFLOW]
            proc = workbench(args, work)
            while proc.poll() is None and time.monotonic() - t0 < 240:
                runs = runs_of("ablation-stopped")
                if sum(r["status"] == "RUNNING" for r in runs) >= 3:  # the parent, 2 cells
                    break
                time.sleep(0.3)
            time.sleep(1.5)  # both cells training
            t_int = time.monotonic()
            proc.send_signal(signal.SIGINT)
            r = finish(proc, 120)
            result["stopped"] = {
                **r,
                "stop_s": round(time.monotonic() - t_int, 1),
                "runs": runs_of("ablation-stopped"),
            }
            say("interrupted ablation stopped in", result["stopped"]["stop_s"], "s")

        # 5. a 2 x 2 ablation; node_b is removed while it trains a cell, once that cell has
        # a checkpoint in the folder both nodes share (the driver's mlruns/checkpoints)
        if "lossy" in only:
            spec = ablation_spec(work, "lossy", steps=4000, more=["checkpoint.every=600"])
            t0 = time.monotonic()
            proc = workbench(
                ["ablate", str(spec), "--ray", address, "--tracking-uri", MLFLOW], work
            )
            lost = None
            while proc.poll() is None and lost is None and time.monotonic() - t0 < 180:
                for run in runs_of("ablation-lossy"):
                    on_b = run["tags"].get(RAY_NODE_TAG) == node_b.node_id
                    saved = work / "mlruns" / "checkpoints" / run["run_id"]
                    if on_b and run["status"] == "RUNNING" and any(saved.glob("step-*.pt")):
                        lost = run["run_id"]
                time.sleep(0.2)
            if lost is not None:  # mid-work: its run is open, its cell training
                cluster.remove_node(node_b, allow_graceful=False)
                say("removed node_b while it trained run", lost)
            r = finish(proc, 300)
            result["lossy"] = {
                **r,
                "wall_s": round(time.monotonic() - t0, 1),
                "lost_run": lost,
                "runs": runs_of("ablation-lossy"),
            }
            say("lossy ablation done in", result["lossy"]["wall_s"], "s")

        # 6. a study; node_b is removed while it trains a trial (short heartbeats)
        if "study_lossy" in only and storage is not None:
            if node_b not in cluster.worker_nodes:  # the ablation above removed it
                node_b = cluster.add_node(
                    num_cpus=1,
                    resources={"node_b": 1},
                    object_store_memory=STORE_BYTES,
                    node_ip_address="127.0.0.2",
                )
                result["node_b_again"] = node_b.node_id
            import optuna

            from workbench.tuning.study import make_storage

            name = "lossystudy"
            spec = study_spec(work, name, steps=4000, heartbeat={"interval": 1, "grace_period": 4})
            t0 = time.monotonic()
            args = ["tune", str(spec), "--ray", address, "--workers", "2"]
            proc = workbench([*args, "--storage", storage, "--tracking-uri", MLFLOW], work)
            lost = None
            while proc.poll() is None and lost is None and time.monotonic() - t0 < 180:
                for run in runs_of(f"study-{name}"):
                    on_b = run["tags"].get(RAY_NODE_TAG) == node_b.node_id
                    if on_b and run["status"] == "RUNNING":
                        lost = run["run_id"]
                time.sleep(0.2)
            if lost is not None:
                cluster.remove_node(node_b, allow_graceful=False)
                say("removed node_b while it trained trial run", lost)
            r = finish(proc, 300)
            shared = make_storage(storage, heartbeat_interval=1, grace_period=4)
            study = optuna.load_study(study_name=name, storage=shared)
            result["study_lossy"] = {
                **r,
                "wall_s": round(time.monotonic() - t0, 1),
                "lost_run": lost,
                "states": [t.state.name for t in study.trials],
                "attrs": [dict(t.user_attrs) for t in study.trials],
                "runs": runs_of(f"study-{name}"),
            }
            say("lossy study done in", result["study_lossy"]["wall_s"], "s")
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        if cluster is not None:
            cluster.shutdown()
        os.killpg(mlflow.pid, signal.SIGTERM)
        pg.stop()
        try:
            mlflow.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(mlflow.pid, signal.SIGKILL)
        result["total_s"] = round(time.monotonic() - t_start, 1)
        (work / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    args = sys.argv[2:]
    picked = next((a.removeprefix("--only=") for a in args if a.startswith("--only=")), None)
    main(
        Path(sys.argv[1]).resolve(),
        tuple(picked.split(",")) if picked else SCENARIOS,
        measure="--measure" in args,
    )
