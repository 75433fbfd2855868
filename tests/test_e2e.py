"""Short end-to-end runs with tiny networks: the wiring from config to MLflow and back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from artifact_checks import is_drawn, pixels_of, read_png, read_video
from mlflow.tracking import MlflowClient

from workbench.config import compose, config_hash, to_dict
from workbench.policy import load_policy
from workbench.train import StopRun, train

TINY = [
    "total_steps=600",
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "agent.learning_starts=200",
    "eval.every=300",
    "eval.episodes=2",
    "eval.video_max_frames=20",
    "tracking.log_every=100",
    "progress=false",
]

DESIGN_METRICS = {
    "train/episode_return",
    "train/episode_length",
    "eval/return_mean",
    "eval/return_std",
    "loss/critic",
    "loss/actor",
    "q/mean",
    "explore/sigma",
    "explore/epsilon",
    "perf/sps",
    "perf/updates_per_s",
}


def _cfg(store, *extra):
    return compose([*TINY, f"tracking.dir={store[0]}", *extra])


def _artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, f.path) if f.is_dir else [f.path])
    return out


def test_tiny_pendulum_run_lands_in_mlflow_with_everything(store, tmp_path):
    cfg = _cfg(store)
    result = train(cfg, tags={"workbench.overrides": "test"})
    assert result.status == "FINISHED"
    assert result.eval_steps == [300, 600]
    client = MlflowClient(store[1])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((store[0] / "artifacts").as_uri())

    params = run.data.params
    assert params["agent.tau"] == "0.005"
    assert params["env.id"] == "Pendulum-v1"
    assert params["agent.actor_hidden"] == "[16]"
    assert params["noise.kind"] == "gaussian"

    tags = run.data.tags
    for key in ("workbench.config_hash", "workbench.seed", "workbench.device"):
        assert tags[key]
    assert tags["workbench.overrides"] == "test"
    assert tags["workbench.seed"] == "0"

    assert set(run.data.metrics) >= DESIGN_METRICS
    evals = client.get_metric_history(result.run_id, "eval/return_mean")
    assert [m.step for m in evals] == [300, 600]
    episodes = client.get_metric_history(result.run_id, "train/episode_return")
    assert len(episodes) == 3  # Pendulum episodes are 200 steps
    losses = client.get_metric_history(result.run_id, "loss/critic")
    assert [m.step for m in losses] == [200, 300, 400, 500, 600]  # learning starts at 200

    files = set(_artifacts(client, result.run_id))
    assert {
        "config.yaml",
        "learning_curve.png",
        "policy/policy.pt2",
        "policy/spec.json",
        "video/eval.mp4",
    } <= files

    def fetch(path):
        return Path(client.download_artifacts(result.run_id, path, str(tmp_path / "dl")))

    # config.yaml is the run's resolved config (resume blanked), the one its hash is of
    logged = yaml.safe_load(fetch("config.yaml").read_text())
    assert logged == {**to_dict(cfg), "resume": None}
    assert logged["total_steps"] == 600 and logged["agent"]["actor_hidden"] == [16]
    assert tags["workbench.config_hash"] == config_hash(cfg)
    # the learning curve: a 7 x 4 inch figure with the eval line drawn
    png = read_png(fetch("learning_curve.png"), (700, 400))
    assert pixels_of(png, "tab:blue") > 100
    # the policy's spec: the env, its shapes and bounds, and the run it came from
    spec = json.loads(fetch("policy/spec.json").read_text())
    assert spec["env_id"] == "Pendulum-v1"
    assert spec["max_episode_steps"] == cfg.env.max_episode_steps  # None: the env's own 200
    assert (spec["obs_dim"], spec["action_dim"]) == (3, 1)
    assert (spec["action_low"], spec["action_high"]) == ([-2.0], [2.0])
    assert spec["config_hash"] == tags["workbench.config_hash"]
    assert spec["steps"] == 600 and spec["normalize_obs"] is False
    # the video: eval.video_max_frames=20 of Pendulum's 500 x 500 frames, at video_fps
    video = read_video(fetch("video/eval.mp4"))
    assert (video.n_frames, video.size, video.fps) == (20, (500, 500), 30.0)
    assert is_drawn(video.first) and video.changes > 0  # a scene, and it moves


def test_logged_policy_loads_in_one_call_and_runs_without_training_code(store, tmp_path):
    result = train(_cfg(store, "env.normalize_obs=true"))
    policy = load_policy(result.run_id, tracking_uri=store[1])
    assert policy.spec["env_id"] == "Pendulum-v1"
    action = policy([1.0, 0.0, 0.0])
    assert action.shape == (1,)
    assert -2.0 <= float(action[0]) <= 2.0  # rescaled to Pendulum's bounds

    # plain torch, no workbench: the exported program alone
    local = next(store[0].rglob("policy.pt2"))
    module = torch.export.load(str(local)).module()
    batch = torch.randn(5, 3)
    assert torch.allclose(module(batch), policy.module(batch))


def test_policy_loading_never_unpickles(store, tmp_path):
    import shutil

    result = train(_cfg(store, "agent.layer_norm=true", "agent.activation=tanh"))
    folder = tmp_path / "policy"
    shutil.copytree(next(store[0].rglob("weights.pt")).parent, folder)
    policy = load_policy(folder)
    assert policy.spec["architecture"]["layer_norm"] is True
    assert policy.spec["architecture"]["activation"] == "tanh"

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"actor.net.0.weight": Evil()}, folder / "weights.pt")
    with pytest.raises(ValueError, match="does not load as this policy's weights"):
        load_policy(folder)
    assert result.status == "FINISHED"


def test_eval_command_prints_json_for_a_run(store, tmp_path):
    result = train(_cfg(store))
    video = tmp_path / "v.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "eval", result.run_id,
         "--episodes", "2", "--tracking-uri", store[1], "--video", str(video)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["episodes"] == 2 and len(out["returns"]) == 2
    assert out["video"] == str(video)
    # the first episode: its reset frame and one per step
    shown = read_video(video)
    assert shown.n_frames == out["lengths"][0] + 1 == 201
    assert shown.size == (500, 500) and is_drawn(shown.first) and shown.changes > 0


def test_a_moved_store_is_read_by_its_folder_or_its_db(store, tmp_path):
    """An archived mlruns/ (moved, or copied to another machine): its db keeps the absolute
    artifact paths of where it was made; `--tracking-uri FOLDER` (as `--help` says) or
    `FOLDER/mlflow.db` reads it, and eval finds the policy below the moved folder."""
    import shutil

    result = train(_cfg(store))
    moved = tmp_path / "archive" / "kept"
    shutil.move(str(store[0]), moved)
    for where, args in (
        (moved, ["eval", result.run_id, "--episodes", "1"]),
        (moved / "mlflow.db", ["compare"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "workbench.cli", *args, "--tracking-uri", str(where)],
            capture_output=True, text=True, timeout=180, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, (args, where, proc.stderr[-2000:])
        if args[0] == "eval":
            assert json.loads(proc.stdout)["run"] == result.run_id
        else:
            assert "1/1" in proc.stdout
    assert not (tmp_path / "mlruns").exists() and not store[0].exists()


class _Raise:
    def __init__(self, exc):
        self.exc = exc

    def on_evaluation(self, step, metrics, agent):
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "status", "reason"),
    [
        (RuntimeError("boom"), "FAILED", "RuntimeError: boom"),
        (StopRun("pruned at step 300"), "KILLED", "pruned at step 300"),
        (KeyboardInterrupt(), "KILLED", "interrupted at step 300"),
    ],
)
def test_a_run_that_stops_early_is_never_left_running(store, exc, status, reason):
    cfg = _cfg(store)
    with pytest.raises(type(exc)):
        train(cfg, hooks=[_Raise(exc)])
    client = MlflowClient(store[1])
    (run,) = client.search_runs([client.get_experiment_by_name("pendulum").experiment_id])
    assert run.info.status == status
    assert reason in run.data.tags["workbench.status_reason"]


class _Poison:
    def on_evaluation(self, step, metrics, agent):
        with torch.no_grad():
            for p in agent.critic.parameters():
                p.fill_(float("nan"))


def test_divergence_fails_the_run_with_the_reason(store):
    from workbench.train import DivergenceError

    with pytest.raises(DivergenceError, match="non-finite"):
        train(_cfg(store), hooks=[_Poison()])
    client = MlflowClient(store[1])
    (run,) = client.search_runs([client.get_experiment_by_name("pendulum").experiment_id])
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["workbench.status_reason"]


def test_same_seed_same_result_on_cpu():
    cfg = compose([*TINY, "tracking=none", "eval.video=false"])
    a, b = train(cfg), train(cfg)
    assert a.eval_returns == b.eval_returns
    c = train(compose([*TINY, "tracking=none", "eval.video=false", "seed=1"]))
    assert c.eval_returns != a.eval_returns


@pytest.mark.parametrize(
    "extra",
    [
        ["agent=td3", "noise=ou", "schedule=linear"],
        ["noise=param", "epsilon.start=0.3", "epsilon.end=0.0", "epsilon.kind=linear"],
        ["noise=gaussian", "schedule=cosine", "agent.layer_norm=true", "env.normalize_obs=true"],
        ["noise=none", "epsilon.start=0.5", "epsilon.kind=cosine", "epsilon.end=0.05"],
        ["env.n_envs=3", "agent.gradient_steps=2", "agent.train_freq=2"],
    ],
    ids=["td3-ou-linear", "param-epsilon", "cosine-ln-norm", "none-epsilon-cosine", "vector-utd"],
)
def test_variants_run_end_to_end(extra):
    cfg = compose([*TINY, "tracking=none", "eval.video=false", *extra])
    result = train(cfg)
    assert result.status == "FINISHED"
    assert result.steps >= 600


def test_pybullet_run_with_async_envs_and_video(store):
    cfg = _cfg(
        store,
        "env=hopper",
        "env.n_envs=2",
        "env.vectorization=async",
        "env.max_episode_steps=50",
        "env.time_feature=true",
        "total_steps=300",
        "agent.learning_starts=100",
        "eval.every=0",
        "eval.episodes=1",
    )
    result = train(cfg)
    assert result.status == "FINISHED"
    client = MlflowClient(store[1])
    files = set(_artifacts(client, result.run_id))
    assert "video/eval.mp4" in files
    spec = json.loads(next(store[0].rglob("spec.json")).read_text())
    assert spec["obs_dim"] == 15 + 1  # Hopper's 15 + the time feature
    # the final-eval episode: its reset frame and one per step, up to video_max_frames=20
    video = read_video(next(store[0].rglob("eval.mp4")))
    length = client.get_run(result.run_id).data.metrics["eval/length_mean"]
    assert video.n_frames == min(int(length) + 1, 20)
    assert is_drawn(video.first) and video.changes > 0


def _cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cli_train_and_multirun(tmp_path):
    proc = _cli(["train", *TINY, "eval.video=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED"
    # the store in ./mlruns holds that run, finished, with its config
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["total_steps"] == "600"

    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = _cli(["train", "-m", *parallel, *TINY, "eval.video=false", "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = client.search_runs(
        [client.get_experiment_by_name("pendulum").experiment_id],
        filter_string="tags.`workbench.sweep` != ''",
    )
    assert sorted(r.data.tags["workbench.seed"] for r in runs) == ["0", "1"]
    assert len({r.data.tags["workbench.sweep"] for r in runs}) == 1


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://127.0.0.1:9", "cannot reach the MLflow tracking server http://127.0.0.1:9"),
        # shown with the driver it is opened with (postgresql+psycopg2://)
        ("postgresql://me:hunter22@127.0.0.1:9/db", "cannot reach the MLflow database postgresql"),
    ],
)
def test_unreachable_tracking_store_is_said_plainly(tmp_path, uri, message):
    proc = _cli(["train", f"tracking.uri={uri}", *TINY], tmp_path)
    assert proc.returncode == 1  # a runtime failure: the input is fine
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "hunter22" not in proc.stderr + proc.stdout
    if "hunter22" in uri:
        assert "me:***@127.0.0.1:9/db" in proc.stderr
