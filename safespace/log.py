"""Console messages: the "safespace" logger, whose lines read "[safespace] message" on stderr.

Every module logs through it (or a child, `logging.getLogger(__name__)`); stdout stays for results.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("safespace")


class _Stderr(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (a test's capture, a redirected console)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup() -> None:
    """Attach the console handler once; an application that configures logging itself may skip it."""
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[safespace] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def say(message: str) -> None:
    """One line of progress or news for the person at the console."""
    setup()
    logger.info(message)
