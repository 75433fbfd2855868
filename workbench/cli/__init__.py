"""The ``workbench`` command.

    workbench train [hydra overrides]      train one run (or -m for a multirun sweep)
    workbench eval RUN_ID [--video PATH]   evaluate a logged policy
    workbench ui                           MLflow UI on the embedded store (127.0.0.1)
    workbench learning-check               the Pendulum learning benchmark (JSON)
    workbench tune SPEC [--workers K]      run/resume an Optuna study (see workbench.tuning)
    workbench study-report NAME            report on a study; tune-bench: its benchmark
    workbench ablate SPEC [--workers K]    variants x seeds, reported with robust statistics
    workbench compare [selection]          grouped metrics, differing params, curves
    workbench bench [hydra overrides]      update and end-to-end speed, next to SB3 (JSON)

``train`` hands its arguments to Hydra unchanged, so everything Hydra accepts works there
(``--cfg job``, ``--help``, ``-m``, ``+experiment=...``).

One module per command group, each with ``register(sub)`` (its arguments and ``handler``) and
thin handlers: check the arguments, call the library, print. No library module imports this
package.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from workbench.cli import ablate, bench, compare, learning_check, train, tune, ui
from workbench.cli import eval as eval_command
from workbench.logs import setup_logging

__all__ = ["build_parser", "main"]


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train.register(sub)
    eval_command.register(sub)
    ui.register(sub)
    learning_check.register(sub)
    ablate.register(sub)
    compare.register(sub)
    bench.register(sub)
    tune.register(sub)  # tune, study-report, tune-bench
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal or ssh session closed
        signal.signal(sig, _raise_interrupt)
    setup_logging()
    if argv and argv[0] == "train":
        try:
            return train.cmd_train(argv[1:])
        except KeyboardInterrupt:
            print("workbench: interrupted; the run was marked KILLED", file=sys.stderr)
            return 130
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"workbench: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"workbench: interrupted ({err or 'Ctrl-C'})", file=sys.stderr)
        return 130
