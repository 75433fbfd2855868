"""``workbench bench [hydra overrides]``: update and end-to-end speed, next to SB3's DDPG;
with ``--population K``, K runs as one population against the same K runs one by one.

Prints one JSON document (see ``workbench.speed``); exit 2 for overrides that do not validate.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="update and end-to-end speed, next to SB3's DDPG; JSON")
    p.add_argument("--updates", type=int, default=200, help="updates per timed chunk")
    p.add_argument("--rounds", type=int, default=5, help="timed chunks each, alternating")
    p.add_argument("--warmup", type=int, default=50, help="untimed updates first (compile)")
    p.add_argument("--env-steps", type=int, default=5000, help="steps for the raw env rate")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training runs")
    p.add_argument("--e2e-rounds", type=int, default=2, help="end-to-end runs each (ABBA)")
    p.add_argument("--sb3", choices=("auto", "yes", "no"), default="auto")
    p.add_argument(
        "--population",
        type=_positive,
        metavar="K",
        help="instead: K runs (seeds 0..K-1) as one population vs one after another "
        "(--e2e-rounds rounds, ABBA)",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides: env=..., agent.*, total_steps=")
    p.set_defaults(handler=cmd_bench)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from workbench.speed import run_bench, run_population_bench

    if args.population is not None:
        out = run_population_bench(args.overrides, k=args.population, rounds=args.e2e_rounds)
    else:
        out = run_bench(
            args.overrides,
            updates=args.updates,
            rounds=args.rounds,
            warmup=args.warmup,
            env_steps=args.env_steps,
            e2e=not args.no_e2e,
            e2e_rounds=args.e2e_rounds,
            sb3=args.sb3,
        )
    print(json.dumps(out, indent=2))
    return 0
