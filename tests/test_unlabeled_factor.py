"""unlabeled_scale / unlabeled_warmup: every unsupervised term scaled, and switched off for a supervised warm-up."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from scripts.training.cross_teaching import CrossTeachingTrainer
from tests.cross_teaching_fixtures import slice_batch
from tests.test_weak_to_strong import _unet

torch.set_num_threads(1)


def _run(iterations: int, **kwargs) -> CrossTeachingTrainer:
    torch.manual_seed(0)
    net_a, net_b = _unet(1), _unet(2)
    trainer = CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[slice_batch()] * iterations,
        epoch_length=iterations,
        net_a=net_a,
        optimizer_a=torch.optim.SGD(net_a.parameters(), lr=0.0),
        net_b=net_b,
        optimizer_b=torch.optim.SGD(net_b.parameters(), lr=0.0),
        supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5),
        consistency_weight=0.3,
        rsl_weight=0.5,
        w2s_weight=1.0,
        w2s_threshold=0.0,
        **kwargs,
    )
    trainer.run()
    return trainer


def _unsupervised(terms: dict, net: str) -> float:
    return (
        0.3 * terms[f"cps_{net}"] + 0.5 * terms[f"rsl_{net}"] + 0.5 * (terms[f"strong_{net}"] + terms[f"fp_{net}"])
    ).item()


def test_scale_multiplies_every_unsupervised_term():
    plain = _run(1).state.output["terms"]
    half = _run(1, unlabeled_scale=0.5).state.output["terms"]
    assert "unlabeled_factor" not in plain and half["unlabeled_factor"].item() == 0.5
    for net in ("a", "b"):
        assert _unsupervised(plain, net) > 0
        assert plain[f"loss_{net}"].item() == pytest.approx(
            plain[f"sup_{net}"].item() + _unsupervised(plain, net), rel=1e-4
        )
        assert half[f"loss_{net}"].item() == pytest.approx(
            half[f"sup_{net}"].item() + 0.5 * _unsupervised(half, net), rel=1e-4
        )


def test_warmup_trains_the_supervised_loss_alone_first():
    trainer = _run(3, unlabeled_warmup=3, unlabeled_scale=0.8)
    assert [trainer.unlabeled_factor(i) for i in (0, 2, 3, 10)] == [0.0, 0.0, 0.8, 0.8]
    terms = trainer.state.output["terms"]  # the third iteration (0-based 2): still warming up
    assert terms["unlabeled_factor"].item() == 0.0 and terms["cps_a"].item() > 0
    assert terms["loss_a"].item() == pytest.approx(terms["sup_a"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="unlabeled_scale and unlabeled_warmup"):
        _run(1, unlabeled_warmup=-1)
