"""``--ray`` on a real two-node Ray cluster on this machine, no mocks.

``tests/ray_cluster.py`` starts the cluster (a head and a second node, 1 CPU each), an MLflow
server with its artifact proxy and a PostgreSQL server, and runs the workbench commands
against them, all inside a private network namespace made here (``unshare -n``), where only
127.0.0.1 exists: Ray binds to the machine's outward address otherwise. One run of it serves
every test of the module. Skipped where Ray is not installed (``pip install -e '.[ray]'``) or
no network namespace can be made (not root).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is an optional extra: pip install -e '.[ray]'",
)

ROOT = Path(__file__).resolve().parents[1]
NODE_TAG, TASK_TAG = "workbench.ray.node", "workbench.ray.task"
CLUSTER_SCENARIOS = ("refused", "study", "sweep", "stopped", "lossy", "study_lossy")


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return done.returncode == 0


def _listening() -> set[int]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines() if line}


def test_without_ray_flag_ray_is_never_imported():
    code = (
        "import sys, workbench.cli, workbench.ablation, workbench.parallel, "
        "workbench.tuning.launch, workbench.cli.learning_check, "
        "hydra_plugins.workbench_ray_launcher.ray_launcher, "
        "hydra_plugins.workbench_ray_launcher.config; "
        "from workbench.cli import build_parser; build_parser(); "
        "sys.exit('ray' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_a_unit_asks_for_its_threads_env_workers_and_gpu():
    from workbench.config import compose
    from workbench.parallel import Resources, resources_of

    assert resources_of(compose([])) == Resources(cpus=1.0, gpus=0.0)
    cfg = compose(["torch_threads=2", "env.n_envs=3", "env.vectorization=async"])
    assert resources_of(cfg) == Resources(cpus=5.0, gpus=0.0)
    assert resources_of(compose(["device=auto"]), gpus_present=True).gpus == 1.0
    assert resources_of(compose(["device=cpu"]), gpus_present=True).gpus == 0.0
    # --ray-gpus 0.25: four CUDA units share a GPU; a CPU unit asks for none
    assert resources_of(compose(["device=auto"]), gpus_present=True, gpu_share=0.25).gpus == 0.25
    assert resources_of(compose(["device=cpu"]), gpus_present=True, gpu_share=0.25).gpus == 0.0


@pytest.mark.parametrize(
    "args, said",
    [
        (["ablate", "SPEC", "--ray-gpus", "0.5"], "ablate: --ray-gpus 0.5: only with --ray"),
        (["learning-check", "--ray-gpus", "0.5"], "learning-check: --ray-gpus 0.5: only with"),
        (["tune", "STUDY", "--ray-gpus", "1"], "tune: --ray-gpus 1: only with --ray"),
        (
            ["ablate", "SPEC", "--ray", "127.0.0.1:1", "--ray-gpus", "0"],
            "ablate: argument --ray-gpus: '0': must be a part of one GPU, in (0, 1]",
        ),
        (
            ["ablate", "SPEC", "--ray", "--ray-gpus", "2"],
            "ablate: argument --ray-gpus: '2': must",
        ),
        (
            ["tune", "STUDY", "--ray", "--ray-gpus", "x"],
            "tune: argument --ray-gpus: 'x': must",
        ),
        (
            ["train", "-m", "seed=0,1", "hydra/launcher=ray", "hydra.launcher.gpus=1.5"],
            "hydra.launcher.gpus=1.5: must be a part of one GPU, in (0, 1]",
        ),
    ],
)
def test_a_gpu_share_outside_0_to_1_or_without_ray_is_refused_before_ray_starts(
    args, said, tmp_path, monkeypatch, capsys
):
    from workbench.cli import main

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: x\nbaseline: a\nseeds: 1\nvariants: {a: [], b: [agent.tau=0.01]}\n"
        f"tracking: {{dir: {tmp_path / 'mlruns'}}}\n"
    )
    study = ROOT / "studies" / "pendulum_ddpg.yaml"
    args = [str(spec) if a == "SPEC" else str(study) if a == "STUDY" else a for a in args]
    if args[0] == "train":  # a launcher option: Hydra's config, our error
        assert main(args) == 2
    else:  # an argument: argparse's exit
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"workbench: {said}"), last
    assert not (tmp_path / "mlruns").exists()


def test_embedded_stores_are_told_from_shared_ones():
    from workbench.cluster import embedded

    assert embedded("sqlite:////x/mlruns/mlflow.db") and embedded("/x/mlruns")
    assert embedded("file:///x/mlruns")
    assert not embedded("http://head:5000") and not embedded("postgresql://u@db/optuna")
    assert not embedded(None)


def _run_cluster(tmp_path_factory, only: str) -> dict:
    """``tests/ray_cluster.py`` with the scenarios ``only`` names, in a network namespace of
    its own; its result, with what it was seen listening on outside the namespace."""
    if not _unshare_works():
        pytest.skip("cannot make a private network namespace here (unshare -n needs root)")
    work = tmp_path_factory.mktemp("ray")
    before = _listening()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    script = Path(__file__).with_name("ray_cluster.py")
    command = f"ip link set lo up && exec {sys.executable} {script} {work} --only={only}"
    with (work / "script.log").open("w") as log:
        proc = subprocess.Popen(
            ["unshare", "-n", "bash", "-c", command],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        during: set[int] | None = None
        t0 = time.monotonic()
        while proc.poll() is None:
            if during is None and (work / "ready").exists():
                during = _listening()
            if time.monotonic() - t0 > 600:
                proc.kill()
            time.sleep(0.2)
    result_file = work / "result.json"
    if not result_file.exists():
        pytest.fail(
            f"the cluster script wrote no result: {(work / 'script.log').read_text()[-3000:]}"
        )
    result = json.loads(result_file.read_text())
    if "error" in result:
        pytest.fail(f"the cluster script failed: {result['error']}")
    inside = set(result["listening_inside"])
    result["outside_new"] = sorted(((during or set()) - before) & inside)
    result["outside_sampled"] = during is not None
    return result


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """Every scenario on one cluster (~90 s on an idle 2-core machine). The tests on it are
    collected first (``conftest.py``), so that it runs while the rest of the suite does."""
    return _run_cluster(tmp_path_factory, ",".join(CLUSTER_SCENARIOS))


@needs_ray
def test_nothing_the_cluster_starts_listens_outside_its_namespace(cluster_run):
    assert cluster_run["outside_sampled"]
    assert 5000 in cluster_run["listening_inside"]  # the MLflow server, for one
    assert cluster_run["outside_new"] == []


@needs_ray
def test_an_embedded_store_on_a_cluster_of_two_nodes_is_refused_in_one_line(cluster_run):
    refused = cluster_run["refused"]
    assert refused["rc"] == 2
    last = refused["stderr"].strip().splitlines()[-1]
    assert last.startswith("workbench: the MLflow store sqlite:")
    assert "mlflow server --serve-artifacts" in last and "--tracking-uri" in last


@needs_ray
def test_a_study_runs_its_worker_tasks_on_both_nodes_to_n_trials(cluster_run):
    study = cluster_run["study"]
    if "skipped" in study:
        pytest.skip(study["skipped"])
    assert study["rc"] == 0, study["stderr"]
    summary = json.loads(study["stdout"].strip().splitlines()[-1])
    assert summary["n_trials"] == 4 and summary["worker_exit_codes"] == [0, 0]
    assert Counter(study["states"])["COMPLETE"] == 4
    trials = [r for r in study["runs"] if r["tags"].get(TASK_TAG)]
    assert len(trials) == 4 and all(r["status"] == "FINISHED" for r in trials)
    assert {r["tags"][NODE_TAG] for r in trials} == set(cluster_run["nodes"].values())
    assert "trials done" in study["stderr"]  # the driver's progress lines


@needs_ray
def test_a_hydra_multirun_through_the_ray_launcher_runs_a_task_per_job(cluster_run):
    sweep = cluster_run["sweep"]
    assert sweep["rc"] == 0, sweep["stderr"]
    runs = sweep["runs"]
    assert sorted(r["tags"]["workbench.seed"] for r in runs) == ["0", "1"]
    assert all(r["status"] == "FINISHED" and r["tags"].get(TASK_TAG) for r in runs)
    assert {r["tags"][NODE_TAG] for r in runs} == set(cluster_run["nodes"].values())


@needs_ray
def test_ctrl_c_on_the_driver_cancels_the_tasks_and_their_runs_end_killed(cluster_run):
    stopped = cluster_run["stopped"]
    assert stopped["rc"] == 130, stopped["stderr"]
    children = [r for r in stopped["runs"] if r["tags"].get("workbench.role") == "child"]
    assert len(children) == 2 and all(r["status"] == "KILLED" for r in children), children
    assert {r["tags"][NODE_TAG] for r in children} == set(cluster_run["nodes"].values())
    (parent,) = [r for r in stopped["runs"] if r["tags"].get("workbench.role") == "parent"]
    assert parent["status"] == "KILLED"
    assert stopped["stderr"].strip().splitlines()[-1].startswith("workbench: interrupted")


@needs_ray
def test_a_node_lost_mid_cell_has_its_task_retried_and_each_cell_one_finished_run(cluster_run):
    lossy = cluster_run["lossy"]
    assert lossy["rc"] == 0, lossy["stderr"]
    assert lossy["lost_run"] is not None, "no cell was seen training on node_b"
    children = [r for r in lossy["runs"] if r["tags"].get("workbench.role") == "child"]
    assert not [r for r in children if r["status"] == "RUNNING"]
    cells = Counter(
        (r["tags"]["workbench.variant"], r["tags"]["workbench.seed"])
        for r in children
        if r["status"] == "FINISHED"
    )
    assert sorted(cells.values()) == [1, 1, 1, 1], cells
    (lost,) = [r for r in children if r["run_id"] == lossy["lost_run"]]
    # node_b was removed once the cell had a checkpoint in the folder both nodes share: the
    # retry on the head took the run over and continued it from there to FINISHED
    assert lost["status"] == "FINISHED"
    assert int(lost["tags"]["workbench.resumed_at_step"]) >= 600
    assert lost["tags"][NODE_TAG] == cluster_run["nodes"]["head"]
    assert "cells done" in lossy["stderr"]  # the driver's progress lines
    assert "ran 4, reused 0 finished run(s), 0 failed" in lossy["stdout"]


@needs_ray
def test_an_unreachable_cluster_fails_within_seconds_in_one_line(tmp_path, capsys):
    from workbench.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: x\nbaseline: a\nseeds: 1\nvariants: {a: [], b: [agent.tau=0.01]}\n"
        f"tracking: {{dir: {tmp_path / 'mlruns'}}}\n"
    )
    t0 = time.monotonic()
    assert main(["ablate", str(spec), "--ray", f"127.0.0.1:{port}"]) == 1
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"workbench: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert not (tmp_path / "mlruns").exists()  # nothing was created before the check


@needs_ray
def test_a_node_lost_mid_trial_fails_that_trial_and_the_study_still_counts_n_trials(
    cluster_run,
):
    lossy = cluster_run["study_lossy"]
    if "rc" not in lossy:
        pytest.skip("PostgreSQL binaries not found")
    assert lossy["rc"] == 0, lossy["stderr"]
    assert lossy["lost_run"] is not None, "no trial was seen training on node_b"
    states = Counter(lossy["states"])
    assert states["COMPLETE"] == 4 and states["FAIL"] >= 1 and "RUNNING" not in states
    runs = lossy["runs"]
    assert not [r for r in runs if r["status"] == "RUNNING"]
    (lost,) = [r for r in runs if r["run_id"] == lossy["lost_run"]]
    assert lost["status"] == "FAILED"
    assert "heartbeats" in lost["tags"]["workbench.status_reason"]


@needs_ray
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_port_that_answers_but_is_no_ray_head_fails_within_15_s_in_one_line(
    scheme, tmp_path, capsys
):
    """Neither the head's GCS (HOST:PORT) nor its Ray Client port (ray://): Ray's own
    clients would wait minutes or ~35 s."""
    from workbench.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: x\nbaseline: a\nseeds: 1\nvariants: {a: [], b: [agent.tau=0.01]}\n"
        f"tracking: {{dir: {tmp_path / 'mlruns'}}}\n"
    )
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        assert main(["ablate", str(spec), "--ray", f"{scheme}127.0.0.1:{port}"]) == 1
        assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"workbench: the Ray cluster at {scheme}127.0.0.1:{port} did not")
    assert len(err) == 1, err


def test_a_retried_task_without_a_checkpoint_fails_the_lost_run_and_starts_its_cell_afresh(
    tmp_path, monkeypatch
):
    """What a Ray task's retry does when the lost attempt left no checkpoint it can read
    (the cluster scenario has one, so it continues): the lost run ends FAILED, saying where it
    was lost and retried, and the cell trains in a run of its own. No Ray needed: the retry is
    the task's code, run here with the placement a Ray task would have."""
    from mlflow.tracking import MlflowClient

    from workbench import ablation, parallel
    from workbench.config import compose
    from workbench.tracking import make_tracker, resolve_uri
    from workbench.tracking.tags import CONFIG_HASH_TAG, REASON_TAG, ROLE_TAG, SEED_TAG

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: retry\nbaseline: a\nseeds: [0]\nsteps: 300\n"
        "base: ['agent.actor_hidden=[8]', 'agent.critic_hidden=[8]', agent.batch_size=16, "
        "agent.learning_starts=100, eval.every=300, eval.episodes=1, eval.video=false]\n"
        "variants: {a: [], b: [agent.tau=0.01]}\n"
        f"tracking: {{dir: {tmp_path / 'mlruns'}}}\n"
    )
    job = ablation.plan(ablation.load_spec(path))[0]
    cfg = compose(list(job.overrides))
    placed = {parallel.RAY_JOB_TAG: "01000000", parallel.RAY_TASK_TAG: "task-7"}
    # the lost attempt: its run of the cell, left RUNNING by a node that died
    lost = make_tracker(cfg.tracking, run_name="a-s0")
    lost.start(
        params={},
        tags={
            CONFIG_HASH_TAG: job.config_hash,
            SEED_TAG: str(job.seed),
            ROLE_TAG: "child",
            **placed,
            parallel.RAY_NODE_TAG: "node-b",
        },
    )
    lost.end()
    uri = resolve_uri(cfg.tracking.uri, cfg.tracking.dir)
    client = MlflowClient(uri)
    client.update_run(lost.run_id, status="RUNNING")
    try:
        parallel.set_placement({**placed, parallel.RAY_NODE_TAG: "node-head"})
        ablation._run_unit((job,), "retry", None)
    finally:
        parallel.set_placement({})
    old = client.get_run(lost.run_id)
    assert old.info.status == "FAILED"
    assert old.data.tags[REASON_TAG] == (
        "abandoned: its Ray task's attempt on node node-b was lost (node or worker died); "
        "Ray retried it on node node-head"
    )
    runs = client.search_runs([old.info.experiment_id])
    (new,) = [r for r in runs if r.info.run_id != lost.run_id]
    assert new.info.status == "FINISHED"
    assert new.data.tags[parallel.RAY_NODE_TAG] == "node-head"
    assert new.data.tags[SEED_TAG] == "0" and new.data.tags[CONFIG_HASH_TAG] == job.config_hash
