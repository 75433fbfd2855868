"""Study commands: ``tune``, ``study-report`` and ``tune-bench``.

workbench tune SPEC [--workers K] [--trials N] [--timeout S] [--storage URL]
                    [--tracking-uri URI] [--report] [--export [PATH]] [--recheck K]
                    [--steps N] [key=value ...]   a quick look, a study of its own
workbench study-report NAME|SPEC [--storage URL] [--dir mlruns] [--export [PATH]] [--recheck K]
workbench tune-bench [...]          pruning and worker-scaling benchmark (JSON)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import errno
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.cli.args import add_ray_option, ray_cluster
from workbench.errors import ConfigProblem

log = logging.getLogger(__name__)


def _positive(kind: type, minimum: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be >= {minimum}")
        return value

    return parse


def _add_followups(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--export",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the best trial as a preset (default: <study>_best.yaml in "
        "~/.config/workbench/conf/experiment, or $WORKBENCH_USER_CONF/experiment: on "
        "Hydra's search path, outside the source tree)",
    )
    p.add_argument(
        "--recheck",
        type=_positive(int, 1),
        default=0,
        metavar="K",
        help="re-train the top K trials on fresh seeds and report both scores",
    )
    p.add_argument("--recheck-seeds", type=_positive(int, 1), default=3, metavar="N")
    p.add_argument("--out", type=Path, default=None, help="report folder")
    p.add_argument("--top", type=_positive(int, 1), default=15, help="trials in the terminal table")


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", type=Path, default=None, help="default: studies/pendulum_ddpg.yaml")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--steps", type=int, default=10_000, help="env steps per trial")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--pruner", default="successive_halving", help="pruner of the pruned study")
    p.add_argument(
        "--pruner-args",
        default=None,
        help="JSON keyword arguments of the pruner (default for successive_halving and "
        "hyperband: min_resource 2 x eval-every, reduction_factor 3)",
    )
    p.add_argument(
        "--scaling-trials",
        type=int,
        default=None,
        help="trials of the 2-worker unpruned study (default: --trials)",
    )
    p.add_argument("--skip-scaling", action="store_true", help="no 2-worker run")
    p.add_argument("--dir", type=Path, default=None, help="store folder (default: a temp dir)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tune``, ``study-report`` and ``tune-bench`` (each sets its ``handler``)."""
    p = sub.add_parser("tune", help="run, resume or join an Optuna study: workbench tune SPEC")
    p.add_argument("spec", type=Path, help="study spec, e.g. studies/pendulum_ddpg.yaml")
    p.add_argument(
        "--workers",
        type=_positive(int, 1),
        default=1,
        help="worker processes (with --ray: worker tasks on the cluster)",
    )
    add_ray_option(p, "each worker as a task against the shared storage")
    p.add_argument(
        "--population",
        type=_positive(int, 1),
        default=1,
        metavar="K",
        help="each worker trains K trials at once as one population (default 1)",
    )
    p.add_argument("--trials", type=_positive(int, 1), default=None, help="override n_trials")
    p.add_argument("--timeout", type=_positive(float, 1e-9), default=None, help="seconds")
    p.add_argument("--storage", default=None, help="Optuna storage URL (postgresql://...)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for this study")
    p.add_argument(
        "--first-worker",
        type=_positive(int, 0),
        default=0,
        help="index of this machine's first worker (seeds its sampler; give each machine "
        "a different range)",
    )
    p.add_argument("--report", action="store_true", help="only report; run no trials")
    p.add_argument(
        "--steps",
        type=_positive(int, 1),
        default=None,
        metavar="N",
        help="quick look: N env steps per trial run instead of the spec's steps; runs as a "
        "study of its own, <name>-quick-N (with --report: report on that study)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="quick look: Hydra overrides appended to the spec's base (e.g. "
        "agent.learning_starts=500); the study's name then carries a hash of them",
    )
    _add_followups(p)
    p.set_defaults(handler=cmd_tune)

    p = sub.add_parser("study-report", help="report on a study by name or spec")
    p.add_argument("study", help="study name (store under --dir) or a spec file")
    p.add_argument("--storage", default=None, help="Optuna storage URL")
    p.add_argument("--dir", default="mlruns", help="tracking dir holding optuna/<name>.db")
    _add_followups(p)
    p.set_defaults(handler=cmd_study_report)

    p = sub.add_parser("tune-bench", help="pruning / worker-scaling benchmark (prints JSON)")
    _add_bench_arguments(p)
    p.set_defaults(handler=cmd_tune_bench)


