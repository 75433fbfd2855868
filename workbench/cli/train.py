"""``workbench train [hydra overrides]``: one run, or a Hydra multirun sweep.

The arguments go to Hydra unchanged, after a check that they compose and validate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Listed in ``workbench --help`` only: ``main`` hands ``train``'s arguments to Hydra."""
    sub.add_parser(
        "train",
        help="train a run: workbench train [hydra overrides], e.g. env=halfcheetah agent=td3",
        add_help=False,
    )


def _train_task(raw: Any) -> None:
    """Hydra task: validate, train, print a one-line summary."""
    from hydra.core.hydra_config import HydraConfig

    from workbench.checkpoint import CheckpointError, prepare_resume
    from workbench.config import ConfigError, check_env, to_config, validate
    from workbench.tracking import TrackingError, resolve_uri, runs_view_line
    from workbench.tracking.tags import OVERRIDES_TAG, SWEEP_JOB_TAG, SWEEP_TAG
    from workbench.train import Interrupted, train

    hc = HydraConfig.get()
    state = None
    try:
        cfg = to_config(raw)
        validate(cfg)
        check_env(cfg)
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
    uri = resolve_uri(cfg.tracking.uri, cfg.tracking.dir)
    if link := runs_view_line(uri, result.run_id, cfg.tracking.dir):
        print(link, file=sys.stderr)


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
