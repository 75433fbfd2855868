"""Optuna studies over ``train()`` runs: specs, sampling, workers, MLflow run tree, reports.

Modules: ``spec`` (YAML specs, validation, sampling), ``components`` (sampler and pruner names
-> Optuna classes), ``study`` (samplers, pruners, storage, counting), ``objective`` (trial =
seeds x ``train()`` with a pruning hook), ``run_tree`` (the study's MLflow run tree),
``launch`` (launcher and worker loop), ``report``, ``export`` (best preset, fresh-seed
re-check), ``study_bench`` (pruning and worker-scaling benchmark). The commands
(``tune``, ``study-report``, ``tune-bench``) are in ``workbench.cli.tune``.
"""

from workbench.tuning.spec import SpecError, StudySpec, load_spec, parse_spec

__all__ = ["SpecError", "StudySpec", "load_spec", "parse_spec"]
