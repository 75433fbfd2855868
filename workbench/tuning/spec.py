"""Study specs (``studies/*.yaml``): dataclasses, validation at load, and search-space sampling.

A spec is checked completely when it is loaded — every problem at once, each naming the key,
the bad value and what is allowed — so a typo never costs a trial, a storage or an MLflow run.
Search-space parameters are named by the Hydra override they become: a config group
(``noise``, ``schedule``: the value picks the group option) or a dotted config key
(``agent.tau``). A trial's config is therefore just ``compose([*base, *sampled])``, and any key
of the schema can be searched.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workbench.config import Config, ConfigError, compose, conf_dir, preset_names
from workbench.specfile import (
    Problems,
    QuickLook,
    SpecError,
    check_name,
    check_str,
    compose_error_text,
    is_int,
    is_number,
    parse_yaml,
    read_spec_text,
)
from workbench.tuning.components import PRUNERS, SAMPLERS, component_class

GROUPS = ("env", "agent", "noise", "schedule", "tracking")
PARAM_TYPES = ("float", "int", "categorical")
METRICS = ("eval/return_mean",)
DIRECTIONS = ("maximize", "minimize")
SCORES = ("final", "last_k", "best", "auc")
AGGREGATES = ("mean", "iqm")
_TOP_KEYS = (
    "name",
    "description",
    "base",
    "steps",
    "eval_every",
    "objective",
    "space",
    "sampler",
    "pruner",
    "n_trials",
    "timeout",
    "enqueue_base",
    "storage",
    "tracking",
    "heartbeat",
)


@dataclass(frozen=True)
class ParamSpec:
    """One search dimension; active only when every ``when`` condition holds."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def is_group(self) -> bool:
        return "." not in self.name

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(k, _MISSING) in allowed for k, allowed in self.when)


_MISSING = object()


@dataclass(frozen=True)
class ObjectiveSpec:
    metric: str = "eval/return_mean"
    direction: str = "maximize"
    score: str = "last_k"  # final | last_k | best | auc
    k: int = 3
    seeds: tuple[int, ...] = (0,)
    aggregate: str = "mean"  # mean | iqm


@dataclass(frozen=True)
class StudySpec:
    name: str
    base_preset: str | None
    base_overrides: tuple[str, ...]
    steps: int
    eval_every: int | None
    objective: ObjectiveSpec
    space: tuple[ParamSpec, ...]
    sampler: str = "tpe"
    sampler_args: Mapping[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    pruner_args: Mapping[str, Any] = field(default_factory=dict)
    n_trials: int | None = None
    timeout: float | None = None
    enqueue_base: bool = True
    storage: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None
    heartbeat_interval: int = 10
    grace_period: int = 60
    description: str = ""
    text: str = ""  # the YAML as written, logged as an artifact and kept with the study

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"study-{self.name}"

    def base(self) -> list[str]:
        """Overrides of the base experiment: the preset first, then the spec's own."""
        pre = [f"+experiment={self.base_preset}"] if self.base_preset else []
        return [*pre, *self.base_overrides]

    def run_overrides(self) -> list[str]:
        """What every trial run sets on top of the base: length, eval schedule, quiet, MLflow."""
        out = [f"total_steps={self.steps}", "progress=false", "eval.video=false"]
        if self.eval_every is not None:
            out.append(f"eval.every={self.eval_every}")
        out.append(f"tracking.experiment={_quote(self.experiment_name)}")
        if self.tracking_uri:
            out.append(f"tracking.uri={_quote(self.tracking_uri)}")
        return out


# ----------------------------------------------------------------------------- sampling


def format_value(value: Any) -> str:
    """A Python value as Hydra override syntax (``1e-05``, ``null``, ``[64,64]``, ``'a b'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return _quote(str(value))


def _quote(text: str) -> str:
    if re.fullmatch(r"[\w.\-/:+]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def choice_key(value: Any) -> Any:
    """Optuna stores only scalars: lists become their override text (``[64,64]``)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return format_value(value)


def sample(trial: Any, space: Sequence[ParamSpec]) -> dict[str, Any]:
    """Suggest every active parameter, in spec order, so conditions see earlier values."""
    values: dict[str, Any] = {}
    for p in space:
        if not p.active(values):
            continue
        if p.type == "float":
            assert p.low is not None and p.high is not None
            values[p.name] = trial.suggest_float(
                p.name, p.low, p.high, log=p.log, step=p.step if not p.log else None
            )
        elif p.type == "int":
            assert p.low is not None and p.high is not None
            values[p.name] = trial.suggest_int(
                p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1)
            )
        else:
            keys = {choice_key(c): c for c in p.choices}
            picked = trial.suggest_categorical(p.name, list(keys))
            values[p.name] = keys[picked]
    return values


