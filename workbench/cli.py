"""The ``workbench`` command.

    workbench train [hydra overrides]      train one run (or -m for a multirun sweep)
    workbench eval RUN_ID [--video PATH]   evaluate a logged policy
    workbench ui                           MLflow UI on the embedded store (127.0.0.1)
    workbench learning-check               the Pendulum learning benchmark (JSON)
    workbench tune SPEC [--workers K]      run/resume an Optuna study (see workbench.tuning)
    workbench study-report NAME            report on a study; tune-bench: its benchmark

``train`` hands its arguments to Hydra unchanged, so everything Hydra accepts works there
(``--cfg job``, ``--help``, ``-m``, ``+experiment=...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("workbench")


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


# --------------------------------------------------------------------------------- train


def _train_task(raw: Any) -> None:
    """Hydra task: validate, train, print a one-line summary."""
    from hydra.core.hydra_config import HydraConfig

    from workbench.checkpoint import CheckpointError, prepare_resume
    from workbench.config import ConfigError, to_config, validate
    from workbench.tracking import TrackingError
    from workbench.tracking.tags import OVERRIDES_TAG, SWEEP_JOB_TAG, SWEEP_TAG
    from workbench.train import Interrupted, train

    hc = HydraConfig.get()
    state = None
    try:
        cfg = to_config(raw)
        validate(cfg)
        if cfg.resume is not None:
            cfg, state = prepare_resume(cfg, hc.overrides.task)
    except (ConfigError, CheckpointError) as err:
        print(f"workbench: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    # a resumed run keeps the overrides it was started with
    tags = {} if state else {OVERRIDES_TAG: " ".join(hc.overrides.task) or "(none)"}
    if str(hc.mode) == "RunMode.MULTIRUN":
        tags[SWEEP_TAG] = str(hc.sweep.dir)
        tags[SWEEP_JOB_TAG] = str(hc.job.num)
    try:
        result = train(cfg, tags=tags, resume_state=state, handle_signals=True)
    except (TrackingError, CheckpointError) as err:
        print(f"workbench: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as err:
        print(f"workbench: {err.reason}", file=sys.stderr)
        raise SystemExit(130) from None
    print(
        json.dumps(
            {
                "run_id": result.run_id,
                "status": result.status,
                "steps": result.steps,
                "final_return_mean": round(result.final_return_mean, 2),
                "final_return_std": round(result.final_return_std, 2),
                "wall_time_s": round(result.wall_time_s, 1),
            }
        )
    )


def _compose_problem(argv: Sequence[str]) -> str | None:
    """Why a plain list of overrides does not compose or validate, in our words (None: fine).

    Checked before Hydra starts: Hydra would print its own multi-line text and exit 1 for an
    override it cannot compose, and it makes its output folder before our task validates.
    Flags (``-m``, ``--cfg``) and ``hydra`` overrides are left to Hydra.
    """
    from workbench.config import ConfigError, compose, override_key
    from workbench.specfile import compose_error_text

    keys = [override_key(a) for a in argv]
    if any(a.startswith("-") for a in argv) or any(k.startswith("hydra") for k in keys):
        return None
    try:
        compose(argv)
    except ConfigError as err:
        return str(err)
    except Exception as err:
        return f"invalid overrides: {compose_error_text(err)}"
    return None


def cmd_train(argv: Sequence[str]) -> int:
    import hydra

    from workbench.config import conf_dir

    if problem := _compose_problem(argv):
        print(f"workbench: {problem}", file=sys.stderr)
        return 2

    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(
        _train_task
    )
    sys.argv = ["workbench train", *argv]
    main()
    return 0


# ---------------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from workbench.envs import make_env
    from workbench.evaluate import evaluate
    from workbench.policy import load_policy

    policy = load_policy(args.run, tracking_uri=args.tracking_uri)
    spec = policy.spec
    env = make_env(
        spec["env_id"],
        max_episode_steps=spec.get("max_episode_steps"),
        time_feature=spec.get("time_feature", False),
        render_mode="rgb_array" if args.video else None,
        env_kwargs=spec.get("env_kwargs") or {},
    )
    try:
        res = evaluate(
            policy, env, args.episodes, seed=args.seed, video_path=args.video, fps=args.fps
        )
    finally:
        env.close()
    out = {
        "run": args.run,
        "env_id": spec["env_id"],
        "episodes": args.episodes,
        "seed": args.seed,
        "return_mean": round(res.mean, 3),
        "return_std": round(res.std, 3),
        "returns": [round(float(r), 3) for r in res.returns],
        "lengths": [int(n) for n in res.lengths],
        "video": str(res.video_path) if res.video_path else None,
    }
    print(json.dumps(out, indent=2))
    return 0


# ------------------------------------------------------------------------------------ ui


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
        "(training runs: 'Model training' toggle, top left; Ctrl-C to stop)",
        file=sys.stderr,
    )
    os.execv(mlflow, cmd)
    return 0  # not reached


# ------------------------------------------------------------------------ learning-check


def _learning_check_job(overrides: list[str]) -> dict[str, Any]:
    from workbench.config import compose
    from workbench.tracking.tags import CHECK_TAG
    from workbench.train import train

    _setup_logging()  # spawned workers start with logging unconfigured
    cfg = compose(overrides)
    result = train(cfg, tags={CHECK_TAG: "learning"})
    return {
        "seed": cfg.seed,
        "final_return_mean": round(result.final_return_mean, 2),
        "final_return_std": round(result.final_return_std, 2),
        "run_id": result.run_id,
        "wall_time_s": round(result.wall_time_s, 1),
    }


def cmd_learning_check(args: argparse.Namespace) -> int:
    import multiprocessing as mp
    import time
    from concurrent.futures import ProcessPoolExecutor

    from workbench.config import ConfigError, compose
    from workbench.specfile import compose_error_text

    seeds = [int(s) for s in args.seeds.split(",")]
    base = [f"+experiment={args.preset}", "progress=false", *args.overrides]
    try:
        for s in seeds:  # every job's config is valid before any starts
            compose([*base, f"seed={s}"])
    except ConfigError as err:
        print(f"workbench: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra: an override that does not compose
        print(f"workbench: invalid overrides: {compose_error_text(err)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    jobs = [[*base, f"seed={s}"] for s in seeds]
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_learning_check_job, jobs))
    returns = [r["final_return_mean"] for r in results]
    out = {
        "check": "learning",
        "preset": args.preset,
        "overrides": args.overrides,
        "target": args.target,
        "seeds": results,
        "final_returns": returns,
        "all_seeds_meet_target": all(r >= args.target for r in returns),
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=2))
    return 0 if out["all_seeds_meet_target"] else 1


# ---------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "train",
        help="train a run: workbench train [hydra overrides], e.g. env=halfcheetah agent=td3",
        add_help=False,
    )

    p = sub.add_parser("eval", help="evaluate a logged policy (run id or policy folder)")
    p.add_argument("run", help="MLflow run id, or a local policy/ folder")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", type=Path, default=None, help="write an mp4 of the first episode")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or mlruns/")

    p = sub.add_parser("ui", help="MLflow UI on the embedded store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--dir", default="mlruns", help="embedded store folder")
    p.add_argument("--uri", default=None, help="another tracking store instead")

    p = sub.add_parser("learning-check", help="train a preset on several seeds; print JSON")
    p.add_argument("--preset", default="pendulum_ddpg")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=min(3, os.cpu_count() or 1))
    p.add_argument("--target", type=float, default=-200.0, help="every seed must reach this")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")

    from workbench import ablation, bench, compare
    from workbench.tuning import commands as tuning_commands

    ablation.register(sub)
    compare.register(sub)
    bench.register(sub)
    tuning_commands.register(sub)  # tune, study-report, tune-bench
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _setup_logging()
    if argv and argv[0] == "train":
        try:
            return cmd_train(argv[1:])
        except KeyboardInterrupt:
            print("workbench: interrupted; the run was marked KILLED", file=sys.stderr)
            return 130
    args = build_parser().parse_args(argv)
    handlers = {"eval": cmd_eval, "ui": cmd_ui, "learning-check": cmd_learning_check}
    handler = getattr(args, "handler", None) or handlers[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"workbench: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"workbench: interrupted ({err or 'Ctrl-C'})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
