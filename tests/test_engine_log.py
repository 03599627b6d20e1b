"""Log lines that tell the truth about resuming (issue 11, cases 8 and 9)."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine

from scripts.training.checkpoint import BestModelSaver
from scripts.training.engine_log import FreshRunLog, FreshRunLogFilter


def _record(msg: str) -> str:
    record = logging.LogRecord("ignite.engine.engine.X", logging.INFO, __file__, 1, msg, None, None)
    assert FreshRunLogFilter().filter(record)
    return record.getMessage()


def test_fresh_run_line_is_rewritten_and_real_resumes_are_kept():
    assert (
        _record("Engine run resuming from iteration 0, epoch 0 until 10 epochs")
        == "Engine run starting with max_epochs=10"
    )
    assert (
        _record("Engine run resuming from iteration 0, epoch 1 until 2 epochs") == "Engine run starting (epoch 2 of 2)"
    )
    kept = "Engine run resuming from iteration 150, epoch 1 until 10 epochs"
    assert _record(kept) == kept


def test_filter_installed_on_trainer_and_validator(caplog):
    trainer, validator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    FreshRunLog([validator]).attach(trainer)
    for engine in (trainer, validator):
        engine.state.max_epochs, engine.state.epoch_length = 1, 1  # as MONAI's workflows set it
    with caplog.at_level(logging.INFO):
        trainer.run([0])
        validator.run([0])
    text = caplog.text
    assert "resuming from iteration 0" not in text
    assert text.count("Engine run starting with max_epochs=1") == 2


def test_resumed_best_metric_restores_the_evaluators_record(tmp_path):
    """After a resume, a worse validation must not be logged as a new best (the saved model is right)."""
    net = torch.nn.Conv2d(1, 2, 1)
    label = torch.zeros(1, 1, 4, 4)
    label[..., :2, :] = 1
    data = [{"image": torch.ones(1, 1, 4, 4), "label": label}]
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=data,
        network=net,
        postprocessing=lambda d: d,
        key_val_metric={"dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))},
    )
    saver = BestModelSaver(str(tmp_path / "model.pt"), net)
    saver.attach(evaluator)
    saver.load_state_dict({"best_metric": 0.99, "best_epoch": 3})  # as TrainStateCheckpoint does when resuming
    assert evaluator.state.best_metric == 0.99 and evaluator.state.best_metric_epoch == 3
    evaluator.run()
    assert evaluator.state.best_metric == 0.99 and evaluator.state.best_metric_epoch == 3
    assert not (tmp_path / "model.pt").exists()
