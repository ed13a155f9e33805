"""Showing devicemem's log lines: the ``[MEMORY]`` plan and what each call decided.

Every module logs under the ``devicemem`` logger (bayesDREAM_ext under
``devicemem.bayesdream``), and Python shows nothing below WARNING unless someone configures
logging. Two ways to see the lines, one for a session and one for a call:

- :func:`log_to_stderr` (``devicemem.log_to_stderr()``): from now on, lines at ``level`` and
  above go to stderr, one handler however often it is called;
- :func:`shown`: for one call (``verbose=True`` on ``Predictive`` and ``fit_technical``, and
  the command lines' ``-q`` / ``-v``), the handler is added and the level lowered, and both
  are put back afterwards; when a handler of this module is already there, no second one
  is added (so no line is printed twice).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import IO, Iterator

LOGGER = "devicemem"


class _Formatter(logging.Formatter):
    """The message as logged (a ``[MEMORY]`` line reads as it was written), warnings and
    errors after their level ("WARNING: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname}: {text}" if record.levelno >= logging.WARNING else text


class _Handler(logging.StreamHandler):
    """The handler this module adds (:class:`_Formatter`)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.setFormatter(_Formatter("%(message)s"))


def _ours(logger: logging.Logger) -> list[logging.Handler]:
    return [handler for handler in logger.handlers if isinstance(handler, _Handler)]


def log_to_stderr(level: int | str = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Show devicemem's and bayesDREAM_ext's log lines at ``level`` and above (INFO: the
    ``[MEMORY]`` plans) on ``stream`` (default stderr) from now on; returns the handler
    (``logging.getLogger("devicemem").removeHandler(handler)`` stops it). Calling it again
    replaces the handler and level instead of adding a second one."""
    logger = logging.getLogger(LOGGER)
    for handler in _ours(logger):
        logger.removeHandler(handler)
    handler = _Handler(stream or sys.stderr)
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


@contextlib.contextmanager
def shown(level: int | None, stream: IO[str] | None = None) -> Iterator[None]:
    """For the block: devicemem's lines at ``level`` and above on ``stream`` (default stderr),
    unless a handler of this module shows them already (the added one shows nothing below
    ``level``); the logger's level is lowered to ``level``, never raised. ``level`` None
    changes nothing."""
    if level is None:
        yield
        return
    logger = logging.getLogger(LOGGER)
    before = logger.level
    added = None if _ours(logger) else _Handler(stream or sys.stderr)
    if added is not None:
        added.setLevel(level)
        logger.addHandler(added)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        if added is not None:
            logger.removeHandler(added)
        logger.setLevel(before)
