"""Logging set-up for the processes the workbench starts: the CLI, and the worker processes
it spawns (they start with logging unconfigured)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """INFO to stderr with timestamps; a no-op where logging is already configured."""
    logging.basicConfig(level=logging.INFO, format=FORMAT)
