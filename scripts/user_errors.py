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
"""

from __future__ import annotations

import os
import sys

__all__ = ["BundleInputError", "RunStopped", "find_input_error", "install_excepthook"]


class BundleInputError(ValueError):
    """A problem with the user's input; its message names the file or setting and the problem."""


class RunStopped(Exception):
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
