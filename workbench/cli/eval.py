"""``workbench eval RUN``: evaluate a logged policy (run id or policy folder); prints JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a logged policy (run id or policy folder)")
    p.add_argument("run", help="MLflow run id, or a local policy/ folder")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the first episode (default 0); the run's own evaluations draw theirs "
        "from the run's seed, so returns differ from its eval/final_return_mean",
    )
    p.add_argument("--video", type=Path, default=None, help="write an mp4 of the first episode")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or mlruns/")
    p.set_defaults(handler=cmd_eval)


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
    print(
        f"episodes seeded from --seed {args.seed}: not the episodes of the run's final "
        "evaluation (seeded from the run's seed), so the returns differ from its "
        "eval/final_return_mean",
        file=sys.stderr,
    )
    return 0
