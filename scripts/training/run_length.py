"""Train exactly ``num_iterations`` iterations, whatever ``val_interval`` is.

Training is iteration based: an ignite "epoch" is one round of ``val_interval`` iterations followed by
a validation. With ``num_iterations`` not a multiple of ``val_interval`` (400 and 150), whole rounds
alone would train 300 or 450 iterations while the learning-rate schedule and the consistency ramp-up
span ``num_iterations``. The bundle instead runs ``ceil(num_iterations / val_interval)`` rounds
(:func:`num_rounds`) and :class:`IterationBudget` ends the last, shorter round at ``num_iterations``
(``Engine.terminate_epoch``), so the round still completes: it validates (the validation handler runs every
``val_interval`` iterations; this handler validates the shorter last round itself), saves the best model
and the training state at exactly ``num_iterations``, where the schedule ends.
"""

from __future__ import annotations

import logging
import math

from ignite.engine import Engine, Events

__all__ = ["IterationBudget", "num_rounds"]

logger = logging.getLogger(__name__)


def num_rounds(num_iterations: int, val_interval: int) -> int:
    """The number of training rounds (ignite epochs) that covers ``num_iterations``; the last may be shorter."""
    for name, value in (("num_iterations", num_iterations), ("val_interval", val_interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return math.ceil(num_iterations / val_interval)


class IterationBudget:
    """End the round in which the iteration count reaches ``num_iterations``.

    A smaller ``max_epochs`` still stops the run earlier (e.g. to split a run in parts and resume).
    """

    def __init__(self, num_iterations: int, validator: Engine | None = None):
        """``validator``: run at the end of a shorter last round, where the every-``val_interval`` validation
        handler does not fire (``None``: nothing to validate)."""
        if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
            raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}")
        self.num_iterations = num_iterations
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def started(self, engine: Engine) -> None:
        if engine.state.iteration >= self.num_iterations:
            # resumed from a state written at the end (ignite would count a short last round as
            # unfinished and train it again)
            engine.state.epoch = max(engine.state.epoch, engine.state.max_epochs)
            logger.info(f"Training already reached num_iterations = {self.num_iterations}: nothing left to train.")
            return
        length = engine.state.epoch_length
        rounds = engine.state.max_epochs
        if length and rounds and rounds * length != self.num_iterations:
            last = self.num_iterations - (rounds - 1) * length
            if 0 < last < length:
                logger.info(
                    f"Training {self.num_iterations} iterations: {rounds - 1} rounds of {length} "
                    f"and a last round of {last}, each followed by a validation."
                )

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration >= self.num_iterations and engine.state.iteration % engine.state.epoch_length:
            if self.validator is not None:
                self.validator.run(engine.state.epoch)  # as MONAI's ValidationHandler does
            engine.terminate_epoch()