def to_overrides(values: Mapping[str, Any]) -> list[str]:
    return [f"{name}={format_value(v)}" for name, v in values.items()]


def stored_params(space: Sequence[ParamSpec], params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's stored params (list choices as text) back to the values they stand for."""
    out: dict[str, Any] = {}
    by_name = {p.name: p for p in space}
    for name, value in params.items():
        p = by_name.get(name)
        if p is not None and p.type == "categorical":
            value = {choice_key(c): c for c in p.choices}.get(value, value)
        out[name] = value
    return out


# ----------------------------------------------------------------------------- loading


def load_spec(path: str | Path, quick: QuickLook | None = None) -> StudySpec:
    """Read and validate a spec file; SpecError lists every problem. With ``quick``, the
    spec of a quick look at it (``quick_look_text``)."""
    source = f"study spec {path}"
    text = read_spec_text(path, source)
    if quick:
        text = quick_look_text(text, quick, source)
        source += f" (quick look: {quick.describe()})"
    return parse_spec(text, source=source)


def quick_look_text(text: str, quick: QuickLook, source: str) -> str:
    """The spec of a quick look, as YAML text (stored with its study like any spec, so that
    ``study-report`` and a resume see what it ran): its own name and experiment, ``steps``
    replaced, ``overrides`` appended to the base. A value the change would hit that is not of
    its type is left as it is, for ``parse_spec`` to name."""
    raw = parse_yaml(text, source)
    name = raw.get("name")
    tracking = raw.get("tracking") or {}
    if isinstance(name, str) and isinstance(tracking, dict):
        experiment = tracking.get("experiment") or f"study-{name}"
        raw["name"] = quick.name(name)
        raw["tracking"] = {**tracking, "experiment": f"{experiment}-quick"}
    if quick.steps is not None:
        raw["steps"] = quick.steps
    base = raw.get("base") or {}
    if quick.overrides and isinstance(base, dict):
        overrides = base.get("overrides") or []
        if isinstance(overrides, list):
            raw["base"] = {**base, "overrides": [*overrides, *quick.overrides]}
    header = f"# quick look ({quick.describe()}) at {source}\n"
    return header + yaml.safe_dump(raw, sort_keys=False)


def parse_spec(text: str, *, source: str = "study spec") -> StudySpec:
    raw = parse_yaml(text, source)
    c = Problems()
    spec = _build(raw, text, c)
    c.check(source)
    assert spec is not None
    _check_against_config(spec, c)
    c.check(source)
    return spec


_num, _int = is_number, is_int


def _build(raw: dict[str, Any], text: str, c: Problems) -> StudySpec | None:
    c.unknown_keys(raw, _TOP_KEYS)

    name = raw.get("name")
    check_name(c, "name", name)
    description = raw.get("description", "")
    if description is not None:
        check_str(c, "description", description, empty=True)

    base = raw.get("base") or {}
    preset, overrides = None, ()
    if not isinstance(base, dict):
        c.fail("base", base, "must be a mapping with preset and/or overrides")
    else:
        c.unknown_keys(base, ("preset", "overrides"), "base.")
        preset = base.get("preset")
        if preset is not None:
            presets = preset_names()  # conf/'s and the exported ones
            if preset not in presets:
                c.fail("base.preset", preset, f"must be one of {', '.join(presets)}")
        ov = base.get("overrides") or []
        if not isinstance(ov, list) or not all(isinstance(o, str) and "=" in o for o in ov):
            c.fail("base.overrides", ov, "must be a list of Hydra overrides like 'agent.tau=0.01'")
        else:
            overrides = tuple(ov)

    steps = raw.get("steps")
    if not _int(steps) or steps < 1:
        c.fail("steps", steps, "must be an integer >= 1 (env steps per trial run)")
    eval_every = raw.get("eval_every")
    if eval_every is not None and (not _int(eval_every) or eval_every < 1):
        c.fail("eval_every", eval_every, "must be an integer >= 1 or absent")

    objective = _objective(raw.get("objective") or {}, c)
    space = _space(raw.get("space"), c)

    sampler, sampler_args = _component(raw.get("sampler", "tpe"), "sampler", SAMPLERS, c)
    pruner, pruner_args = _component(raw.get("pruner", "median"), "pruner", PRUNERS, c)

    n_trials, timeout = raw.get("n_trials"), raw.get("timeout")
    if n_trials is not None and (not _int(n_trials) or n_trials < 1):
        c.fail("n_trials", n_trials, "must be an integer >= 1")
    if timeout is not None and (not _num(timeout) or timeout <= 0):
        c.fail("timeout", timeout, "must be a number of seconds > 0")
    if n_trials is None and timeout is None:
        c.fail("n_trials", None, "give n_trials and/or timeout, or the study never ends")

    enqueue = raw.get("enqueue_base", True)
    if not isinstance(enqueue, bool):
        c.fail("enqueue_base", enqueue, "must be true or false")
    storage = raw.get("storage")
    if storage is not None and not (
        isinstance(storage, str) and re.match(r"^[A-Za-z][\w+.\-]*://", storage)
    ):
        # a mistyped URL may still hold a password: show only what follows its '@'
        shown = f"***@{storage.rsplit('@', 1)[1]}" if "@" in str(storage) else storage
        c.fail("storage", shown, "must be a storage URL (sqlite:///..., postgresql://...)")

    tracking = raw.get("tracking") or {}
    experiment = tracking_uri = None
    if not isinstance(tracking, dict):
        c.fail("tracking", tracking, "must be a mapping with experiment and/or uri")
    else:
        c.unknown_keys(tracking, ("experiment", "uri"), "tracking.")
        experiment, tracking_uri = tracking.get("experiment"), tracking.get("uri")
        for key, v in (("experiment", experiment), ("uri", tracking_uri)):
            if v is not None and (not isinstance(v, str) or not v):
                c.fail(f"tracking.{key}", v, "must be a non-empty string")

    hb = raw.get("heartbeat") or {}
    interval, grace = 10, 60
    if not isinstance(hb, dict):
        c.fail("heartbeat", hb, "must be a mapping with interval and grace_period (seconds)")
    else:
        c.unknown_keys(hb, ("interval", "grace_period"), "heartbeat.")
        interval, grace = hb.get("interval", 10), hb.get("grace_period", 60)
        if not _int(interval) or interval < 1:
            c.fail("heartbeat.interval", interval, "must be an integer >= 1 (seconds)")
        elif not _int(grace) or grace <= interval:
            c.fail("heartbeat.grace_period", grace, f"must be an integer > interval ({interval})")

    if c.problems or objective is None or space is None:
        return None
    return StudySpec(
        name=name,
        base_preset=preset,
        base_overrides=overrides,
        steps=steps,
        eval_every=eval_every,
        objective=objective,
        space=space,
        sampler=sampler,
        sampler_args=sampler_args,
        pruner=pruner,
        pruner_args=pruner_args,
        n_trials=n_trials,
        timeout=float(timeout) if timeout is not None else None,
        enqueue_base=enqueue,
        storage=storage,
        experiment=experiment,
        tracking_uri=tracking_uri,
        heartbeat_interval=interval,
        grace_period=grace,
        description=description or "",
        text=text,
    )


def _objective(raw: Any, c: Problems) -> ObjectiveSpec | None:
    if not isinstance(raw, dict):
        c.fail("objective", raw, "must be a mapping (metric, direction, score, k, seeds, ...)")
        return None
    c.unknown_keys(raw, ("metric", "direction", "score", "k", "seeds", "aggregate"), "objective.")
    d = ObjectiveSpec()
    metric = raw.get("metric", d.metric)
    direction = raw.get("direction", d.direction)
    score = raw.get("score", d.score)
    k = raw.get("k", d.k)
    aggregate = raw.get("aggregate", d.aggregate)
    seeds_raw = raw.get("seeds", 1)
    for key, value, options in (
        ("metric", metric, METRICS),
        ("direction", direction, DIRECTIONS),
        ("score", score, SCORES),
        ("aggregate", aggregate, AGGREGATES),
    ):
        if value not in options:
            c.fail(f"objective.{key}", value, f"must be one of {', '.join(options)}")
    if not _int(k) or k < 1:
        c.fail("objective.k", k, "must be an integer >= 1 (evaluations averaged by last_k)")
    seeds: tuple[int, ...] = ()
    if _int(seeds_raw) and seeds_raw >= 1:
        seeds = tuple(range(seeds_raw))
    elif (
        isinstance(seeds_raw, list)
        and seeds_raw
        and all(_int(s) and s >= 0 for s in seeds_raw)
        and len(set(seeds_raw)) == len(seeds_raw)
    ):
        seeds = tuple(seeds_raw)
    else:
        c.fail(
            "objective.seeds",
            seeds_raw,
            "must be a count >= 1 or a list of distinct seeds >= 0",
        )
    return ObjectiveSpec(metric, direction, score, k, seeds, aggregate)


def _space(raw: Any, c: Problems) -> tuple[ParamSpec, ...] | None:
    if not isinstance(raw, dict) or not raw:
        c.fail("space", raw, "must be a non-empty mapping of parameter -> definition")
        return None
    params: list[ParamSpec] = []
    seen: dict[str, ParamSpec] = {}
    for name, d in raw.items():
        key = f"space.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", name):
            c.fail(key, name, "must be a config group (noise) or a dotted config key (agent.tau)")
            continue
        if not isinstance(d, dict):
            c.fail(key, d, "must be a mapping with type and its range or choices")
            continue
        c.unknown_keys(d, ("type", "low", "high", "log", "step", "choices", "when"), f"{key}.")
        n_before = len(c.problems)
        _check_path(name, c)
        ptype = d.get("type")
        if ptype not in PARAM_TYPES:
            c.fail(f"{key}.type", ptype, f"must be one of {', '.join(PARAM_TYPES)}")
            continue
        low, high, log, step = d.get("low"), d.get("high"), d.get("log", False), d.get("step")
        choices: tuple[Any, ...] = ()
        if ptype in ("float", "int"):
            is_ok = _int if ptype == "int" else _num
            what = "an integer" if ptype == "int" else "a finite number"
            if not is_ok(low):
                c.fail(f"{key}.low", low, f"must be {what}")
            if not is_ok(high):
                c.fail(f"{key}.high", high, f"must be {what}")
            if is_ok(low) and is_ok(high) and not low < high:
                c.fail(f"{key}.low", low, f"must be < high ({high})")
            if not isinstance(log, bool):
                c.fail(f"{key}.log", log, "must be true or false")
            elif log and is_ok(low) and low <= 0:
                c.fail(f"{key}.low", low, "must be > 0 when log is true")
            if step is not None:
                if not is_ok(step) or step <= 0:
                    c.fail(f"{key}.step", step, f"must be {what} > 0")
                elif log:
                    c.fail(f"{key}.step", step, "cannot be combined with log: true")
            if "choices" in d:
                c.fail(f"{key}.choices", d["choices"], f"not used by type {ptype}")
            if name in GROUPS:
                c.fail(key, ptype, f"{name} is a config group: use type categorical")
        else:
            raw_choices = d.get("choices")
            if not isinstance(raw_choices, list) or not raw_choices:
                c.fail(f"{key}.choices", raw_choices, "must be a non-empty list")
            elif not all(_is_choice(x) for x in raw_choices):
                c.fail(
                    f"{key}.choices",
                    raw_choices,
                    "each choice must be a number, string, true/false, null or a list of them",
                )
            else:
                keys = [choice_key(x) for x in raw_choices]
                if len(set(map(repr, keys))) != len(keys):
                    c.fail(f"{key}.choices", raw_choices, "must not repeat a value")
                choices = tuple(raw_choices)
            for k in ("low", "high", "log", "step"):
                if k in d:
                    c.fail(f"{key}.{k}", d[k], "not used by type categorical (use choices)")
        when = _when(key, d.get("when"), seen, c)
        if len(c.problems) > n_before:
            continue
        p = ParamSpec(
            name=name,
            type=ptype,
            low=float(low) if ptype == "float" else low,
            high=float(high) if ptype == "float" else high,
            log=log,
            step=step,
            choices=choices,
            when=when,
        )
        params.append(p)
        seen[name] = p
    return tuple(params)


