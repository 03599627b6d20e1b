"""Errors in what the user gave, reported as one readable message instead of a traceback.

Every error the bundle raises about its *inputs* (missing or broken files, a datalist that does not
fit, an output folder that cannot be written, a model that does not fit its description, a batch
whose loss is not finite) derives from :class:`BundleInputError`. MONAI's bundle runner wraps an
error raised inside a config expression in several layers ("Failed to evaluate ConfigExpression
..."), so the useful line ends up in the middle of a long traceback. :func:`install_excepthook`
(called when the ``scripts`` package is imported, which every config of the bundle does) makes the
interpreter print just ``error: <message>`` for such errors, found anywhere in the exception's chain,
and exit non-zero; any other error keeps its full traceback. ``CCT_R_TRACEBACK=1`` shows the
traceback of input errors too.

Engines log an error raised inside them before it reaches the interpreter (ignite's "Engine run is
terminating due to exception", MONAI's ``StatsHandler`` "Exception: ..." with its traceback);
:func:`quiet_engine_error_logs` drops those records for the errors reported here, so that a stopped
or refused run prints its one line only.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["BundleInputError", "RunStopped", "find_input_error", "install_excepthook", "quiet_engine_error_logs"]


class BundleInputError(ValueError):
    """A problem with the user's input; its message names the file or setting and the problem."""


class RunStopped(Exception):  # noqa: N818 - a requested stop, not an error (its report says 'stopped:')
    """A run stopped on request (SIGTERM, Ctrl-C) after saving what it needs to resume; the message says how."""


def find_input_error(error: BaseException | None) -> BundleInputError | RunStopped | None:
    """The first :class:`BundleInputError` (or :class:`RunStopped`) in ``error``'s cause / context chain, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (BundleInputError, RunStopped)):
            return error
        error = error.__cause__ or error.__context__
    return None


def _hook(previous):
    def excepthook(kind, value, traceback):
        found = None if os.environ.get("CCT_R_TRACEBACK") else find_input_error(value)
        if found is None:
            return previous(kind, value, traceback)
        sys.stderr.write(f"{'stopped' if isinstance(found, RunStopped) else 'error'}: {found}\n")
        sys.stderr.flush()

    excepthook.cct_r = True
    return excepthook


def install_excepthook() -> None:
    """Install the short report for input errors (once; keeps the previous hook for other errors)."""
    if not getattr(sys.excepthook, "cct_r", False):
        sys.excepthook = _hook(sys.excepthook)


class _ReportedErrorFilter(logging.Filter):
    """Drops error records about an exception that the excepthook reports in one line."""

    cct_r = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or os.environ.get("CCT_R_TRACEBACK"):
            return True
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]  # ignite logs inside its except block
        return find_input_error(error) is None


def quiet_engine_error_logs() -> None:
    """Add the filter to every logging handler present (the engines' handlers exist once a run starts)."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(getattr(f, "cct_r", False) for f in handler.filters):
            handler.addFilter(_ReportedErrorFilter())
