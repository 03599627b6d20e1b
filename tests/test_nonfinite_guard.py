"""A non-finite loss stops training before the update, naming the batch's volumes; a non-finite
network is never saved as the best model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from torch import nn

from scripts.training.checkpoint import BestModelSaver
from scripts.training.cross_teaching import CrossTeachingTrainer
from scripts.training.nonfinite_guard import NonFiniteLossError, NonFiniteLossGuard, batch_volume_ids

torch.set_num_threads(1)
LOSS = DiceCELoss(to_onehot_y=True, softmax=True)


def _part(ids, nan: bool, g) -> dict:
    image = torch.rand(len(ids), 1, 8, 8, generator=g)
    if nan:
        image[0, 0, 2, 2] = float("nan")
    return {"image": image, "label": torch.randint(0, 3, (len(ids), 1, 8, 8), generator=g).float(), "id": list(ids)}


def test_cross_teaching_stops_at_the_nan_batch_without_updating():
    g = torch.Generator().manual_seed(0)
    good = {"labeled": _part(["p1", "p2"], False, g), "unlabeled": _part(["u1", "u2"], False, g)}
    bad = {"labeled": _part(["p1", "p3"], False, g), "unlabeled": _part(["u7", "u9"], True, g)}
    torch.manual_seed(1)
    net_a, net_b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 1)
    trainer = CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[good, bad, good],
        epoch_length=3,
        net_a=net_a,
        optimizer_a=torch.optim.SGD(net_a.parameters(), lr=0.1),
        net_b=net_b,
        optimizer_b=torch.optim.SGD(net_b.parameters(), lr=0.1),
        supervised_loss=LOSS,
        consistency="cross_teaching",
        consistency_weight=0.1,
        rsl_weight=0.0,
        train_handlers=[NonFiniteLossGuard(state_path="models/train_state.pt")],
    )
    after_first = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: after_first.setdefault("a", copy.deepcopy(net_a.state_dict()))
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run()
    message = str(err.value)
    assert "iteration 2" in message and "nan" in message
    assert "unlabeled:u7" in message and "labeled:p3" in message and "models/train_state.pt" in message
    for k, v in net_a.state_dict().items():  # the bad batch's update never happened
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, after_first["a"][k])


def test_supervised_trainer_is_guarded_too():
    g = torch.Generator().manual_seed(0)
    net = nn.Conv2d(1, 3, 3, padding=1)
    data = [_part(["a", "b"], False, g), _part(["c", "d"], True, g)]
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        epoch_length=2,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=LOSS,
        train_handlers=[NonFiniteLossGuard()],
    )
    with pytest.raises(NonFiniteLossError, match=r"\['c', 'd'\]"):
        trainer.run()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_batch_volume_ids():
    assert batch_volume_ids({"id": ["x", "y"]}) == ["x", "y"]
    assert batch_volume_ids({"labeled": {"id": ["x"]}, "unlabeled": {"id": ["y"]}}) == ["labeled:x", "unlabeled:y"]
    assert batch_volume_ids({"image": 1}) == []


def test_best_model_saver_refuses_a_non_finite_network(tmp_path):
    net = nn.Conv2d(1, 3, 1)
    saver = BestModelSaver(str(tmp_path / "model.pt"), net)
    engine = SimpleNamespace(state=SimpleNamespace(metrics={"dice": 0.0}, epoch=1, key_metric_name="dice"))
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    saver(engine)
    assert not (tmp_path / "model.pt").exists() and saver.best_metric is None
    with torch.no_grad():
        net.weight.fill_(0.5)
    engine.state.metrics["dice"], engine.state.epoch = 0.4, 2
    saver(engine)
    assert (tmp_path / "model.pt").exists() and saver.best_metric == pytest.approx(0.4)