def _is_scalar(x: Any) -> bool:
    return x is None or isinstance(x, bool | str) or is_number(x)


def _is_choice(x: Any) -> bool:
    return _is_scalar(x) or (isinstance(x, list) and all(_is_scalar(v) for v in x))


def _when(
    key: str, raw: Any, seen: Mapping[str, ParamSpec], c: Problems
) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        c.fail(f"{key}.when", raw, "must map an earlier parameter to a value or list of values")
        return ()
    out = []
    for other, values in raw.items():
        allowed = values if isinstance(values, list) else [values]
        ref = seen.get(other)
        if ref is None:
            earlier = ", ".join(seen) or "(none)"
            c.fail(f"{key}.when.{other}", values, f"must name an earlier parameter: {earlier}")
            continue
        if ref.type == "float":
            c.fail(
                f"{key}.when.{other}",
                values,
                f"{other} is a float parameter, which never equals a given value: "
                "condition on a categorical or int parameter",
            )
            continue
        if ref.type == "categorical":
            bad = [v for v in allowed if choice_key(v) not in {choice_key(x) for x in ref.choices}]
            if bad:
                options = ", ".join(map(str, ref.choices))
                c.fail(f"{key}.when.{other}", values, f"values must be among {options}")
                continue
        out.append((other, tuple(allowed)))
    return tuple(out)


