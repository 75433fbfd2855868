"""Optuna studies over ``train()`` runs: specs, sampling, workers, MLflow run tree, reports.

Modules: ``spec`` (YAML specs, validation, sampling), ``study`` (samplers, pruners, storage,
counting), ``objective`` (trial = seeds x ``train()`` with a pruning hook), ``runs`` (the MLflow
run tree), ``runner`` (launcher and worker loop), ``report``, ``export`` (best preset,
fresh-seed re-check), ``commands`` (CLI), ``bench`` (benchmark).
"""

from workbench.tuning.spec import SpecError, StudySpec, load_spec, parse_spec

__all__ = ["SpecError", "StudySpec", "load_spec", "parse_spec"]
