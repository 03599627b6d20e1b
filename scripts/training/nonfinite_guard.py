"""Stop training at the first non-finite loss, before it reaches the weights.

In the bundle's trainers this is :class:`scripts.training.loss_log.LossLog`'s job: with fused optimizers
it skips a NaN/inf iteration's update on the device and reports it at the next host copy of the losses
(no host read per iteration). :class:`NonFiniteLossGuard` below reads every loss at once; it suits any
optimizer and trainer outside the bundle's configs.

A NaN or inf loss, back-propagated, turns every parameter into NaN; the run would then go on to its
end, validate at Dice 0 and save that network. :class:`NonFiniteLossGuard` checks the loss when the
trainer fires ``LOSS_COMPLETED`` (after the forward pass, before ``backward`` and the optimizer
step) and raises :class:`NonFiniteLossError` naming the iteration and the volumes of the batch. The
networks keep the last good weights; ``models/train_state.pt`` (written at each validation) and
``models/model.pt`` (best so far) are left as they were, so ``--resume true`` restarts from the
last validation once the cause is fixed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from scripts.user_errors import BundleInputError

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "batch_volume_ids", "nonfinite_message"]


class NonFiniteLossError(BundleInputError, RuntimeError):
    """The training loss became NaN or inf."""


def batch_volume_ids(batch) -> list[str]:
    """The ``id`` of each volume in a batch (plain or ``{"labeled": ..., "unlabeled": ...}``)."""
    if not isinstance(batch, Mapping):
        return []
    if "labeled" in batch or "unlabeled" in batch:
        return [f"{part}:{i}" for part in ("labeled", "unlabeled") for i in batch_volume_ids(batch.get(part))]
    ids = batch.get("id")
    if ids is None:
        return []
    return [str(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


class NonFiniteLossGuard:
    """Raise :class:`NonFiniteLossError` as soon as the loss of an iteration is not finite.

    Args:
        loss_key: the key of the loss in ``engine.state.output``.
        state_path: the training-state checkpoint named in the message (where to resume from).
    """

    def __init__(self, loss_key: str = "loss", state_path: str | None = None):
        self.loss_key = loss_key
        self.state_path = state_path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = engine.state.output.get(self.loss_key) if isinstance(engine.state.output, Mapping) else None
        if loss is None:
            return
        loss = torch.as_tensor(loss).detach()
        if bool(torch.isfinite(loss).all()):
            return
        raise NonFiniteLossError(
            nonfinite_message(
                engine.state.iteration,
                float(loss.float().mean()),
                batch_volume_ids(engine.state.batch),
                self.state_path,
            )
        )


def nonfinite_message(
    iteration: int,
    value: float,
    ids: list[str] | None,
    state_path: str | None = None,
    skipped: bool = False,
    count: int = 1,
) -> str:
    """The one message of a non-finite loss: where, which volumes, what happened to the weights, what to do."""
    where = ""
    if state_path:
        saved = "written at the last validation" if os.path.exists(state_path) else "not written yet"
        where = f"; the last good state is {state_path} ({saved})"
    what = f"the loss is {value}" if not skipped else "the loss is not finite (NaN or inf)"
    more = f" ({count} iterations since the last log line)" if count > 1 else ""
    applied = "its update was skipped" if skipped else "no update was applied"
    return (
        f"training stopped at iteration {iteration}: {what}{more} on the batch of volumes "
        f"{ids or '(no ids in the batch)'}; {applied}{where}. "
        "Check these volumes and their labels, or lower the learning rate, then resume with --resume true."
    )
