"""Ablation experiments: variants x seeds, run in worker processes, reported with robust stats.

A spec (YAML, e.g. ``studies/ablations/td3_components.yaml``) names a base experiment, a
baseline and variants as Hydra overrides. ``workbench ablate SPEC --workers K`` runs every
variant x seed as a child of one parent MLflow run, skipping runs already FINISHED in MLflow
(same config hash and seed, so a re-run resumes and redoes only failed or killed ones), then
reports IQM, bootstrap CIs, probability of improvement and Mann-Whitney U against the
baseline: in the terminal, as markdown + CSV, and as figures on the parent run.

A worker trains its runs as populations (``train_population``: one program, one batched
update) of up to ``--population K`` runs that share every ``population.SHARED_KEYS`` value;
K=1 (the default) is one run at a time through the same code. Each member is the child run
it would be alone, equal to it to float rounding (``ddpg``).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from workbench import stats
from workbench.checkpoint import CheckpointError, prepare_resume
from workbench.config import ConfigError, TrackingConfig, compose, config_hash
from workbench.errors import Interrupted
from workbench.parallel import (
    RAY_JOB_TAG,
    RAY_NODE_TAG,
    RAY_TASK_TAG,
    live,
    placement_tags,
    run_units,
    unit_ended,
)
from workbench.population import shared_values
from workbench.specfile import (
    Problems,
    QuickLook,
    check_name,
    check_str,
    compose_error_text,
    is_int,
    parse_yaml,
    read_spec_text,
)
from workbench.tracking import (
    ParentRun,
    RunRecord,
    describe_experiment,
    ends_run,
    metric_history,
    probe_store,
    resolve_uri,
    search_runs,
)
from workbench.tracking.status import ABANDONED_REASON
from workbench.tracking.tags import (
    ABLATION_TAG,
    BEST_VARIANT_TAG,
    CONFIG_HASH_TAG,
    DESCRIPTION_TAG,
    IQM_TAG_PREFIX,
    REASON_TAG,
    ROLE_TAG,
    SEED_TAG,
    VARIANT_TAG,
)

log = logging.getLogger(__name__)

SCORE_METRIC = "eval/final_return_mean"
CURVE_METRIC = "eval/return_mean"
_SPEC_KEYS = {"name", "description", "base", "baseline", "variants", "seeds", "steps", "tracking"}
_TRACKING_KEYS = {"experiment", "uri", "dir"}


@dataclass
class AblationSpec:
    name: str
    base: list[str]
    baseline: str
    variants: dict[str, list[str]]
    seeds: list[int]
    steps: int | None = None
    description: str = ""
    experiment: str = ""
    tracking_uri: str | None = None
    tracking_dir: str = "mlruns"
    path: Path | None = None

    def overrides(self, variant: str, seed: int) -> list[str]:
        steps = [f"total_steps={self.steps}"] if self.steps else []
        return [
            *self.base,
            *self.variants[variant],
            *steps,
            f"seed={seed}",
            "progress=false",
            f"tracking.experiment={self.experiment}",
            f"tracking.dir={self.tracking_dir}",
            *([f"tracking.uri={self.tracking_uri}"] if self.tracking_uri else []),
        ]

    def as_params(self) -> dict[str, str]:
        params = {
            "ablation.name": self.name,
            "ablation.base": " ".join(self.base),
            "ablation.baseline": self.baseline,
            "ablation.seeds": ",".join(map(str, self.seeds)),
            "ablation.steps": str(self.steps),
        }
        params.update({f"variant.{k}": " ".join(v) or "(base)" for k, v in self.variants.items()})
        return params


def _str_list(value: Any, where: str, c: Problems) -> list[str]:
    """Hydra overrides: a list of strings, or one string of them separated by spaces."""
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    c.fail(where, value, "must be a list of Hydra overrides (strings like 'agent.tau=0.01')")
    return []


def load_spec(path: str | Path, quick: QuickLook | None = None) -> AblationSpec:
    """Read and validate a spec; every variant x seed config is composed and validated here,
    so a typo fails in seconds, before any run exists. Every problem is reported at once.

    ``quick``: a quick look at the spec (``QuickLook``): its own name and experiment, the
    steps and seeds given, its overrides appended to the base."""
    path = Path(path)
    source = f"ablation spec {path}"
    if quick:
        source += f" (quick look: {quick.describe()})"
    data = parse_yaml(read_spec_text(path, source), source)
    c = Problems()
    c.unknown_keys(data, sorted(_SPEC_KEYS))
    for key in ("name", "baseline", "variants", "seeds"):
        if key not in data:
            c.fail(key, None, "missing required key")
    c.check(source)
    name = data["name"]
    check_name(c, "name", name)
    description = data.get("description", "")
    if description is not None:
        check_str(c, "description", description, empty=True)
    variants_raw = data["variants"]
    variants: dict[str, list[str]] = {}
    if not isinstance(variants_raw, dict) or len(variants_raw) < 2:
        c.fail("variants", variants_raw, "must map at least two variant names to overrides")
    else:
        for key, value in variants_raw.items():
            # a variant's name names its runs (<variant>-s<seed>) and rows of the report
            key = _as_name(key)
            if check_name(c, f"variants.{key}", key):
                variants[key] = _str_list(value, f"variants.{key}", c)
    baseline = _as_name(data["baseline"])
    if not isinstance(baseline, str):
        c.fail("baseline", baseline, "must be the name of one of the variants")
    elif variants and baseline not in variants:
        c.fail("baseline", baseline, f"must be one of the variants ({', '.join(variants)})")
    seeds = _seeds(data["seeds"], "seeds", c)
    steps = data.get("steps")
    if steps is not None and (not is_int(steps) or steps < 1):
        c.fail("steps", steps, "must be an integer >= 1 (env steps per run)")
    tracking = data.get("tracking") or {}
    if not isinstance(tracking, dict):
        c.fail("tracking", tracking, "must be a mapping (experiment, uri, dir)")
        tracking = {}
    c.unknown_keys(tracking, sorted(_TRACKING_KEYS), "tracking.")
    for key in sorted(_TRACKING_KEYS):
        if tracking.get(key) is not None:
            check_str(c, f"tracking.{key}", tracking[key])
    base = _str_list(data.get("base"), "base", c)
    c.check(source)
    experiment = tracking.get("experiment") or f"ablation-{name}"
    if quick:
        name, experiment = quick.name(name), f"{experiment}-quick"
        check_name(c, "name", name)  # still a name when it carries the quick look's suffix
        steps = quick.steps or steps
        seeds = list(quick.seeds) if quick.seeds is not None else seeds
        base = [*base, *quick.overrides]
    c.check(source)
    spec = AblationSpec(
        name=name,
        base=base,
        baseline=baseline,
        variants=variants,
        seeds=seeds,
        steps=steps,
        description=description or "",
        experiment=experiment,
        tracking_uri=tracking.get("uri"),
        tracking_dir=tracking.get("dir") or "mlruns",
        path=path,
    )
    by_problem: dict[str, list[str]] = {}  # a problem of the base is every variant's
    for variant in spec.variants:
        try:
            compose(spec.overrides(variant, spec.seeds[0]))
        except ConfigError as err:
            for problem in err.problems:
                by_problem.setdefault(problem, []).append(variant)
        except Exception as err:  # Hydra: unknown group option, bad override syntax, ...
            c.fail(
                f"variants.{variant}",
                spec.variants[variant],
                f"variant {variant!r}: overrides do not compose: {compose_error_text(err)}",
            )
    for problem, names in by_problem.items():
        if len(names) == len(spec.variants) > 1:
            c.problems.append(f"every variant: {problem}")
        else:
            c.problems.append(
                f"variant{'s' * (len(names) > 1)} {', '.join(map(repr, names))}: {problem}"
            )
    c.check(source)
    return spec


def _as_name(key: Any) -> Any:
    """A number written as a name (``1:``, ``baseline: 0.5``) is that name's text: the YAML
    loader already refused two keys that become the same text."""
    return str(key) if isinstance(key, int | float) and not isinstance(key, bool) else key


def _seeds(value: Any, key: str, c: Problems) -> list[int]:
    """A count (seeds 0..n-1) or a list of distinct seeds >= 0."""
    if is_int(value) and value >= 1:
        return list(range(value))
    if not isinstance(value, list) or not value or not all(is_int(s) for s in value):
        c.fail(key, value, "must be a count >= 1 or a list of ints")
    elif len(set(value)) != len(value) or min(value) < 0:
        c.fail(key, value, "must be distinct integers >= 0")
    else:
        return list(value)
    return []


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Job:
    variant: str
    seed: int
    overrides: tuple[str, ...]
    config_hash: str
    resume: str | None = None  # an unfinished run of this variant and seed to continue


def plan(spec: AblationSpec) -> list[Job]:
    jobs = []
    for variant in spec.variants:
        for seed in spec.seeds:
            overrides = spec.overrides(variant, seed)
            cfg = compose(overrides, validate_config=False)
            jobs.append(Job(variant, seed, tuple(overrides), config_hash(cfg)))
    return jobs


Unit = tuple[Job, ...]  # what a worker trains at once: K jobs as one population (K >= 1)


def group_jobs(jobs: Sequence[Job], population: int) -> list[Unit]:
    """The jobs as units of work: populations of at most ``population`` jobs that share
    every ``population.SHARED_KEYS`` value (a job that continues a run from its checkpoint
    too); with ``population`` 1, each job alone. A group larger than ``population`` is split
    into chunks of near-equal size, in plan order. Units come in plan order of their first
    job.
    """
    if population < 1:
        raise ValueError(f"population={population}: must be >= 1")
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        cfg = compose(list(job.overrides), validate_config=False)
        groups.setdefault(shared_values(cfg), []).append(job)
    units = []
    for group in groups.values():
        n = math.ceil(len(group) / population)
        units += [
            tuple(group[int(m)] for m in chunk) for chunk in np.array_split(range(len(group)), n)
        ]
    order = {job: i for i, job in enumerate(jobs)}
    return sorted(units, key=lambda unit: order[unit[0]])


def _names(jobs: Sequence[Job]) -> str:
    return ", ".join(f"{j.variant} seed {j.seed}" for j in jobs)


def run_jobs(units: Sequence[Unit], ablation: str, parent_run_id: str | None) -> int:
    """One worker process (or Ray task): its share of the grid, one unit (K runs as one
    program) after another; 1 where a run failed, else 0 (for the driver's count).

    A failing run is logged and ends FAILED in MLflow (train_population sees to that); the
    worker goes on with its next unit. Ctrl-C: each run writes a checkpoint at its next
    episode boundary and ends KILLED, then this worker stops. MLflow is the record of what
    finished.
    """
    from workbench.logs import Countdown, setup_logging

    setup_logging()
    total = sum(len(unit) for unit in units)
    countdown, done, any_failed = Countdown(total), 0, False
    for unit in units:
        span = f"{done + 1}" if len(unit) == 1 else f"{done + 1}-{done + len(unit)}"
        log.info("run %s/%d of this process: %s", span, total, _names(unit))
        failed = _run_unit(unit, ablation, parent_run_id)
        unit_ended(failed)
        any_failed |= failed
        done += len(unit)
        log.info("%s: ended [%s of this process]", _names(unit), countdown.update(done))
    return int(any_failed)


def _run_unit(jobs: Unit, ablation: str, parent_run_id: str | None) -> bool:
    """The jobs as one population; each member is the child run its job would be alone, and
    a job with an unfinished run continues it from its latest checkpoint. True where a run
    failed."""
    from workbench.tracking import make_tracker
    from workbench.train import Member, train_population

    jobs = _take_over_lost_attempt(jobs)
    members = []
    for job in jobs:
        cfg, state = compose(list(job.overrides)), None
        if job.resume is not None:
            try:
                cfg, state = prepare_resume(compose([*job.overrides, f"resume={job.resume}"]), ())
            except CheckpointError as err:
                log.warning(
                    "%s seed %d: run %s cannot be continued (%s); starting afresh",
                    job.variant,
                    job.seed,
                    job.resume,
                    err,
                )
        tracker = make_tracker(
            cfg.tracking,
            run_name=f"{job.variant}-s{job.seed}",
            parent_run_id=parent_run_id,
            resume_run_id=cfg.resume,
        )
        tags = {
            ABLATION_TAG: ablation,
            VARIANT_TAG: job.variant,
            ROLE_TAG: "child",
            **placement_tags(),  # a Ray task's job, task and node; none locally
        }
        members.append(Member(cfg, tracker=tracker, tags=tags, resume_state=state))
    if len(jobs) > 1:
        log.info("training %d runs as one population: %s", len(jobs), _names(jobs))
    try:
        train_population(members, handle_signals=True)
    except Exception as err:  # of the population as a whole: its runs have ended FAILED
        log.error("%s failed: %s", _names(jobs), err)
        return True
    interrupted, failed = None, False
    for job, member in zip(jobs, members, strict=True):
        if isinstance(member.error, Interrupted):
            interrupted = member.error
        elif member.error is not None:
            log.error("%s seed %d failed: %s", job.variant, job.seed, member.error)
            failed = True
    if interrupted is not None:
        raise interrupted  # Ctrl-C: this worker stops
    return failed


def _take_over_lost_attempt(jobs: Unit) -> Unit:
    """In a Ray task's retry: end FAILED the runs its lost attempt left RUNNING (the node
    died, taking the process with it) and continue each from its latest checkpoint where
    one can be read here (a shared checkpoint folder), else start it afresh."""
    task = placement_tags().get(RAY_TASK_TAG)
    if not task:
        return jobs
    from workbench.tracking import RunHandle

    tracking = compose(list(jobs[0].overrides), validate_config=False).tracking
    if tracking.backend == "none":
        return jobs
    uri = resolve_uri(tracking.uri, tracking.dir)
    lost = search_runs(
        uri,
        experiments=[tracking.experiment],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{RAY_TASK_TAG}` = '{task}'",
    )
    out = list(jobs)
    for run in lost:
        reason = (
            f"{ABANDONED_REASON}: its Ray task's attempt on node "
            f"{run.tags.get(RAY_NODE_TAG, '?')} was lost (node or worker died); Ray retried "
            f"it on node {placement_tags().get(RAY_NODE_TAG, '?')}"
        )
        RunHandle(uri, run.run_id).end("FAILED", reason)
        log.warning("run %s (%s): %s", run.run_id, run.run_name, reason)
        for i, job in enumerate(out):
            if (job.config_hash, str(job.seed)) == _key(run):
                out[i] = dataclasses.replace(job, resume=run.run_id)
    return tuple(out)


def _run_jobs(
    jobs: Sequence[Job],
    ablation: str,
    parent_run_id: str | None,
    workers: int,
    population: int = 1,
    cluster: Any = None,
) -> None:
    """The grid over ``workers`` processes (the study runner's pool): the units of
    ``group_jobs``, each to the worker with the fewest runs so far (round robin when every
    unit is one run). On a Ray ``cluster`` each unit is a task of its own, and Ray queues
    what does not fit."""
    units = group_jobs(jobs, population)
    k = len(units) if cluster is not None else max(1, min(workers, len(units)))
    if population > 1:
        log.info(
            "%d population(s) and %d single run(s) over %d worker process(es)",
            sum(len(u) > 1 for u in units),
            sum(len(u) == 1 for u in units),
            k,
        )
    shares: list[list[Unit]] = [[] for _ in range(k)]
    load = [0] * k
    for unit in units:
        w = load.index(min(load))
        shares[w].append(unit)
        load[w] += len(unit)
    if not units:
        return
    from workbench.logs import Countdown

    resources = None
    if cluster is not None:
        resources = [
            cluster.resources_of(compose(list(s[0][0].overrides), validate_config=False))
            for s in shares
        ]

    countdown = Countdown(len(units))

    def describe(done: int, running: int | None, failed: int) -> str:
        if running is not None:  # a worker that ended its last unit may not have exited yet
            running = min(running, len(units) - done)
        runs = sum(len(u) for u in units)
        what = "cells" if runs == len(units) else f"units ({runs} runs)"
        return (
            f"{done}/{len(units)} {what} done, {live(running, len(units) - done)}, "
            f"{failed} failed [{countdown.update(done)}]"
        )

    run_units(
        run_jobs,
        [(s, ablation, parent_run_id) for s in shares],
        name=f"ablation-{ablation}" if cluster is not None else "ablation",
        cluster=cluster,
        resources=resources,
        describe=describe,
    )


def _end_lost_runs(uri: str, spec: AblationSpec, job_id: str, status: str, reason: str) -> None:
    """End the children this driver's Ray tasks left RUNNING once the tasks are over (a node
    lost more often than Ray retries, a task killed after Ctrl-C)."""
    from workbench.tracking import RunHandle

    running = search_runs(
        uri,
        experiments=[spec.experiment],
        filter_string=f"{_children_filter(spec)} and attributes.status = 'RUNNING' "
        f"and tags.`{RAY_JOB_TAG}` = '{job_id}'",
    )
    for run in running:
        RunHandle(uri, run.run_id).end(status, reason)
        log.warning(
            "run %s (%s) was left RUNNING: ended %s: %s", run.run_id, run.run_name, status, reason
        )


def _finished_children(uri: str, spec: AblationSpec) -> list[RunRecord]:
    return search_runs(
        uri,
        experiments=[spec.experiment],
        filter_string=(
            f"tags.`{ABLATION_TAG}` = '{spec.name}' and tags.`{ROLE_TAG}` = 'child' "
            "and attributes.status = 'FINISHED'"
        ),
    )


def _children_filter(spec: AblationSpec) -> str:
    return f"tags.`{ABLATION_TAG}` = '{spec.name}' and tags.`{ROLE_TAG}` = 'child'"


def _end_abandoned_children(spec: AblationSpec) -> None:
    """End FAILED ("abandoned") the children left RUNNING by a worker that died (``kill -9``,
    out of memory): ``run.end_abandoned_runs``, by the lock each run holds while it trains."""
    from workbench.run import end_abandoned_runs

    roots = {
        compose(spec.overrides(v, spec.seeds[0]), validate_config=False).checkpoint.dir
        for v in spec.variants
    }
    end_abandoned_runs(
        TrackingConfig(uri=spec.tracking_uri, dir=spec.tracking_dir, experiment=spec.experiment),
        sorted(roots),
        filter_string=_children_filter(spec),
        by="`workbench ablate`",
    )


def _unfinished_children(uri: str, spec: AblationSpec) -> dict[tuple[str | None, str | None], str]:
    """The newest KILLED or abandoned (ended FAILED "abandoned", or RUNNING where nothing
    here can tell) child per config hash and seed: a run a worker can continue from its
    checkpoint instead of starting over."""
    runs = search_runs(
        uri,
        experiments=[spec.experiment],
        filter_string=_children_filter(spec),
    )
    newest: dict[tuple[str | None, str | None], str] = {}
    for run in runs:  # MLflow lists the newest first
        abandoned = run.tags.get(REASON_TAG, "").startswith(ABANDONED_REASON)
        if run.status in ("KILLED", "RUNNING") or (run.status == "FAILED" and abandoned):
            newest.setdefault(_key(run), run.run_id)
    return newest


def _key(run: RunRecord) -> tuple[str | None, str | None]:
    return run.tags.get(CONFIG_HASH_TAG), run.tags.get(SEED_TAG)


def _parent_run(uri: str, spec: AblationSpec) -> RunRecord | None:
    try:
        found = search_runs(
            uri,
            experiments=[spec.experiment],
            filter_string=f"tags.`{ABLATION_TAG}` = '{spec.name}' and tags.`{ROLE_TAG}` = 'parent'",
        )
    except ValueError:  # the experiment does not exist yet
        return None
    return found[0] if found else None


@dataclass
class AblationResult:
    spec: AblationSpec
    parent_run_id: str | None
    ran: int
    skipped: int
    failed: list[Job]
    scores: dict[str, list[float]]  # variant -> final eval return per seed
    curves: dict[str, tuple[list[int], np.ndarray, np.ndarray, np.ndarray]]
    finished: set[tuple[str | None, str | None]] = field(default_factory=set)
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def run_ablation(
    spec: AblationSpec,
    *,
    workers: int = 1,
    population: int = 1,
    out_dir: Path | None = None,
    run: bool = True,
    cluster: Any = None,
) -> AblationResult:
    """Run what is missing (unless ``run`` is False), then report over what is finished.

    ``population``: train up to that many runs of one shape as one program
    (``group_jobs``). ``cluster``: a ``workbench.cluster.RayCluster`` to run the units on
    instead of local worker processes."""
    uri = resolve_uri(spec.tracking_uri, spec.tracking_dir)
    if cluster is not None:
        cluster.require_shared_stores(tracking_uri=uri)
        # the tasks' nodes see the store the driver sees, whatever their environment says
        spec = dataclasses.replace(spec, tracking_uri=uri)
    # One quick request first: MLflow's own client retries an unreachable server for minutes.
    probe_store(uri, spec.experiment)
    existing = _parent_run(uri, spec)
    parent = ParentRun.open(
        TrackingConfig(uri=spec.tracking_uri, dir=spec.tracking_dir, experiment=spec.experiment),
        run_name=f"ablation-{spec.name}",
        existing=existing.run_id if existing else None,
        params=spec.as_params(),
        tags={ABLATION_TAG: spec.name, ROLE_TAG: "parent", DESCRIPTION_TAG: spec.description},
    )
    if problem := describe_experiment(uri, parent.run_id, spec.description):
        log.warning("could not set the experiment's description: %s", problem)
    with ends_run(parent, reason=_parent_reason) as ending:
        if spec.path is not None:
            parent.log_artifact(spec.path, "spec")
        jobs = plan(spec)
        _end_abandoned_children(spec)  # a worker killed last time left them RUNNING
        done = {_key(r) for r in _finished_children(uri, spec)}
        unfinished = _unfinished_children(uri, spec)
        todo = [
            dataclasses.replace(j, resume=unfinished.get((j.config_hash, str(j.seed))))
            for j in jobs
            if (j.config_hash, str(j.seed)) not in done
        ]
        log.info(
            "ablation %s: %d runs, %d already finished, %d to run (%d to continue from a "
            "checkpoint where one is left) with %d worker(s), populations of up to %d",
            spec.name,
            len(jobs),
            len(jobs) - len(todo),
            len(todo) if run else 0,
            sum(j.resume is not None for j in todo) if run else 0,
            workers,
            population,
        )
        if run:
            try:
                _run_jobs(todo, spec.name, parent.run_id, workers, population, cluster)
            except KeyboardInterrupt:
                if cluster is not None:
                    _end_lost_runs(uri, spec, cluster.job_id, "KILLED", "interrupted (Ctrl-C)")
                raise
            if cluster is not None:
                _end_lost_runs(
                    uri,
                    spec,
                    cluster.job_id,
                    "FAILED",
                    f"{ABANDONED_REASON}: its Ray task ended without ending the run (node "
                    "lost more often than Ray retries, or its worker died)",
                )
            _end_abandoned_children(spec)  # a worker that died now: its runs end here
        else:
            todo = []
        result = _collect(uri, spec, jobs)
        failed = [j for j in todo if (j.config_hash, str(j.seed)) not in result.finished]
        result.parent_run_id = parent.run_id
        result.ran, result.skipped, result.failed = len(todo), len(jobs) - len(todo), failed
        _report(result, parent, out_dir or Path(spec.tracking_dir) / "ablations" / spec.name)
        if failed:
            ending.set("FAILED", f"{len(failed)} of {len(todo)} runs failed; re-run to redo them")
    return result


def _parent_reason(err: BaseException) -> str:
    """Why the parent run ended early, Ctrl-C included: the exception, named by its type."""
    return f"{type(err).__name__}: {err}"


def _collect(uri: str, spec: AblationSpec, jobs: Sequence[Job]) -> AblationResult:
    wanted = {(j.config_hash, str(j.seed)): j for j in jobs}
    by_variant: dict[str, list[RunRecord]] = {v: [] for v in spec.variants}
    finished = _finished_children(uri, spec)
    for run in finished:
        job = wanted.get(_key(run))
        if job is not None and SCORE_METRIC in run.metrics:
            by_variant[job.variant].append(run)
    scores: dict[str, list[float]] = {}
    curves = {}
    for variant, runs in by_variant.items():
        # one run per seed: the latest, if a seed was (re)run more than once
        latest = {r.tags.get(SEED_TAG): r for r in runs}
        scores[variant] = [r.metrics[SCORE_METRIC] for r in latest.values()]
        histories = [dict(metric_history(uri, r.run_id, CURVE_METRIC)) for r in latest.values()]
        steps = sorted({s for h in histories for s in h})
        if steps:
            matrix = np.array([[h.get(s, math.nan) for s in steps] for h in histories])
            curves[variant] = (steps, *stats.curve_band(matrix, "iqm"))
    return AblationResult(spec, None, 0, 0, [], scores, curves, {_key(r) for r in finished})


# ----------------------------------------------------------------------------- report


def _rows(result: AblationResult) -> list[dict[str, Any]]:
    spec = result.spec
    base_scores = result.scores.get(spec.baseline, [])
    rows = []
    for variant, scores in result.scores.items():
        s = stats.summarize(scores)
        row: dict[str, Any] = {
            "variant": variant,
            "n": s.n,
            "iqm": s.iqm,
            "iqm_ci_low": s.ci.get("iqm", (math.nan, math.nan))[0],
            "iqm_ci_high": s.ci.get("iqm", (math.nan, math.nan))[1],
            "mean": s.mean,
            "median": s.median,
            "std": s.std,
        }
        if variant == spec.baseline:
            row.update(p_improvement=math.nan, poi_ci_low=math.nan, poi_ci_high=math.nan)
            row.update(mwu_p=math.nan, verdict="baseline")
        else:
            c = stats.compare_to_baseline(scores, base_scores)
            row.update(
                p_improvement=c.p_improvement,
                poi_ci_low=c.p_improvement_ci[0],
                poi_ci_high=c.p_improvement_ci[1],
                mwu_p=c.p_value,
                verdict=c.verdict,
            )
        rows.append(row)
    return rows


def _f(x: float, d: int = 1) -> str:
    return "-" if not isinstance(x, float | int) or not math.isfinite(x) else f"{x:.{d}f}"


def _g(x: float) -> str:
    """A return for the terminal table: no decimal from 1000 on (keeps 80 columns)."""
    return _f(x, 0 if isinstance(x, float | int) and abs(x) >= 1000 else 1)


def _markdown(result: AblationResult, rows: list[dict[str, Any]]) -> str:
    spec = result.spec
    lines = [
        f"# Ablation: {spec.name}",
        "",
        spec.description,
        "",
        f"Base: `{' '.join(spec.base) or '(defaults)'}`; steps: {spec.steps or 'from config'}; "
        f"seeds: {len(spec.seeds)}; baseline: **{spec.baseline}**; score: final evaluation "
        "return (deterministic policy).",
        "",
        "| variant | runs | IQM [95% CI] | mean ± std | median | P(better than baseline) [95% CI]"
        " | Mann-Whitney p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['n']} | {_f(r['iqm'])} [{_f(r['iqm_ci_low'])}, "
            f"{_f(r['iqm_ci_high'])}] | {_f(r['mean'])} ± {_f(r['std'])} | {_f(r['median'])} | "
            f"{_f(r['p_improvement'], 2)} [{_f(r['poi_ci_low'], 2)}, {_f(r['poi_ci_high'], 2)}] |"
            f" {_f(r['mwu_p'], 3)} | {r['verdict']} |"
        )
    lines += [
        "",
        "IQM: interquartile mean over seeds; CIs: percentile bootstrap over seeds.",
        "P(better): probability that a run of the variant beats a run of the baseline.",
        "",
        "![IQM per variant](iqm.png)",
        "",
        "![Learning curves](curves.png)",
        "",
    ]
    return "\n".join(lines)


def _html(result: AblationResult, rows: list[dict[str, Any]], figures: dict[str, Path]) -> str:
    """The report as one HTML file with its figures inside (base64): MLflow's artifact viewer
    shows HTML with its images, while it shows markdown as plain text, image links included."""
    spec = result.spec
    head = (
        "variant",
        "runs",
        "IQM [95% CI]",
        "mean ± std",
        "median",
        "P(better than baseline) [95% CI]",
        "Mann-Whitney p",
        "verdict",
    )
    body = [
        (
            r["variant"],
            str(r["n"]),
            f"{_f(r['iqm'])} [{_f(r['iqm_ci_low'])}, {_f(r['iqm_ci_high'])}]",
            f"{_f(r['mean'])} ± {_f(r['std'])}",
            _f(r["median"]),
            f"{_f(r['p_improvement'], 2)} [{_f(r['poi_ci_low'], 2)}, {_f(r['poi_ci_high'], 2)}]",
            _f(r["mwu_p"], 3),
            r["verdict"],
        )
        for r in rows
    ]

    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values)

    images = "".join(
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode("ascii")}"></figure>'
        for alt, path in figures.items()
    )
    base = " ".join(spec.base) or "(defaults)"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>Ablation: {html.escape(spec.name)}</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:60em}"
        "table{border-collapse:collapse;font-size:.9em}"
        "td,th{border:1px solid #ccc;padding:.3em .6em}"
        "td:nth-child(n+2){text-align:right}img{max-width:100%}"
        "</style></head><body>"
        f"<h1>Ablation: {html.escape(spec.name)}</h1>"
        f"<p>{html.escape(spec.description)}</p>"
        f"<p>Base: <code>{html.escape(base)}</code>; steps: {spec.steps or 'from config'}; "
        f"seeds: {len(spec.seeds)}; baseline: <b>{html.escape(spec.baseline)}</b>; score: final "
        "evaluation return (deterministic policy).</p>"
        f"<table><tr>{cells('th', head)}</tr>"
        + "".join(f"<tr>{cells('td', row)}</tr>" for row in body)
        + "</table><p>IQM: interquartile mean over seeds; CIs: percentile bootstrap over seeds. "
        "P(better): probability that a run of the variant beats a run of the baseline.</p>"
        f"{images}</body></html>\n"
    )


def print_table(result: AblationResult, rows: list[dict[str, Any]], console: Console) -> None:
    """The summary table, then each variant's verdict on a line of its own (a verdict is a
    sentence: as a column it squeezes the numbers). Fits 80 columns; ``mean ± std`` shows
    from 100."""
    from workbench.display import table as make_table

    wide = console.width >= 100
    table = make_table(f"ablation {result.spec.name}: final eval return over seeds")
    table.add_column("variant", no_wrap=True)
    for col in ("runs", "IQM [95% CI]", *(["mean ± std"] if wide else []), "P(better) [95% CI]"):
        table.add_column(col, justify="right")
    table.add_column("MWU p", justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["variant"],
            str(r["n"]),
            f"{_g(r['iqm'])} [{_g(r['iqm_ci_low'])}, {_g(r['iqm_ci_high'])}]",
            *([f"{_g(r['mean'])} ± {_g(r['std'])}"] if wide else []),
            f"{_f(r['p_improvement'], 2)} [{_f(r['poi_ci_low'], 2)}, {_f(r['poi_ci_high'], 2)}]",
            _f(r["mwu_p"], 3),
        )
    console.print(table)
    for r in rows:
        console.print(f"  {r['variant']}: {r['verdict']}", highlight=False)


def _report(result: AblationResult, parent: ParentRun, out_dir: Path) -> None:
    from workbench import plots

    rows = _rows(result)
    result.rows = rows
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
        "csv": out_dir / "summary.csv",
        "iqm": out_dir / "iqm.png",
        "curves": out_dir / "curves.png",
    }
    files["markdown"].write_text(_markdown(result, rows))
    with files["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = plots.interval_estimates(
        [(r["variant"], r["iqm"], r["iqm_ci_low"], r["iqm_ci_high"]) for r in rows],
        title=f"{result.spec.name}: final eval return",
        baseline=result.spec.baseline,
    )
    fig.savefig(files["iqm"], dpi=120)
    fig = plots.curves_with_bands(result.curves, title=f"{result.spec.name}: eval return")
    fig.savefig(files["curves"], dpi=120)
    import matplotlib.pyplot as plt

    plt.close("all")
    figures = {"IQM per variant": files["iqm"], "Learning curves": files["curves"]}
    files["html"].write_text(_html(result, rows, figures))
    result.files = files
    for path in files.values():
        parent.log_artifact(path, "report")
    # The variants side by side in one chart of the parent run (MLflow draws a chart per
    # metric, so IQMs as metrics would be one chart per variant); stepped by the number of
    # runs it covers, so a re-run with more seeds shows next to the earlier one.
    parent.log_image(files["iqm"], "ablation/iqm", step=sum(r["n"] for r in rows))
    parent.set_tags({f"{IQM_TAG_PREFIX}{r['variant']}": _iqm_text(r) for r in rows})
    best = max((r for r in rows if math.isfinite(r["iqm"])), key=lambda r: r["iqm"], default=None)
    if best is not None:
        parent.log_metrics({"ablation/best_iqm": best["iqm"]}, step=0)
        parent.set_tags({BEST_VARIANT_TAG: best["variant"]})


def _iqm_text(row: dict[str, Any]) -> str:
    return f"{_f(row['iqm'])} [{_f(row['iqm_ci_low'])}, {_f(row['iqm_ci_high'])}] (n={row['n']})"
