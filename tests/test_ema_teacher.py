"""ema_teacher: the EMA copy of both students as the source of every pseudo-label (issue 35's EMA teacher)."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from scripts.training.cross_teaching import CrossTeachingTrainer
from scripts.training.networks import EnsembleNet
from scripts.training.semi_supervised_losses import PseudoLabelDiceLoss
from scripts.training.weight_average import WeightAverage, teacher_on
from tests.cross_teaching_fixtures import ROOT, make_rsl_datalist, run_trainer, slice_batch
from tests.test_weak_to_strong import _unet

torch.set_num_threads(1)


def _run(teacher: torch.nn.Module | None, **kwargs) -> tuple[CrossTeachingTrainer, torch.nn.Module, torch.nn.Module]:
    net_a, net_b = _unet(1), _unet(2)
    torch.manual_seed(0)  # the same strong views and feature dropout in every run
    trainer = CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[slice_batch()],
        epoch_length=1,
        net_a=net_a,
        optimizer_a=torch.optim.SGD(net_a.parameters(), lr=0.0),
        net_b=net_b,
        optimizer_b=torch.optim.SGD(net_b.parameters(), lr=0.0),
        supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True),
        consistency_weight=0.3,
        w2s_weight=1.0,
        w2s_threshold=0.0,
        pseudo_label_teacher=teacher,
        **kwargs,
    )
    trainer.run()
    return trainer, net_a, net_b


def test_the_teacher_gives_every_pseudo_label_and_gets_no_gradient():
    teacher = EnsembleNet(_unet(3), _unet(4)).eval()
    x_u = slice_batch()["unlabeled"]["image"]
    peers = _run(None)[0].state.output["terms"]
    trainer, net_a, net_b = _run(teacher)
    taught = trainer.state.output["terms"]
    dice = PseudoLabelDiceLoss()
    with torch.no_grad():  # lr 0: the students are as they were at the iteration
        from_teacher_a, from_teacher_b = dice(net_a(x_u), teacher.net_b(x_u)), dice(net_b(x_u), teacher.net_a(x_u))
        from_peer_a = dice(net_a(x_u), net_b(x_u))
    assert taught["cps_a"].item() == pytest.approx(from_teacher_a.item(), rel=1e-5)  # A learns from B's copy
    assert taught["cps_b"].item() == pytest.approx(from_teacher_b.item(), rel=1e-5)  # and B from A's
    assert peers["cps_a"].item() == pytest.approx(from_peer_a.item(), rel=1e-5)
    assert abs(from_teacher_a.item() - from_peer_a.item()) > 1e-3  # the two sources differ here
    for term in ("strong_a", "fp_a", "strong_b", "fp_b"):  # the weak-to-strong targets follow the teacher too
        assert abs(taught[term].item() - peers[term].item()) > 1e-4, term
    assert all(p.grad is None for p in teacher.parameters())


def test_the_switch_needs_the_average_and_two_students():
    assert teacher_on("false", 0.0) is False and teacher_on(False, 0.99) is False
    assert teacher_on("true", 0.99) is True
    with pytest.raises(ValueError, match="ema_teacher: true needs ema_decay > 0"):
        teacher_on(True, 0.0)
    average = WeightAverage(EnsembleNet(_unet(1), _unet(2)), 0.99)
    net = _unet(1)
    with pytest.raises(ValueError, match="pseudo_label_teacher needs two students"):
        CrossTeachingTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=[slice_batch()],
            net_a=net,
            optimizer_a=torch.optim.SGD(net.parameters(), lr=0.0),
            net_b=None,
            supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True),
            consistency="none",
            pseudo_label_teacher=average.average,
        )


def test_the_bundle_wires_the_average_as_the_teacher(tmp_path):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.yaml")])
    assert parser.get_parsed_content("ema_teacher") is False  # off by default
    parser.update({"ema_teacher": "true", "ema_decay": 0.0})
    with pytest.raises(RuntimeError) as refused:  # MONAI wraps the expression's error
        parser.get_parsed_content("ema_teacher_on")
    assert "needs ema_decay > 0" in str(refused.value.__cause__)
    assert parser["training"][0] == "$@ema_teacher_on"  # checked first, before registration
    data = make_rsl_datalist(tmp_path / "phantom")
    trainer = run_trainer(
        tmp_path / "run",
        ["train.yaml", "variant_cts.yaml"],
        data["plain"],
        num_iterations=2,
        val_interval=2,
        ema_decay=0.99,
        ema_teacher="true",
    )
    teacher = trainer.pseudo_label_teacher
    assert isinstance(teacher, EnsembleNet) and teacher.net_a is not trainer.network
    assert not any(p.requires_grad for p in teacher.parameters())  # the EMA copy, not a trained network


def test_the_pseudo_label_monitor_also_scores_the_teacher():
    """With ema_teacher the pseudo-labels come from the average, so the monitor scores its networks too."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.yaml")])
    parser.update({"swin_feature_size": 12})
    assert list(parser.get_parsed_content("monitor#handler#networks")) == ["cnn", "transformer"]
    parser.update({"ema_teacher": "true", "ema_decay": 0.99})
    networks = parser.get_parsed_content("monitor#handler#networks")
    assert list(networks) == ["cnn", "transformer", "cnn_ema", "transformer_ema"]
    average = parser.get_parsed_content("weight_average").average
    assert networks["cnn_ema"] is average.net_a and networks["transformer_ema"] is average.net_b
    assert networks["cnn"] is not networks["cnn_ema"]