# ---------------------------------------------------------------------- tune, study-report


def _load(spec_path: Path, tracking_uri: str | None, quick: Any = None) -> Any:
    from workbench.tuning.spec import load_spec

    spec = load_spec(spec_path, quick)
    if quick:
        print(
            f"quick look at {spec_path} as study {spec.name!r} (its own storage "
            f"and experiment {spec.experiment_name!r}; the full study is not touched)",
            file=sys.stderr,
        )
    if tracking_uri:
        spec = dataclasses.replace(spec, tracking_uri=tracking_uri)
    return spec


def _existing(spec: Any, storage: str | None) -> tuple[Any, Any]:
    import optuna

    from workbench.tracking import redact
    from workbench.tuning.launch import resolve_target, storage_for

    target = resolve_target(spec, storage)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage_for(spec, target))
    except KeyError:
        raise ValueError(f"no study {spec.name!r} in {redact(target.storage_url)}") from None
    return study, target


def _preflight(spec: Any, spec_path: Path, storage: str | None) -> None:
    """Everything that can be known bad before the study exists, so a failure here leaves no
    Optuna storage, study or trial and no MLflow run: every search corner must give a valid
    config, and the tracking store must answer (one quick request, not MLflow's minutes of
    retries). An unreachable Optuna storage fails next, when it is opened, before any write."""
    from workbench.tracking import probe_store
    from workbench.tuning.launch import resolve_target
    from workbench.tuning.spec import check_ranges

    check_ranges(spec, source=str(spec_path))
    target = resolve_target(spec, storage)
    if target.tracking_uri is not None:
        probe_store(target.tracking_uri, spec.experiment_name)


def cmd_tune(args: argparse.Namespace) -> int:
    from workbench.specfile import QuickLook
    from workbench.tuning.launch import run_study

    quick = QuickLook(steps=args.steps, overrides=tuple(args.overrides))
    spec = _load(args.spec, args.tracking_uri, quick)
    if args.report:
        study, target = _existing(spec, args.storage)
        return _finish(study, spec, target, args, codes=[0])
    try:
        _preflight(spec, args.spec, args.storage)
        if args.population > 1:
            from workbench.tuning.worker import check_population

            check_population(spec, source=str(args.spec))
        with ray_cluster(args.ray, args.ray_gpus) as cluster:
            outcome = run_study(
                spec,
                workers=args.workers,
                storage=args.storage,
                n_trials=args.trials,
                timeout=args.timeout,
                first_worker=args.first_worker,
                report_dir=args.out,
                population=args.population,
                cluster=cluster,
            )
    except KeyboardInterrupt:
        print(
            f"workbench: interrupted; running trials were marked failed (not counted). "
            f"Run the same command to resume study {spec.name!r}.",
            file=sys.stderr,
        )
        return 130
    return _finish(
        outcome.study,
        spec,
        outcome.target,
        args,
        codes=outcome.exit_codes,
        written=outcome.report_dir,
    )


def cmd_study_report(args: argparse.Namespace) -> int:
    import optuna

    from workbench.tracking import redact
    from workbench.tuning.launch import resolve_target
    from workbench.tuning.spec import parse_spec
    from workbench.tuning.study import SPEC_ATTR, make_storage

    path = Path(args.study)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        spec = _load(path, None)
        study, target = _existing(spec, args.storage)
        return _finish(study, spec, target, args, codes=[0])
    name = args.study
    url = (
        args.storage
        or f"sqlite:///{Path(args.dir).expanduser().resolve() / 'optuna' / f'{name}.db'}"
    )
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ValueError(f"no study {name!r}: {redact(url)} does not exist (see --dir, --storage)")
    try:
        study = optuna.load_study(
            study_name=name, storage=make_storage(url, heartbeat_interval=10, grace_period=60)
        )
    except KeyError:
        raise ValueError(f"no study {name!r} in {redact(url)}") from None
    text = study.user_attrs.get(SPEC_ATTR)
    if not text:
        raise ValueError(f"study {name!r} in {redact(url)} was not created by workbench tune")
    spec = parse_spec(text, source=f"spec stored with study {name!r}")
    if args.storage:
        spec = dataclasses.replace(spec, storage=args.storage)
    return _finish(study, spec, resolve_target(spec, url), args, codes=[0])


