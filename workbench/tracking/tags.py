"""Every run tag name the project writes or reads, defined once, and the git tags of a run.

Runs are compared, grouped and found again by these names (``workbench compare --group-by``,
a re-run ablation finding its finished children, a resumed study its parent), so a name is
spelled in one place only. Optuna user attributes are not tags: they live in
``workbench.tuning.study``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.config import Config

# ----------------------------------------------------------------------------- MLflow's own

PARENT_TAG = "mlflow.parentRunId"  # nests a run under another in the MLflow UI
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
SOURCE_TYPE_TAG = "mlflow.source.type"
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_GIT_COMMIT_TAG = "mlflow.source.git.commit"
USER_TAG = "mlflow.user"

# ----------------------------------------------------------------------------- the code that ran

GIT_COMMIT_TAG = "git.commit"
GIT_DIRTY_TAG = "git.dirty"

# ----------------------------------------------------------------------------- every run

REASON_TAG = "workbench.status_reason"  # why a run ended as it did (or was reopened)
CONFIG_HASH_TAG = "workbench.config_hash"  # the config without the seed: group seeds by it
SEED_TAG = "workbench.seed"
DEVICE_TAG = "workbench.device"
ENV_ID_TAG = "workbench.env_id"
AGENT_TAG = "workbench.agent"
OVERRIDES_TAG = "workbench.overrides"  # the Hydra overrides the run was started with
SWEEP_TAG = "workbench.sweep"  # a Hydra multirun's folder
SWEEP_JOB_TAG = "workbench.sweep_job"
SWEEP_PARAMS_TAG = "workbench.sweep_params"  # a sweep job's values of the swept keys
CHECKPOINT_DIR_TAG = "workbench.checkpoint_dir"
RESUMED_AT_STEP_TAG = "workbench.resumed_at_step"
PROCESS_TAG = "workbench.process"  # host:pid training the run, to tell a dead one later
CHECK_TAG = "workbench.check"  # a run started by `workbench check`
BENCH_TAG = "workbench.bench"  # a run started by `workbench bench`

# ----------------------------------------------------------------------------- run trees

ROLE_TAG = "workbench.role"  # study | trial | seed | recheck (studies); parent | child (ablations)
STUDY_TAG = "workbench.study"
TRIAL_TAG = "workbench.trial"
TRIAL_STATE_TAG = "workbench.trial_state"  # running | complete | pruned | failed | interrupted
SAMPLED_TAG = "workbench.sampled"  # the overrides a trial's sampler chose
STORAGE_TAG = "workbench.storage"  # a study's Optuna storage (redacted)
BEST_TRIAL_TAG = "workbench.best_trial"
N_TRIALS_TAG = "workbench.n_trials"  # the count a study runs to now (--trials, or its spec)
ABLATION_TAG = "workbench.ablation"
VARIANT_TAG = "workbench.variant"
DESCRIPTION_TAG = "workbench.description"
IQM_TAG_PREFIX = "workbench.iqm."  # + variant: an ablation parent's "IQM [95% CI] (n=N)"
BEST_VARIANT_TAG = "workbench.best_variant"  # the ablation variant with the highest IQM


# ----------------------------------------------------------------------------- git


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_info(path: Path | None = None) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` of the code that ran; {} outside a git repository."""
    candidates = [path] if path is not None else [Path(__file__).resolve().parent, Path.cwd()]
    for where in candidates:
        if not where.is_dir():
            where = where.parent
        commit = _git(["rev-parse", "HEAD"], where)
        if not commit:
            continue
        status = _git(["status", "--porcelain"], where)
        return {
            GIT_COMMIT_TAG: commit.strip(),
            GIT_DIRTY_TAG: "true" if status is None or status.strip() else "false",
        }
    return {}


# MLflow's experiment-kind tag, set on every experiment workbench creates or uses (a kind the
# user set stays). MLflow 3.17.2's UI does not read it: what an experiment opens on follows the
# GenAI / Model training toggle, remembered per browser (``workbench ui`` prints links that
# open each experiment on its runs). The tag records the kind for the tools that do read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# ----------------------------------------------------------------------------- a training run


# The longest list of overrides a run name carries; past it the name carries a config hash.
MAX_NAME_OVERRIDES = 40


def run_name(cfg: Config, tags: Mapping[str, str] | None = None) -> str:
    """``tracking.run_name``, else ``<agent>-<env>-s<seed>`` and what the run's overrides
    change, shortened: ``ddpg-pendulum-s0-tau=0.01,actor_lr=3e-4``, or
    ``ddpg-pendulum-s0-3f9a2c`` (the config hash) when they do not fit. A sweep job's name
    carries the swept values only (``tags[SWEEP_PARAMS_TAG]``), a plain run's its overrides
    (``tags[OVERRIDES_TAG]``). ``MlflowTracker`` adds ``-2``, ``-3`` when a name is taken.
    """
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    tags = tags or {}
    base = f"{cfg.agent.name}-{cfg.env.name}-s{cfg.seed}"
    shown = name_overrides(tags.get(SWEEP_PARAMS_TAG, tags.get(OVERRIDES_TAG, "")))
    if not shown:
        return base
    if len(shown) > MAX_NAME_OVERRIDES:
        from workbench.config import config_hash

        return f"{base}-{config_hash(cfg)[:6]}"
    return f"{base}-{shown}"


def name_overrides(overrides: str) -> str:
    """The overrides that change what a run learns, as ``key=value`` with the key's last part,
    comma-joined. Left out: what the name already says (agent, env, seed), runtime keys
    (tracking, device, checkpoints, ...) and Hydra's own."""
    from workbench.config import is_runtime_key, override_key

    shown = []
    for item in overrides.split():
        if "=" not in item or item.startswith("~"):
            continue
        key, value = override_key(item), item.split("=", 1)[1]
        if key in ("agent", "env", "seed") or key.startswith("hydra") or is_runtime_key(key):
            continue
        shown.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ",".join(shown)


def run_tags(cfg: Config, device: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags of a training run: what groups and finds it, the code that ran, the user's."""
    from workbench.config import config_hash

    tags = {
        CONFIG_HASH_TAG: config_hash(cfg),
        SEED_TAG: str(cfg.seed),
        DEVICE_TAG: str(device),
        ENV_ID_TAG: cfg.env.id,
        AGENT_TAG: cfg.agent.name,
        **git_info(),
        **{k: str(v) for k, v in cfg.tracking.tags.items()},
    }
    tags.update(extra or {})
    return tags