def _component(
    raw: Any, what: str, options: tuple[str, ...], c: Problems
) -> tuple[str, dict[str, Any]]:
    """``sampler: tpe`` or ``sampler: {name: tpe, seed: 0, ...}``; kwargs checked against the
    Optuna class's signature so a misspelt option fails at load."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        c.fail(what, raw, f"must be a name ({', '.join(options)}) or a mapping with name")
        return "", {}
    name = raw["name"]
    args = {k: v for k, v in raw.items() if k != "name"}
    if name not in options:
        c.fail(f"{what}.name", name, f"must be one of {', '.join(options)}")
        return name, args
    cls, _ = component_class(what, name)
    params = inspect.signature(cls).parameters
    accepted = sorted(k for k in params if k != "self")
    n_before = len(c.problems)
    for key, value in args.items():
        if key not in accepted:
            allowed = ", ".join(accepted) or "(none)"
            c.fail(f"{what}.{key}", value, f"not an option of {name}; allowed: {allowed}")
            continue
        kinds = _option_kinds(params[key].annotation)
        given = [k for k in kinds if k in _OPTION_CHECKS]
        if not any(_OPTION_CHECKS[k](value) for k in given):
            objects = ", ".join(k for k in kinds if k not in _OPTION_CHECKS)
            if given:
                allowed = f"must be {' or '.join(_OPTION_WORDS[k] for k in given)}"
                allowed += f" (a {objects} cannot be given in a spec)" if objects else ""
            else:
                allowed = f"takes a {objects}, which a spec cannot give"
            c.fail(f"{what}.{key}", value, f"{allowed}; an option of {name}")
        elif (
            is_int(value) and value < 0 and is_int(default := params[key].default) and default >= 0
        ):
            # counts and step numbers (n_startup_trials, n_warmup_steps): Optuna takes -3
            c.fail(f"{what}.{key}", value, f"must be an integer >= 0; an option of {name}")
    if len(c.problems) == n_before:
        _construct(what, name, cls, args, c)
    return name, args


# What a YAML value may be for an Optuna option, by the annotation's type names.
_OPTION_CHECKS = {
    "None": lambda v: v is None,
    "bool": lambda v: isinstance(v, bool),
    "int": is_int,
    "float": is_number,
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}
_OPTION_WORDS = {
    "None": "null",
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "dict": "a mapping",
    "list": "a list",
}


def _option_kinds(annotation: Any) -> list[str]:
    """``'int | None'`` (Optuna's annotations are often strings) or ``int | None`` as
    ``['int', 'None']``; a type a spec cannot give (``Callable[...]``, ``BaseSampler``) keeps
    its own name. No annotation: anything goes."""
    if annotation is inspect.Parameter.empty:
        return list(_OPTION_CHECKS)
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    kinds, depth, part = [], 0, ""
    for ch in text + "|":  # split on the '|' outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            kinds.append(part.strip())
            part = ""
        else:
            part += ch
    out = []
    for kind in kinds:
        kind = kind.split("[", 1)[0].rsplit(".", 1)[-1]
        out.append({"NoneType": "None", "Dict": "dict", "List": "list"}.get(kind, kind))
    return out


def _construct(what: str, name: str, cls: type, args: Mapping[str, Any], c: Problems) -> None:
    """Build the sampler/pruner once, so that Optuna's own value checks (a negative count,
    a percentile above 100) fail at load, before any storage exists."""
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = dict(args)
            if cls is optuna.pruners.PercentilePruner:
                kwargs.setdefault("percentile", 25.0)  # as make_pruner defaults it
            cls(**kwargs)
    except (ValueError, TypeError) as err:
        c.fail(what, {"name": name, **args}, f"Optuna refuses these options: {err}")
    except ImportError as err:  # e.g. cmaes or scipy missing
        c.fail(f"{what}.name", name, f"cannot be used here: {err}")


# ----------------------------------------------------------------------------- config checks


def _check_path(name: str, c: Problems) -> bool:
    """Is ``name`` a group with options on disk, or a key of the Config schema?"""
    key = f"space.{name}"
    if "." not in name:
        if name not in GROUPS:
            c.fail(key, name, f"not a config group; groups: {', '.join(GROUPS)}")
            return False
        return True
    node: Any = Config
    parts = name.split(".")
    for i, part in enumerate(parts):
        if node is None:  # below a leaf or a free-form dict (env.kwargs): compose decides
            return True
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            c.fail(key, name, f"unknown config key; keys under {where}: {', '.join(fields)}")
            return False
        factory = fields[part].default_factory
        node = factory if dataclasses.is_dataclass(factory) else None
    return True


def _check_against_config(spec: StudySpec, c: Problems) -> None:
    """The base composes and validates; every space key exists; group options exist."""
    try:
        compose([*spec.base(), *spec.run_overrides()])
    except ConfigError as err:
        for p in err.problems:
            c.problems.append(f"base: {p}")
        return
    except Exception as err:
        c.fail(
            "base.overrides",
            list(spec.base_overrides),
            f"do not compose: {compose_error_text(err)}",
        )
        return
    for p in spec.space:
        if p.is_group:
            options = sorted(x.stem for x in (conf_dir() / p.name).glob("*.yaml"))
            bad = [x for x in p.choices if x not in options]
            if bad:
                c.fail(f"space.{p.name}.choices", list(p.choices), f"options: {', '.join(options)}")
    if c.problems:
        return
    # One point with every parameter set (low / first choice): types and paths compose.
    point = {p.name: p.low if p.type != "categorical" else p.choices[0] for p in spec.space}
    if any(p.type == "int" for p in spec.space):
        point = {
            k: (int(v) if next(p for p in spec.space if p.name == k).type == "int" else v)
            for k, v in point.items()
        }
    try:
        compose([*spec.base(), *spec.run_overrides(), *to_overrides(point)], validate_config=False)
    except Exception as err:
        c.fail("space", point, f"the sampled values do not compose: {compose_error_text(err)}")


class _Corner:
    """A stand-in for an Optuna trial that picks one corner of the search space: every number
    at its low end or at its highest reachable value, and choice ``choice`` (wrapping) of
    every categorical."""

    def __init__(self, high: bool, choice: int):
        self.high, self.choice = high, choice

    def suggest_float(
        self, name: str, low: float, high: float, *, log: bool = False, step: float | None = None
    ) -> float:
        if not self.high:
            return low
        if step:  # Optuna's largest grid point: low + k * step <= high
            return low + math.floor((high - low) / step + 1e-9) * step
        return high

    def suggest_int(
        self, name: str, low: int, high: int, *, log: bool = False, step: int = 1
    ) -> int:
        return low + (high - low) // step * step if self.high else low

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[self.choice % len(choices)]


def check_ranges(spec: StudySpec, *, source: str = "study spec") -> None:
    """Raise SpecError if a trial could draw a value the config rejects (``agent.gamma`` up to
    1.5, ``agent.batch_size`` above the buffer). Checked at corners of the space: every choice
    of the categoricals, each with all numbers at their lows and at their highs, conditions
    applied as a trial applies them (so a parameter is only checked where it is active).

    Separate from ``parse_spec`` because it gates *running* trials: a spec stored with an
    existing study must still load for a report.
    """
    n_choices = max([1, *(len(p.choices) for p in spec.space)])
    c = Problems()
    for choice in range(n_choices):
        for high in (False, True):
            point = sample(_Corner(high, choice), spec.space)
            try:
                compose([*spec.base(), *spec.run_overrides(), *to_overrides(point)])
            except ConfigError as err:
                for problem in err.problems:
                    text = _range_problem(spec, point, problem, high)
                    if text not in c.problems:
                        c.problems.append(text)
            except Exception as err:  # parse_spec composed one such point already
                c.fail(
                    "space", point, f"the sampled values do not compose: {compose_error_text(err)}"
                )
    if c.problems:
        raise SpecError(c.problems, source)


def _range_problem(spec: StudySpec, point: Mapping[str, Any], problem: str, high: bool) -> str:
    """``space.<key>.<low|high|choices>=<as written>: ...``, naming the parameter at fault."""
    key = re.split(r"[=:]", problem, maxsplit=1)[0].strip()
    param = next((p for p in spec.space if p.name == key), None)
    if param is None:  # a rule between keys, e.g. an exponential schedule and noise.sigma
        where, value = "space", dict(point)
    elif param.type == "categorical":
        where, value = f"space.{key}.choices", list(param.choices)
    else:
        where, value = (
            f"space.{key}.{'high' if high else 'low'}",
            (param.high if high else param.low),
        )
    return f"{where}={value!r}: a trial can draw a value the config rejects: {problem}"
