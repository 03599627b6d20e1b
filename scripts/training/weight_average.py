"""Weight averaging: an exponential moving average (EMA) of the trained networks, validated and saved.

With ``ema_decay > 0`` (train.yaml) a copy of the network being trained (both students, as one
``EnsembleNet``) follows the students after every iteration, and validation, model selection and the
exported ``models/model.pt`` use the copy; the students train exactly as without it (their losses and
updates do not read it). Averaging the last few hundred updates smooths the noise of small-batch,
pseudo-label training, where single checkpoints rise and fall by a few Dice between validations.

The update is the one the UA-MT teacher uses (:func:`scripts.training.mean_teacher.ema_update`),
``theta_avg <- alpha theta_avg + (1 - alpha) theta``, with ``alpha = min(1 - 1 / t, decay)`` at
iteration ``t`` (``t = 1``: a plain copy, so the average never holds the initial weights, and under
DDP every rank starts from the same students). ``alpha`` follows from the trainer's iteration count
alone, so a resumed run (the average is in the training checkpoint) continues the same sequence.
Ignite's ``EMAHandler`` keeps its warm-up position in the handler instead, which a resume restarts.
"""

from __future__ import annotations

import copy

import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts.config_values import flag
from scripts.training.mean_teacher import ema_update, unwrap

__all__ = ["WeightAverage", "teacher_on"]


class WeightAverage:
    """A trainer handler keeping :attr:`average`, an EMA copy of ``network``.

    Args:
        network: the module being trained (a ``DistributedDataParallel`` wrapper is looked through).
        decay: the EMA decay, ``0 < decay < 1`` (0.99: about the last 100 iterations).
    """

    def __init__(self, network: nn.Module, decay: float):
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) to average weights, got {decay} (0 turns averaging off)")
        self.network = unwrap(network)
        self.decay = decay
        self.average = copy.deepcopy(self.network)
        for p in self.average.parameters():
            p.requires_grad_(False)
        self.average.eval()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        # iteration t -> the teacher rule's step t - 1: alpha 0 at the first iteration (a copy)
        ema_update(self.average, self.network, self.decay, int(engine.state.iteration) - 1)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)


def teacher_on(ema_teacher, ema_decay) -> bool:
    """``ema_teacher`` (a boolean or its command-line spelling): whether the EMA copy of both students is the
    source of the pseudo-labels; refused (before any work: ``training`` checks it first) without an average."""
    on = flag(ema_teacher, "ema_teacher")
    if on and not float(ema_decay) > 0:
        raise ValueError("ema_teacher: true needs ema_decay > 0 (e.g. --ema_decay 0.99): the teacher is that average")
    return on
