"""The Optuna samplers and pruners a study spec may name: the names, and name -> class.

The spec checks (``spec``) and the study plumbing (``study``) both read these tables, so
neither needs to import the other. Optuna is imported only when a class is looked up, so
loading a spec stays cheap.
"""

from __future__ import annotations

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "wilcoxon", "none")


def component_class(what: str, name: str) -> tuple[type, tuple[str, ...]]:
    """The Optuna class behind a sampler/pruner name, and the arguments we default ourselves."""
    import optuna

    s, p = optuna.samplers, optuna.pruners
    if what == "sampler":
        return {
            "tpe": (s.TPESampler, ("seed",)),
            "random": (s.RandomSampler, ("seed",)),
            "cmaes": (s.CmaEsSampler, ("seed",)),
            "gp": (s.GPSampler, ("seed",)),
            "qmc": (s.QMCSampler, ("seed",)),
        }[name]
    return {
        "median": (p.MedianPruner, ()),
        "percentile": (p.PercentilePruner, ()),
        "successive_halving": (p.SuccessiveHalvingPruner, ()),
        "hyperband": (p.HyperbandPruner, ()),
        "wilcoxon": (p.WilcoxonPruner, ()),
        "none": (p.NopPruner, ()),
    }[name]
