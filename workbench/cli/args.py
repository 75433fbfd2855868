"""The command line's parsers: a bad argument is one ``workbench:`` line like every error, and
Hydra overrides are taken anywhere among a subcommand's options."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``workbench:`` line (exit 2) like every error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("workbench").strip()
        where = f"{command}: " if command else ""
        print(f"workbench: {where}{message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class SubcommandParser(Parser):
    """A subcommand's parser that takes ``key=value`` overrides before, between and after its
    options. Plain argparse fills a ``nargs="*"`` positional in one run only, so
    ``tune SPEC --steps 2000 agent.tau=0.01`` would leave ``agent.tau=0.01`` unrecognized;
    here what is left over and looks like an override joins ``overrides``."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, rest = super().parse_known_args(args, namespace)
        if getattr(namespace, "ray_gpus", None) is not None and namespace.ray is None:
            self.error(f"--ray-gpus {namespace.ray_gpus:g}: only with --ray")
        if isinstance(getattr(namespace, "overrides", None), list):
            extra = [a for a in rest if _is_override(a)]
            if extra:
                namespace.overrides = [*namespace.overrides, *extra]
                rest = [a for a in rest if not _is_override(a)]
        return namespace, rest


def _is_override(arg: Any) -> bool:
    return isinstance(arg, str) and not arg.startswith("-") and "=" in arg


def add_ray_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--ray [ADDRESS]``: the same command, its work placed on a Ray cluster."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=f"run {what} as Ray tasks: on the cluster at ADDRESS (auto, HEAD:6379, "
        "ray://HEAD:10001), or on a local Ray when none is given; needs the extra "
        "(pip install -e '.[ray]')",
    )
    p.add_argument(
        "--ray-gpus",
        type=_gpu_share,
        default=None,
        metavar="SHARE",
        help="with --ray, the part of a GPU each task that trains on CUDA asks for "
        "(default 1: a GPU each; 0.25 packs four on one GPU)",
    )


def _gpu_share(text: str) -> float:
    from workbench.errors import ConfigProblem
    from workbench.parallel import parse_gpu_share

    try:
        return parse_gpu_share(text, "--ray-gpus")
    except ConfigProblem as err:
        # argparse names the option itself: "argument --ray-gpus: '2': must be ..."
        raise argparse.ArgumentTypeError(str(err).removeprefix("--ray-gpus=")) from None


@contextlib.contextmanager
def ray_cluster(address: str | None, gpus: float | None = None) -> Iterator[Any]:
    """The Ray cluster ``--ray`` asked for (None without it: Ray is then not imported),
    disconnected at the end; ``gpus``: ``--ray-gpus``."""
    if address is None:
        yield None
        return
    from workbench.errors import ConfigProblem

    try:
        from workbench import cluster
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ConfigProblem(f"--ray needs Ray ({err}): pip install -e '.[ray]'") from None
    try:
        import ray  # noqa: F401
    except ImportError as err:
        raise ConfigProblem(f"--ray needs Ray ({err}): pip install -e '.[ray]'") from None
    connected = cluster.connect(address or None, 1.0 if gpus is None else gpus)
    try:
        yield connected
    finally:
        connected.shutdown()
