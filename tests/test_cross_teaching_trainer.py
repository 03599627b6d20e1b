"""CrossTeachingTrainer's iteration on tiny networks: each network gets exactly its own loss's gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from scripts.training.cross_teaching import CrossTeachingTrainer
from scripts.training.semi_supervised_losses import PseudoLabelCELoss, PseudoLabelDiceLoss

torch.set_num_threads(1)


def _batch(with_registered: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    labeled = {
        "image": torch.rand(2, 1, 8, 8, generator=g),
        "label": torch.randint(0, 3, (2, 1, 8, 8), generator=g).float(),
    }
    unlabeled = {"image": torch.rand(2, 1, 8, 8, generator=g)}
    if with_registered:
        unlabeled["registered_label"] = torch.randint(0, 3, (2, 1, 8, 8), generator=g).float()
        unlabeled["registered_label_valid"] = torch.tensor([1.0, 1.0])
    return {"labeled": labeled, "unlabeled": unlabeled}


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    return nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 1)


def _sgd(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.5)


def _reference_step(net, other, loss_fn, cross, batch, w, w_rsl):
    """One SGD step of ``net`` on its own loss alone, computed by hand."""
    lab, unl = batch["labeled"], batch["unlabeled"]
    x = torch.cat([lab["image"], unl["image"]])
    out, out_other = net(x), other(x)
    loss = loss_fn(out[:2], lab["label"]) + w * cross(out[2:], out_other[2:])
    if w_rsl:
        loss = loss + w_rsl * loss_fn(out[2:], unl["registered_label"])
    opt = _sgd(net)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize(
    "consistency, cross, w_rsl", [("cross_teaching", PseudoLabelDiceLoss(), 0.7), ("cps", PseudoLabelCELoss(), 0.0)]
)
def test_each_network_steps_on_its_own_loss(consistency, cross, w_rsl):
    net_a, net_b = _nets()
    init_a, init_b = copy.deepcopy(net_a), copy.deepcopy(net_b)
    ref_a, ref_b = copy.deepcopy(net_a), copy.deepcopy(net_b)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)
    batch = _batch()
    trainer = CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[batch],
        epoch_length=1,
        net_a=net_a,
        optimizer_a=_sgd(net_a),
        net_b=net_b,
        optimizer_b=_sgd(net_b),
        supervised_loss=loss_fn,
        consistency=consistency,
        consistency_weight=0.3,
        rsl_weight=w_rsl,
    )
    trainer.run()
    # references: each network's loss against the *initial* other network, stepped alone
    loss_a = _reference_step(ref_a, init_b, loss_fn, cross, batch, 0.3, w_rsl)
    loss_b = _reference_step(ref_b, init_a, loss_fn, cross, batch, 0.3, w_rsl)
    for got, want in ((net_a, ref_a), (net_b, ref_b)):
        for p, q in zip(got.parameters(), want.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    terms = trainer.state.output["terms"]
    assert terms["loss_a"].item() == pytest.approx(loss_a, rel=1e-5)
    assert terms["loss_b"].item() == pytest.approx(loss_b, rel=1e-5)
    assert trainer.state.output["loss"].item() == pytest.approx(loss_a + loss_b, rel=1e-5)
    assert ("rsl_a" in terms) == (w_rsl > 0)
    assert terms["w_cps"].item() == pytest.approx(0.3)


def test_mean_teacher_steps_student_and_averages_teacher():
    student, teacher = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 3, padding=1)
    teacher0 = copy.deepcopy(teacher)
    trainer = CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[_batch(False)],
        epoch_length=1,
        net_a=student,
        optimizer_a=_sgd(student),
        net_b=teacher,
        supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True),
        consistency="mean_teacher",
        consistency_weight=0.1,
        num_iterations=10,
        uncertainty_passes=2,
    )
    trainer.run()
    # iteration 1: alpha = min(1 - 1/2, 0.99) = 0.5
    for t, t0, s in zip(teacher.parameters(), teacher0.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s)
        assert not t.requires_grad
    terms = trainer.state.output["terms"]
    assert 0.0 <= terms["certain_fraction"].item() <= 1.0 and "loss_b" not in terms


def test_invalid_configurations_are_refused():
    net_a, net_b = _nets()
    common = dict(
        device="cpu",
        max_epochs=1,
        train_data_loader=[_batch(False)],
        epoch_length=1,
        net_a=net_a,
        optimizer_a=_sgd(net_a),
        net_b=net_b,
        supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True),
    )
    with pytest.raises(ValueError, match="optimizer_b"):
        CrossTeachingTrainer(**common, consistency="cross_teaching")
    with pytest.raises(ValueError, match="no optimizer"):
        CrossTeachingTrainer(**common, consistency="mean_teacher", optimizer_b=_sgd(net_b), num_iterations=5)
    with pytest.raises(ValueError, match="consistency"):
        CrossTeachingTrainer(**common, consistency="fixmatch", optimizer_b=_sgd(net_b))
    trainer = CrossTeachingTrainer(**common, consistency="cross_teaching", optimizer_b=_sgd(net_b), rsl_weight=1.0)
    with pytest.raises(ValueError, match="registered_label"):
        trainer.run()


def test_ssl4mis_unet_recipe():
    """BatchNorm, LeakyReLU, per-level encoder dropout 0.05-0.5, features 16-256; any input size; taps for SCL."""
    from scripts.contrastive.feature_taps import FeatureTap, feature_channels
    from scripts.training.networks import SSL4MISUNet

    net = SSL4MISUNet(1, 4)
    rates = [m.p for m in net.in_conv.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.p for block in net.down for m in block.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert not [m for m in net.up1.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]  # no decoder dropout
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())
    assert not any(isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.ConvTranspose2d)) for m in net.modules())
    x = torch.rand(2, 1, 40, 56)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 4, 40, 56)
        torch.testing.assert_close(net(x), net(x))  # no dropout at inference
    net.train()
    assert not torch.equal(net(x), net(x))  # dropout while training
    assert feature_channels(net) == {"full": 16, "coarse": 128}
    tap = FeatureTap(net)
    net(torch.rand(2, 1, 64, 64))
    assert tap.features()["coarse"].shape[-2:] == (8, 8) and tap.features()["full"].shape[-2:] == (64, 64)
