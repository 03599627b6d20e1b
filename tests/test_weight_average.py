"""Weight averaging (``--ema_decay``): the EMA rule, from the trainer's iteration count."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from scripts.training.weight_average import WeightAverage


def _trainer(net: torch.nn.Module, updates: list[float]) -> Engine:
    def step(engine, _):
        with torch.no_grad():
            net.weight.fill_(updates[engine.state.iteration - 1])

    return Engine(step)


def test_average_starts_as_a_copy_and_follows_the_ema_rule():
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(-100.0)  # the initial weights never enter the average
    average = WeightAverage(net, decay=0.6)
    updates = [1.0, 3.0, 5.0, 7.0]
    trainer = _trainer(net, updates)
    average.attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(float(average.average.weight)))
    trainer.run([0] * len(updates), max_epochs=1)
    expected, value = [], None
    for t, w in enumerate(updates, start=1):
        alpha = min(1 - 1 / t, 0.6)  # 0 (a copy), 0.5, then capped at the decay
        value = w if value is None else alpha * value + (1 - alpha) * w
        expected.append(value)
    assert seen == pytest.approx(expected)
    assert seen[-1] != pytest.approx(updates[-1])
    assert not any(p.requires_grad for p in average.average.parameters())


def test_state_round_trip_and_bad_decay():
    net = torch.nn.Linear(2, 2)
    a = WeightAverage(net, 0.9)
    with torch.no_grad():
        a.average.weight.add_(1.0)
    b = WeightAverage(net, 0.9)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.average.weight, a.average.weight)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="ema_decay"):
            WeightAverage(net, bad)
