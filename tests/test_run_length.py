"""Training runs exactly num_iterations, with a shorter last round (issue 11, case 2)."""

from __future__ import annotations

import pytest
from ignite.engine import Engine, Events

from scripts.training.checkpoint import TrainStateCheckpoint
from scripts.training.run_length import IterationBudget, num_rounds


def _engine(num_iterations: int, val_interval: int) -> tuple[Engine, list[int]]:
    engine = Engine(lambda e, b: None)
    IterationBudget(num_iterations).attach(engine)
    validated: list[int] = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validated.append(e.state.iteration))
    return engine, validated


@pytest.mark.parametrize("num_iterations, val_interval, rounds", [(400, 150, 3), (450, 150, 3), (7, 2, 4), (1, 5, 1)])
def test_exact_length_and_a_validation_at_the_end(num_iterations, val_interval, rounds):
    assert num_rounds(num_iterations, val_interval) == rounds
    engine, validated = _engine(num_iterations, val_interval)
    engine.run(range(1000), max_epochs=rounds, epoch_length=val_interval)
    assert engine.state.iteration == num_iterations
    assert validated[-1] == num_iterations  # the last (shorter) round still validates
    assert validated[:-1] == [val_interval * (k + 1) for k in range(rounds - 1)]


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    """A state written at the end of a short last round (iteration 7 of rounds of 2) is a finished run."""
    path = tmp_path / "train_state.pt"

    def run(resume: bool) -> list[int]:
        engine = Engine(lambda e, b: None)
        TrainStateCheckpoint(str(path), save_dict={}, resume=resume).attach(engine)
        IterationBudget(7).attach(engine)
        iterations: list[int] = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
        engine.run(range(1000), max_epochs=num_rounds(7, 2), epoch_length=2)
        assert engine.state.iteration == 7
        return iterations

    assert run(resume=False) == list(range(1, 8))
    assert run(resume=True) == []


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_refuses_a_bad_length(bad):
    with pytest.raises(ValueError, match="positive integer"):
        num_rounds(bad, 10)
    with pytest.raises(ValueError, match="positive integer"):
        IterationBudget(bad)
