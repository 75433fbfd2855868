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
(``--cfg job``, ``--help``, ``-m``, ``+experiment=...``), but for ``--debug``: that one, in
any command, shows the traceback of an error (as does WORKBENCH_DEBUG=1).

One module per command group, each with ``register(sub)`` (its arguments and ``handler``) and
thin handlers: check the arguments, call the library, print. No library module imports this
package.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from workbench.cli import ablate, bench, compare, learning_check, train, tune, ui
from workbench.cli import eval as eval_command
from workbench.cli.args import Parser, SubcommandParser
from workbench.errors import DEBUG_ENV, debug_requested, explain
from workbench.logs import setup_logging
from workbench.tracking.redact import redact

__all__ = ["build_parser", "main"]


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="workbench", description=__doc__.split("\n\n")[0])
    parser.add_argument(  # taken out of argv before parsing (see main): any position works
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
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
    """Run a command; every error it raises ends here as one ``workbench:`` line and a code
    (``workbench.errors``): 2 for the user's input, 1 for the machine, 130 for an interrupt.
    ``--debug`` (anywhere) or WORKBENCH_DEBUG=1 adds the traceback."""
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal or ssh session closed
        signal.signal(sig, _raise_interrupt)
    setup_logging()
    try:
        if argv and argv[0] == "train":
            return train.cmd_train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except KeyboardInterrupt as err:  # each run has said how it ended
        _say(f"workbench: interrupted ({err or 'Ctrl-C'})")
        return 130
    except Exception as err:
        if debug:  # asked for, and still without credentials
            print(redact("".join(traceback.format_exception(err))), end="", file=sys.stderr)
        code, line = explain(err)
        _say(f"workbench: {line}")
        return code


def _say(line: str) -> None:
    """The last line, to a terminal that may be gone (SIGHUP): the code still tells."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)
