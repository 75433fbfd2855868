"""What the subcommands' parsers share: Hydra overrides taken anywhere among the options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that takes ``key=value`` overrides before, between and after its
    options. Plain argparse fills a ``nargs="*"`` positional in one run only, so
    ``tune SPEC --steps 2000 agent.tau=0.01`` would leave ``agent.tau=0.01`` unrecognized;
    here what is left over and looks like an override joins ``overrides``."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, rest = super().parse_known_args(args, namespace)
        if isinstance(getattr(namespace, "overrides", None), list):
            extra = [a for a in rest if _is_override(a)]
            if extra:
                namespace.overrides = [*namespace.overrides, *extra]
                rest = [a for a in rest if not _is_override(a)]
        return namespace, rest


def _is_override(arg: Any) -> bool:
    return isinstance(arg, str) and not arg.startswith("-") and "=" in arg
