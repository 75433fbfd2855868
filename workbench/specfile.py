"""What study and ablation specs share: one YAML loader and one problem collector.

PyYAML keeps the last of two equal keys without a word, which would silently drop a
variant or a search parameter; here it is an error naming the key and the line. A spec is
checked whole: every problem is collected (key, bad value, what is allowed) and reported at
once in one ``SpecError``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import ConfigProblem


class SpecError(ConfigProblem):
    """A spec is unusable; lists every problem (key, value, what is allowed)."""

    def __init__(self, problems: list[str] | str, source: str = "spec"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")


class Problems:
    """Collects a spec's problems, each as ``key=value: what is allowed``."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, key: str, value: Any, allowed: str) -> None:
        self.problems.append(f"{key}={value!r}: {allowed}")

    def unknown_keys(
        self, mapping: dict[Any, Any], allowed: Sequence[str], prefix: str = ""
    ) -> None:
        for key in mapping:
            if key not in allowed:
                self.fail(
                    f"{prefix}{key}", mapping[key], f"unknown key; allowed: {', '.join(allowed)}"
                )

    def check(self, source: str) -> None:
        """Raise SpecError listing every problem so far, if there is any."""
        if self.problems:
            raise SpecError(self.problems, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


class _DuplicateKey(Exception):
    pass


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # Keys are compared as the text they become (variant names, parameter names): ``1`` and
    # ``'1'`` are two keys to YAML but one name to us, so the second would silently win.
    seen: dict[str, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        name = str(key)
        if name in seen:
            first = seen[name]
            if first == key and type(first) is type(key):
                raise _DuplicateKey(f"duplicate key {key!r} (line {line})")
            raise _DuplicateKey(
                f"keys {first!r} and {key!r} (line {line}) collide: both name {name!r}"
            )
        if any(k == key for k in seen.values()):  # 1 and 1.0, true and 1: equal to Python
            first = next(k for k in seen.values() if k == key)
            raise _DuplicateKey(f"keys {first!r} and {key!r} (line {line}) collide")
        seen[name] = key
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """A spec's YAML text as a mapping; SpecError for bad YAML, a duplicate key or a non-mapping."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _DuplicateKey as err:
        raise SpecError(str(err), source) from None
    except yaml.YAMLError as err:
        raise SpecError(f"not valid YAML: {err}", source) from None
    if not isinstance(data, dict):
        raise SpecError(f"the file must be a mapping, got {type(data).__name__}", source)
    return data


def read_spec_text(path: str | Path, source: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file", source)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SpecError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
            "save it as UTF-8",
            source,
        ) from None


# What a study, trial or ablation name may be: it names files and folders (optuna/<name>.db,
# ablations/<name>/, <name>_best.yaml) and MLflow experiments, so nothing path-like ('..',
# '/', a leading '.' or '-') and nothing a shell or a URL would need quoted.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NAME_MAX = 100


def check_name(c: Problems, key: str, value: Any) -> bool:
    """Is ``value`` a safe name? Records a problem under ``key`` if not."""
    if isinstance(value, str) and NAME_PATTERN.match(value) and len(value) <= NAME_MAX:
        return True
    c.fail(
        key,
        value,
        f"must be a name of letters, digits, _ . - starting with a letter or digit, at most "
        f"{NAME_MAX} characters (it names files and MLflow experiments)",
    )
    return False


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    import math

    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_str(c: Problems, key: str, value: Any, *, empty: bool = False) -> bool:
    """Is ``value`` a string (non-empty unless ``empty``)? Records a problem if not."""
    if isinstance(value, str) and (empty or value.strip()):
        return True
    c.fail(key, value, "must be a string" if empty else "must be a non-empty string")
    return False


@dataclass(frozen=True)
class QuickLook:
    """A quick trial of a spec without copying it: fewer steps (and seeds), extra overrides
    of its base config. It runs under a name of its own (``<name>-quick-<steps>[-<hash>]``,
    in an experiment ``<experiment>-quick``), so it never mixes into the full study's
    storage or the full ablation's runs and report."""

    steps: int | None = None
    seeds: tuple[int, ...] | None = None
    overrides: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.steps is not None or self.seeds is not None or bool(self.overrides)

    def name(self, name: str) -> str:
        """The quick look's own name. Steps and overrides are in it (they change what a run
        learns); seeds are not, so a quick look with more seeds reuses the runs it has."""
        out = f"{name}-quick"
        if self.steps is not None:
            out += f"-{self.steps}"
        if self.overrides:
            digest = hashlib.sha256("\n".join(self.overrides).encode()).hexdigest()[:6]
            out += f"-{digest}"
        return out

    def describe(self) -> str:
        parts = [f"--steps {self.steps}"] if self.steps is not None else []
        if self.seeds is not None:
            parts.append(f"--seeds {','.join(map(str, self.seeds))}")
        parts.extend(self.overrides)
        return " ".join(parts)


# Lines of Hydra/OmegaConf errors that say nothing to the user of a spec file (or mislead:
# "use +agent.taux=1" only moves the error to validation).
_NOISE = re.compile(
    r"^(full_key:|reference_type=|object_type=|See https?://|To append to your config"
    r"|Set the environment variable HYDRA_FULL_ERROR)"
)
_UNKNOWN_KEY = re.compile(r"Key '[^']+' (?:not in '[^']+'|is not in struct)")
_MAX_LEN = 600


def _render(text: str) -> str:
    """One error message on one line; an indented list under a ``...:`` line becomes
    ``...: a, b, c``; Hydra's config search path is dropped."""
    segments: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or _NOISE.match(line):
            continue
        if line.startswith("Config search path"):
            break
        if raw[:1].isspace() and segments and segments[-1][0].endswith(":"):
            segments[-1][1].append(line)
        else:
            segments.append((line.rstrip("."), []))
    return "; ".join(f"{head} {', '.join(items)}" if items else head for head, items in segments)


def _allowed_keys(full_key: str) -> list[str] | None:
    """The schema keys next to ``full_key`` (``agent.taux`` -> the AgentConfig fields)."""
    import dataclasses

    from workbench.config import Config

    node: object = Config
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)}  # type: ignore[arg-type]
        factory = fields[part].default_factory if part in fields else None
        if not dataclasses.is_dataclass(factory):
            return None  # a free-form dict (env.kwargs): any key is allowed
        node = factory
    return sorted(f.name for f in dataclasses.fields(node))  # type: ignore[arg-type]


def compose_error_text(err: BaseException) -> str:
    """A failed Hydra composition on one line: the override, the reason Hydra keeps in
    ``__cause__`` (the wrong type, the unknown key, the missing option) and, for an unknown
    key, the keys allowed there."""
    parts: list[str] = []
    raw_texts: list[str] = []
    e: BaseException | None = err
    while e is not None and len(parts) < 4:
        raw_texts.append(str(e))
        text = _render(str(e)) or type(e).__name__
        if text not in parts:
            parts.append(text)
        e = e.__cause__
    message = ": ".join(parts)
    raw = "\n".join(raw_texts)
    full_key = re.findall(r"full_key: (\S+)", raw)
    if full_key and _UNKNOWN_KEY.search(raw):
        allowed = _allowed_keys(full_key[-1])
        if allowed:
            message += f"; allowed keys here: {', '.join(allowed)}"
    return message if len(message) <= _MAX_LEN else message[: _MAX_LEN - 3] + "..."
