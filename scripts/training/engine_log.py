"""Correct ignite's "Engine run resuming from iteration 0" line on fresh runs.

MONAI's workflows set the engine state (max_epochs, epoch_length) before calling ``Engine.run``, so
ignite takes every run for a resumed one and logs "Engine run resuming from iteration 0, epoch 0
until N epochs", on a fresh run and right before the real resume line of
:class:`scripts.training.checkpoint.TrainStateCheckpoint` ("resumed from ... at iteration 150"),
and again before each validation. :class:`FreshRunLogFilter` rewrites that line, when it says
iteration 0, to what happens: the run starts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from ignite.engine import Engine

__all__ = ["FreshRunLog", "FreshRunLogFilter"]

_RESUMING_AT_ZERO = re.compile(r"^Engine run resuming from iteration 0, epoch (\d+) until (\d+) (epochs|iterations)$")


class FreshRunLogFilter(logging.Filter):
    """Rewrite "resuming from iteration 0, epoch E until N epochs" as "starting (epoch E+1 of N)"."""

    def filter(self, record: logging.LogRecord) -> bool:
        match = _RESUMING_AT_ZERO.match(str(record.msg)) if not record.args else None
        if match:
            epoch, total, unit = match.groups()
            record.msg = (
                f"Engine run starting with max_epochs={total}"
                if epoch == "0"
                else f"Engine run starting (epoch {int(epoch) + 1} of {total})"
            )
            if unit == "iterations":
                record.msg = f"Engine run starting with max_iters={total}"
        return True


class FreshRunLog:
    """Handler: install :class:`FreshRunLogFilter` on the trainer's logger and on ``engines`` (validators)."""

    def __init__(self, engines: Sequence[Engine] = ()):
        self.engines = list(engines)

    def attach(self, engine: Engine) -> None:
        for e in [engine, *self.engines]:
            if not any(isinstance(f, FreshRunLogFilter) for f in e.logger.filters):
                e.logger.addFilter(FreshRunLogFilter())