def _finish(
    study: Any,
    spec: Any,
    target: Any,
    args: argparse.Namespace,
    *,
    codes: list[int],
    written: Path | None = None,
) -> int:
    """Report (files + terminal), then export and re-check if asked; a JSON line last.
    ``written``: the report folder the run just wrote and logged (not written twice)."""
    from workbench.tracking import runs_view_line
    from workbench.tuning import export, report, run_tree
    from workbench.tuning.study import PARENT_ATTR

    out_dir = written or _write_report(study, spec, args.out or report.default_dir(spec, target))
    report.print_report(study, spec, top=args.top, console=_console())
    parent_id = study.user_attrs.get(PARENT_ATTR)
    parent = (
        run_tree.ParentRun(target.tracking_uri, parent_id)
        if target.tracking_uri and parent_id
        else None
    )
    if parent is not None and written is None and out_dir is not None:
        # --report / study-report: the newest wins
        try:
            parent.log_artifacts(out_dir, "report")
        except Exception as err:
            log.warning("could not log the report to run %s: %s", parent_id, err)
    summary = report.summarize(study, spec)
    result: dict[str, Any] = {
        "study": spec.name,
        "best_trial": summary["best_trial"],
        "best_value": summary["best_value"],
        "best_params": summary["best_params"],
        "n_trials": summary["n_trials"],
        "states": summary["states"],
        "env_steps": summary["env_steps"],
        "report": str(out_dir) if out_dir else None,
        "parent_run_id": parent_id,
        "worker_exit_codes": codes,
    }
    if args.export is not None and summary["best_trial"] is not None:
        path = export.export_best(study, spec, Path(args.export) if args.export else None)
        result["preset"] = str(path)
        print(export.where_written(path), file=sys.stderr)
    if args.recheck:
        checked = export.recheck(
            study, spec, top_k=args.recheck, n_seeds=args.recheck_seeds, parent_run_id=parent_id
        )
        _print_recheck(checked)
        if out_dir is None:
            raise ConfigProblem("--recheck writes recheck.csv: pass --out DIR (writable)")
        with open(out_dir / "recheck.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(checked[0]) if checked else ["trial"])
            w.writeheader()
            w.writerows(checked)
        if parent is not None:
            parent.log_artifacts(out_dir, "report")
        result["recheck"] = checked
    if target.tracking_uri and (
        link := runs_view_line(target.tracking_uri, parent_id, target.tracking_dir)
    ):
        print(link, file=sys.stderr)
    print(json.dumps(result, default=str))
    return 0 if all(c == 0 for c in codes) else 1


def _write_report(study: Any, spec: Any, out_dir: Path) -> Path | None:
    """The report's files; None where the store is read-only (an archive): the terminal
    report and the JSON line still come, and --out writes the files elsewhere."""
    from workbench.tuning import report

    try:
        return report.write_report(study, spec, out_dir)
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        log.warning("cannot write the report to %s (%s); pass --out DIR", out_dir, err.strerror)
        return None


def _console() -> Any:
    from workbench import display

    return display.console()


def _print_recheck(rows: list[dict[str, Any]]) -> None:
    from workbench import display

    t = display.table("re-check on fresh seeds (the search winner is biased upward)")
    for col in ("trial", "search value", "fresh-seed value", "difference", "fresh seeds"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["trial"]),
            f"{r['search_value']:.2f}",
            f"{r['recheck_value']:.2f}",
            f"{r['recheck_value'] - r['search_value']:+.2f}",
            ",".join(map(str, r["recheck_seeds"])),
        )
    _console().print(t)


# ------------------------------------------------------------------------------ tune-bench


def cmd_tune_bench(args: argparse.Namespace) -> int:
    from workbench.tuning.study_bench import BenchSettings, run_bench

    for key in ("trials", "steps", "eval_every", "eval_episodes"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    settings = BenchSettings(
        spec=args.spec,
        trials=args.trials,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        sampler_seed=args.sampler_seed,
        pruner=args.pruner,
        pruner_args=json.loads(args.pruner_args) if args.pruner_args is not None else None,
        scaling_trials=args.scaling_trials,
        skip_scaling=args.skip_scaling,
        dir=args.dir,
    )
    print(json.dumps(run_bench(settings), indent=2))
    return 0
