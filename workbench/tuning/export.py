"""Export the best trial as a Hydra preset, and re-check the top trials on fresh seeds.

The preset pins the best trial's *resolved* config (every value, plus the group options it was
composed from), not just its sampled overrides: it then composes to exactly the trial's config
no matter which defaults or tuned files change later. Tracking and the progress display are
left out (where to log is the user's business); the seed is the trial's first seed.

The winner of a noisy search is biased upward (it won partly by luck); re-running the top k
on seeds the search never saw gives an honest estimate to put beside the search score.

Presets are written to the user's config folder (``config.user_conf_dir``, on Hydra's search
path), not into conf/: a new file in the checkout would mark every later run ``git.dirty``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from omegaconf import OmegaConf

from workbench.config import (
    Config,
    compose,
    conf_dir,
    search_path_overrides,
    to_dict,
    user_conf_dir,
)
from workbench.tracking import make_tracker, redact
from workbench.train import train
from workbench.tuning import run_tree as runs
from workbench.tuning.objective import aggregate, score_curve
from workbench.tuning.spec import StudySpec
from workbench.tuning.study import OVERRIDES, best_trial, completed

log = logging.getLogger(__name__)

PRESET_GROUPS = ("env", "agent", "noise", "schedule")
PRESET_EXCLUDED = ("tracking", "progress")


def compose_with_choices(overrides: Sequence[str]) -> tuple[Config, dict[str, str]]:
    """The composed config and the config-group options Hydra picked (noise -> ou, ...)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [*search_path_overrides(overrides), *overrides]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        raw = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(raw.hydra.runtime.choices, resolve=True)
    assert isinstance(choices, dict)
    return compose(overrides), {str(k): str(v) for k, v in choices.items() if v is not None}


def trial_overrides(spec: StudySpec, trial: optuna.trial.FrozenTrial) -> list[str]:
    """Everything a trial's first-seed run was composed from."""
    sampled = list(trial.user_attrs.get(OVERRIDES, []))
    return [*spec.base(), *spec.run_overrides(), *sampled, f"seed={spec.objective.seeds[0]}"]


def preset_tree(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in PRESET_EXCLUDED}


def default_preset_path(spec: StudySpec) -> Path:
    return user_conf_dir() / "experiment" / f"{spec.name}_best.yaml"


def export_best(study: optuna.Study, spec: StudySpec, out: Path | None = None) -> Path:
    """Write ``<user conf>/experiment/<study>_best.yaml`` (or ``out``); usable as
    ``+experiment=<study>_best``."""
    best = best_trial(study)
    if best is None:
        raise ValueError(f"study {spec.name!r} has no completed trial to export")
    cfg, choices = compose_with_choices(trial_overrides(spec, best))
    path = Path(out) if out is not None else default_preset_path(spec)
    header = [
        "# @package _global_",
        f"# Best trial of study {spec.name!r}: trial {best.number}, value {best.value:.4f}",
        f"# ({spec.objective.direction} {spec.objective.score} of {spec.objective.metric}, "
        f"seeds {list(spec.objective.seeds)}). Written {dt.date.today().isoformat()}.",
        f"# Sampled: {' '.join(best.user_attrs.get(OVERRIDES, [])) or '(none)'}",
        f"# Reproduce: workbench train +experiment={path.stem}",
    ]
    defaults = {"defaults": [{f"override /{g}": choices[g]} for g in PRESET_GROUPS if g in choices]}
    body = yaml.safe_dump(defaults, sort_keys=False) + "\n"
    body += yaml.safe_dump(preset_tree(cfg), sort_keys=False, default_flow_style=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(redact("\n".join(header) + "\n" + body))  # a base may name a store
    return path


def where_written(path: Path) -> str:
    """One line on where a preset went and how to use it, plainly: whether Hydra finds it as
    ``+experiment=<name>``, and whether it sits in the source tree (then later runs are
    tagged git.dirty until it is committed or removed)."""
    path = path.resolve()
    found = path.parent in (conf_dir() / "experiment", user_conf_dir() / "experiment")
    if found:
        text = f"best trial written to {path} (workbench train +experiment={path.stem})"
    else:
        text = (
            f"best trial written to {path}; Hydra finds presets only in "
            f"{user_conf_dir() / 'experiment'} or {conf_dir() / 'experiment'}: move it there "
            f"to use it as +experiment={path.stem}"
        )
    if _in_source_tree(path):
        text += (
            "; it is inside the source tree, so later runs are tagged git.dirty until it is "
            "committed or removed"
        )
    return text


def _in_source_tree(path: Path) -> bool:
    """Whether ``path`` lies in the checkout the code runs from and git does not ignore it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        path.relative_to(root)
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if top.returncode != 0:
            return False
        ignored = subprocess.run(
            ["git", "-C", str(root), "check-ignore", "-q", str(path)], timeout=10
        )
    except (ValueError, OSError, subprocess.SubprocessError):
        return False
    return ignored.returncode == 1  # 0: ignored, 1: not ignored


def recheck(
    study: optuna.Study,
    spec: StudySpec,
    *,
    top_k: int,
    n_seeds: int,
    parent_run_id: str | None = None,
    seed_offset: int = 1000,
) -> list[dict[str, Any]]:
    """Re-train the top ``top_k`` completed trials on ``n_seeds`` fresh seeds (no pruning)."""
    obj = spec.objective
    done = sorted(completed(study), key=lambda t: t.value, reverse=obj.direction == "maximize")[
        :top_k
    ]
    fresh = [max(obj.seeds) + seed_offset + i for i in range(n_seeds)]
    rows = []
    for t in done:
        base = trial_overrides(spec, t)[:-1]
        scores = []
        for s in fresh:
            cfg = compose([*base, f"seed={s}"])
            tracker = make_tracker(
                cfg.tracking,
                run_name=f"recheck-{runs.trial_run_name(t.number)}-s{s}",
                parent_run_id=parent_run_id,
            )
            tags = {
                runs.STUDY_TAG: spec.name,
                runs.TRIAL_TAG: str(t.number),
                runs.ROLE_TAG: "recheck",
            }
            result = train(cfg, tracker, tags=tags)
            scores.append(
                score_curve(result.eval_steps, result.eval_returns, obj.score, obj.k, obj.direction)
            )
        rows.append(
            {
                "trial": t.number,
                "search_value": t.value,
                "recheck_value": aggregate(scores, obj.aggregate),
                "recheck_seeds": fresh,
                "recheck_scores": scores,
            }
        )
    return rows
