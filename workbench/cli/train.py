"""``workbench train [hydra overrides]``: one run, or a Hydra multirun sweep.

The arguments go to Hydra unchanged, after a check that they compose and validate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from workbench.errors import ConfigProblem, WorkbenchError


def register(sub: argparse._SubParsersAction) -> None:
    """Listed in ``workbench --help`` only: ``main`` hands ``train``'s arguments to Hydra."""
    sub.add_parser(
        "train",
        help="train a run: workbench train [hydra overrides], e.g. env=halfcheetah agent=td3",
        add_help=False,
    )


class _TaskError(BaseException):
    """Carries the task's error past Hydra's job runner, which would print "Error executing
    job with overrides: [...]" (credentials in a tracking.uri included) before raising it."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _train_task(raw: Any) -> None:
    """Hydra task: the run, its error carried out to ``cmd_train``."""
    try:
        _train_and_report(raw)
    except Exception as err:
        raise _TaskError(err) from None


def _train_and_report(raw: Any) -> None:
    """Validate, train, print a one-line summary."""
    from hydra.core.hydra_config import HydraConfig

    from workbench.checkpoint import prepare_resume
    from workbench.config import check_env, override_key, to_config, validate
    from workbench.tracking.tags import (
        OVERRIDES_TAG,
        SWEEP_JOB_TAG,
        SWEEP_PARAMS_TAG,
        SWEEP_TAG,
    )
    from workbench.train import Interrupted, train

    hc = HydraConfig.get()
    state = None
    cfg = to_config(raw)
    validate(cfg)
    check_env(cfg)
    if cfg.resume is not None:
        cfg, state = prepare_resume(cfg, hc.overrides.task)

    # a resumed run keeps the overrides it was started with
    tags = {} if state else {OVERRIDES_TAG: " ".join(hc.overrides.task) or "(none)"}
    if str(hc.mode) == "RunMode.MULTIRUN":
        from workbench.parallel import placement_tags

        tags[SWEEP_TAG] = str(hc.sweep.dir)
        tags.update(placement_tags())  # hydra/launcher=ray: the Ray job, task and node
        tags[SWEEP_JOB_TAG] = str(hc.job.num)
        swept = _swept_keys(sys.argv[1:])
        if mine := [o for o in hc.overrides.task if override_key(o) in swept]:
            tags[SWEEP_PARAMS_TAG] = " ".join(mine)  # what tells this job from the others
    try:
        result = train(cfg, tags=tags, resume_state=state, handle_signals=True)
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
    print(_where(cfg, result.run_id), file=sys.stderr)


def _where(cfg: Any, run_id: str | None) -> str:
    """Where the run is and how to look at it: its name, experiment and artifacts, and the
    link that opens its experiment in the MLflow UI (stderr; stdout stays the JSON line)."""
    from urllib.parse import unquote, urlparse

    from workbench.tracking import experiment_line, redact, resolve_uri, search_runs

    t = cfg.tracking
    if run_id is None:
        return "not tracked (tracking.backend=none)"
    uri = resolve_uri(t.uri, t.dir)
    try:
        (run,) = search_runs(uri, run_ids=[run_id])
    except Exception:  # the summary above stands; where to look is a courtesy
        return f"run {run_id} in experiment {t.experiment!r} at {redact(uri)}"
    parsed = urlparse(run.artifact_uri)
    artifacts = unquote(parsed.path) if parsed.scheme == "file" else redact(run.artifact_uri)
    lines = [
        f"run {run.run_name} ({run_id}) in experiment {t.experiment!r}",
        f"  artifacts: {artifacts}",
    ]
    lines.append(f"  {experiment_line(uri, run.experiment_id, t.dir)}")
    return "\n".join(lines)


def _swept_keys(argv: Sequence[str]) -> set[str]:
    """The keys a multirun sweeps over (``agent.tau=0.01,0.02``, ``seed=range(3)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except Exception:  # Hydra has parsed them already; a name is not worth failing for
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def _compose_problem(argv: Sequence[str]) -> ConfigProblem | None:
    """Why a plain list of overrides does not compose or validate, in our words (None: fine).

    Checked before Hydra starts: Hydra would print its own multi-line text and exit 1 for an
    override it cannot compose, and it makes its output folder before our task validates.
    With ``-m`` every job of the sweep is checked, so that a bad value in the last job stops
    the sweep before the first trains. Other flags (``--cfg``), ``hydra`` overrides and other
    sweepers are left to Hydra.
    """
    from workbench.config import ConfigError, compose, override_key
    from workbench.specfile import compose_error_text

    flags = {a for a in argv if a.startswith("-")}
    overrides = [a for a in argv if not a.startswith("-")]
    keys = [override_key(a) for a in overrides]
    if flags - {"-m", "--multirun"} or "hydra/sweeper" in keys:
        return None  # Hydra's own flags, or a sweeper that picks the jobs as it goes
    ours = [a for a, k in zip(overrides, keys, strict=True) if not k.startswith("hydra")]
    try:
        for job in _sweep_jobs(ours) if flags else [ours]:
            compose(job)
    except ConfigError as err:
        return err
    except Exception as err:
        return ConfigProblem(f"invalid overrides: {compose_error_text(err)}")
    return None


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Every job of a multirun's sweep, as Hydra's basic sweeper will make them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def cmd_train(argv: Sequence[str]) -> int:
    import hydra

    from workbench.config import conf_dir, search_path_overrides

    if problem := _compose_problem(argv):
        raise problem

    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(
        _train_task
    )
    # Exported presets live outside the source tree, in a folder Hydra must be told of. The
    # override goes next to the user's first one: Hydra's parser takes one run of overrides.
    at = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), 0)
    sys.argv = ["workbench train", *argv[:at], *search_path_overrides(argv), *argv[at:]]
    # Hydra prints its own (trimmed) traceback for an error in the task or in its own set-up
    # (an output folder it cannot make) and exits 1; with this it raises the error as it is,
    # for ``workbench.cli.main`` to say in one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from hydra.errors import HydraException

    from workbench.specfile import compose_error_text

    failed: Exception | None = None
    try:
        main()
    except _TaskError as carrier:
        failed = carrier.error
    except HydraException as err:  # overrides given with flags (-m) reach Hydra itself
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, WorkbenchError):
            cause = cause.__cause__  # our own error, from a plugin Hydra made (the launcher)
        failed = cause or ConfigProblem(f"invalid overrides: {compose_error_text(err)}")
    if failed is not None:  # raised outside the handler: its own cause and context stay
        raise failed
    return 0
