"""Loss terms, the w_cps ramp, the mean teacher and the networks of the semi-supervised methods, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from scripts.training.consistency_weight import RampUpWeight, sigmoid_ramp_up
from scripts.training.mean_teacher import ema_update, noisy_teacher_predictions
from scripts.training.networks import EnsembleNet, SwinUNETR2D
from scripts.training.semi_supervised_losses import (
    PseudoLabelCELoss,
    PseudoLabelDiceLoss,
    SelectedSamplesLoss,
    UncertaintyMaskedMSE,
    predictive_entropy,
)

torch.set_num_threads(1)


def _logits(*pixels: list[float]) -> torch.Tensor:
    """(1, K, 1, P) logits from per-pixel class-score lists."""
    return torch.tensor(pixels, dtype=torch.float32).T[None, :, None, :].contiguous()


# ---------------------------------------------------------------- w_cps(i) = 0.1 exp(-5 (1 - i/total)^2)
def test_w_cps_schedule_values():
    w = RampUpWeight(total=1000, max_weight=0.1)
    assert w(0) == pytest.approx(0.1 * math.exp(-5.0))
    assert w(500) == pytest.approx(0.1 * math.exp(-1.25))
    assert w(1000) == pytest.approx(0.1)
    assert w(5000) == pytest.approx(0.1)  # clipped after the end
    values = [w(i) for i in range(0, 1001, 50)]
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly rising
    assert sigmoid_ramp_up(3, 0) == 1.0
    with pytest.raises(ValueError, match="total"):
        RampUpWeight(total=0)


# ---------------------------------------------------------------- cross-teaching Dice
def test_pseudo_label_dice_known_value_and_no_gradient_to_teacher():
    teacher = _logits([3.0, 0.0], [0.0, 3.0]).requires_grad_()  # argmax: pixel 0 -> class 0, pixel 1 -> class 1
    uniform = torch.zeros(1, 2, 1, 2, requires_grad=True)  # softmax 0.5 / 0.5 everywhere
    loss = PseudoLabelDiceLoss()(uniform, teacher)
    # each class: 2 * 0.5 / (1 + 1) = 0.5 -> Dice loss 0.5
    assert loss.item() == pytest.approx(0.5, abs=1e-4)
    loss.backward()
    assert teacher.grad is None and uniform.grad is not None
    confident = _logits([20.0, 0.0], [0.0, 20.0])
    assert PseudoLabelDiceLoss()(confident, teacher).item() == pytest.approx(0.0, abs=1e-4)
    wrong = _logits([0.0, 20.0], [20.0, 0.0])
    assert PseudoLabelDiceLoss()(wrong, teacher).item() == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- CPS cross-entropy
def test_pseudo_label_ce_known_value():
    teacher = _logits([0.0, 1.0]).requires_grad_()  # argmax class 1
    student = _logits([2.0, 0.0]).requires_grad_()
    loss = PseudoLabelCELoss()(student, teacher)
    assert loss.item() == pytest.approx(math.log(1.0 + math.exp(2.0)), rel=1e-6)  # -log softmax_1
    loss.backward()
    assert teacher.grad is None and student.grad is not None


# ---------------------------------------------------------------- UA-MT
def test_predictive_entropy_and_masked_mse_known_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).T[None, :, None, :]  # pixel 0 certain, pixel 1 maximally uncertain
    entropy = predictive_entropy(p)
    assert entropy.shape == (1, 1, 1, 2)
    assert entropy[0, 0, 0, 0].item() == pytest.approx(0.0, abs=1e-5)
    assert entropy[0, 0, 0, 1].item() == pytest.approx(math.log(2.0), abs=1e-5)
    student = torch.zeros(1, 2, 1, 2)  # softmax 0.5 / 0.5
    loss = UncertaintyMaskedMSE()(student, p, entropy, threshold=0.5)
    # mask keeps pixel 0: squared error (0.5 - 1)^2 + (0.5 - 0)^2 = 0.5, over 2 * (1 pixel) -> 0.25
    assert loss.item() == pytest.approx(0.25, abs=1e-6)
    assert UncertaintyMaskedMSE()(student, p, entropy, threshold=1.0).item() == pytest.approx(0.5 / 4, abs=1e-6)
    assert UncertaintyMaskedMSE()(student, p, entropy, threshold=-1.0).item() == 0.0  # no certain pixel


def test_ema_update_follows_the_reference_rule():
    teacher, student = nn.Linear(2, 1), nn.Linear(2, 1)
    nn.init.zeros_(teacher.weight), nn.init.ones_(student.weight)
    alpha = ema_update(teacher, student, decay=0.99, step=1)
    assert alpha == pytest.approx(0.5)
    torch.testing.assert_close(teacher.weight, torch.full((1, 2), 0.5))
    alpha = ema_update(teacher, student, decay=0.99, step=1000)
    assert alpha == pytest.approx(0.99)
    torch.testing.assert_close(teacher.weight, torch.full((1, 2), 0.5 + 0.01 * 0.5))
    assert student.weight.eq(1.0).all()


def test_noisy_teacher_predictions_shapes_and_determinism():
    teacher = nn.Conv2d(1, 3, 1)
    x = torch.rand(2, 1, 8, 8)
    torch.manual_seed(0)
    target, uncertainty = noisy_teacher_predictions(teacher, x, passes=4)
    assert target.shape == (2, 3, 8, 8) and uncertainty.shape == (2, 1, 8, 8)
    torch.testing.assert_close(target.sum(1), torch.ones(2, 8, 8))
    assert (uncertainty >= 0).all() and (uncertainty <= math.log(3) + 1e-4).all()
    torch.manual_seed(0)
    again, _ = noisy_teacher_predictions(teacher, x, passes=4)
    torch.testing.assert_close(target, again)


# ---------------------------------------------------------------- registration supervision on valid samples only
def test_selected_samples_loss_skips_samples_without_registered_label():
    calls = []

    def loss(a, b):
        calls.append(a.shape[0])
        return (a - b).abs().mean()

    x = torch.tensor([[1.0], [5.0]], requires_grad=True)
    y = torch.zeros(2, 1)
    rsl = SelectedSamplesLoss(loss)
    assert rsl(x, y, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0)  # only the first sample
    assert rsl(x, y, torch.tensor([1.0, 1.0])).item() == pytest.approx(3.0)
    none = rsl(x, y, torch.tensor([0.0, 0.0]))
    assert none.item() == 0.0 and none.requires_grad
    assert calls == [1] * 6  # each sample's loss alone (fixed size: no host read of which are valid)


# ---------------------------------------------------------------- networks
class _Const(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, x):
        return torch.ones(x.shape[0], 2, *x.shape[2:]) * self.value


def test_ensemble_mean_and_branches():
    net = EnsembleNet(_Const(1.0), _Const(3.0))
    x = torch.zeros(1, 1, 4, 4)
    assert net(x).eq(2.0).all()
    net.branch = "cnn"
    assert net(x).eq(1.0).all()
    net.branch = "b"
    assert net(x).eq(3.0).all()
    assert set(net.state_dict()) == {"net_a.value", "net_b.value"}
    with pytest.raises(ValueError, match="branch"):
        EnsembleNet(_Const(1.0), _Const(1.0), branch="max")


def test_swin_unetr_2d_takes_any_size_and_matches_swin_unetr():
    torch.manual_seed(0)
    net = SwinUNETR2D(in_channels=1, out_channels=3, feature_size=12).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 40, 52)).shape == (1, 3, 40, 52)
        assert net(torch.rand(2, 1, 32, 32)).shape == (2, 3, 32, 32)  # padded to 64
        plain = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=2).eval()
        plain.load_state_dict(net.state_dict())  # same parameters as MONAI's SwinUNETR
        x = torch.rand(1, 1, 64, 64)
        # SDPA window attention when gradients are off (inference); MONAI's explicit attention otherwise
        from monai.networks.nets.swin_unetr import WindowAttention

        assert all(m.use_flash_attention for m in net.modules() if isinstance(m, WindowAttention))
        torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2D"):
        SwinUNETR2D(in_channels=1, out_channels=3, spatial_dims=3)
