"""What running on Ray costs against local worker processes, on this machine (prints JSON).

    unshare -n bash -c 'ip link set lo up; python scripts/ray_overhead.py [--steps 400]'

(In a private network namespace: a local Ray binds to the machine's outward address.)

- start latency: from submitting a unit to its first line running, for a trivial function,
  through ``parallel.run_processes`` (a spawned process) and through ``RayCluster.run`` (a
  Ray task in a fresh worker process, ``max_calls=1``) on a local Ray already up;
- the local Ray's own start (``ray.init``);
- the wall time of the same small ablation (2 variants x 2 seeds, tiny nets), with
  ``--workers 2`` and with ``--ray`` (a local Ray of 2 CPUs started by the command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = [
    "env=pendulum",
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "agent.learning_starts=100",
    "eval.every=200",
    "eval.episodes=1",
    "eval.video=false",
    "tracking.log_every=100",
    "tracking.save_policy=false",
]


def stamp(path: str, t_submit: float) -> None:
    Path(path).write_text(str(time.time() - t_submit))


def latencies(run, n: int, reps: int, tmp: Path) -> list[float]:
    out = []
    for rep in range(reps):
        paths = [str(tmp / f"{rep}-{i}") for i in range(n)]
        t = time.time()
        run([(p, t) for p in paths])
        out += [float(Path(p).read_text()) for p in paths]
    return out


def ablation_wall(extra: list[str], steps: int, tmp: Path, name: str) -> dict:
    spec = tmp / f"{name}.yaml"
    spec.write_text(
        json.dumps(
            {
                "name": name,
                "base": TINY,
                "steps": steps,
                "seeds": [0, 1],
                "baseline": "a",
                "variants": {"a": ["agent=ddpg"], "b": ["agent=ddpg", "agent.n_critics=2"]},
                "tracking": {"dir": str(tmp / name / "mlruns")},
            }
        )
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "ablate", str(spec), *extra],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    return {"rc": done.returncode, "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ray_overhead import stamp as stamp_fn  # importable by name in the workers

    from workbench import cluster, parallel

    out: dict = {"cpus": os.cpu_count(), "steps": args.steps}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        local = latencies(lambda a: parallel.run_processes(stamp_fn, a), 2, args.reps, tmp)
        t0 = time.perf_counter()
        ray_cluster = cluster.RayCluster("").connect()
        out["ray_init_s"] = round(time.perf_counter() - t0, 2)
        ray = latencies(lambda a: ray_cluster.run(stamp_fn, a), 2, args.reps, tmp)
        ray_cluster.shutdown()
        out["start_latency_s"] = {
            "local_process": {"median": round(statistics.median(local), 3), "all": local},
            "ray_task": {"median": round(statistics.median(ray), 3), "all": ray},
        }
        out["ablation_2x2"] = {
            "local --workers 2": ablation_wall(["--workers", "2"], args.steps, tmp, "loc"),
            "--ray (local Ray)": ablation_wall(["--ray"], args.steps, tmp, "ray"),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
