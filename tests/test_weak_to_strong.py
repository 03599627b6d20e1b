"""Weak-to-strong consistency: the strong view's mixing, the confident CE, the feature-perturbed pass, the trainer's loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from scripts.training.cross_teaching import CrossTeachingTrainer
from scripts.training.weak_to_strong import MixedView, StrongPerturbation, confident_cross_entropy, feature_dropout
from tests.cross_teaching_fixtures import slice_batch

torch.set_num_threads(1)


def test_cutmix_pastes_the_partner_slice_and_mixes_labels_alike():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 24, 24)
    view = StrongPerturbation(brightness=0, contrast=0, blur_prob=0, cutmix_prob=1.0)(x)
    box = view.box.bool()
    assert box.any() and not box.all()
    assert torch.allclose(view.image[box], x[view.perm][box]) and torch.allclose(view.image[~box], x[~box])
    labels = torch.randint(0, 4, (4, 24, 24))
    mixed = view.mix(labels)
    assert torch.equal(mixed[box[:, 0]], labels[view.perm][box[:, 0]]) and torch.equal(
        mixed[~box[:, 0]], labels[~box[:, 0]]
    )
    valid = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert view.mix_valid(valid).tolist() == (valid * valid[view.perm]).tolist()  # every slice got a box
    assert view.mix_valid(None) is None
    weight = torch.tensor([2.0, 0.5, 1.0, 0.0])
    assert view.mix_weight(weight).tolist() == torch.minimum(weight, weight[view.perm]).tolist()


def test_intensity_and_blur_change_only_intensities():
    torch.manual_seed(1)
    x = torch.rand(3, 1, 16, 16)
    view = StrongPerturbation(cutmix_prob=0.0, blur_prob=1.0)(x)
    assert not view.box.any() and view.image.shape == x.shape and not torch.allclose(view.image, x)


def test_confident_cross_entropy_counts_only_confident_pixels():
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    conf = torch.zeros(2, 5, 5)
    conf[0] = 1.0
    full = F.cross_entropy(logits, target, reduction="none")
    assert confident_cross_entropy(logits, target, conf, 0.0) == pytest.approx(full.mean().item())
    assert confident_cross_entropy(logits, target, conf, 0.95) == pytest.approx((full[0].sum() / full.numel()).item())
    assert confident_cross_entropy(logits, target, conf, 1.5).item() == 0.0


def _unet(seed: int) -> BasicUNet:
    torch.manual_seed(seed)
    return BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 16, 4), dropout=0.0)


def test_feature_dropout_perturbs_only_inside_the_block():
    net = _unet(0).eval()
    x = torch.rand(2, 1, 32, 32)
    clean = net(x)
    with feature_dropout(net, 0.5):
        noisy = net(x)
    assert not torch.allclose(clean, noisy)
    assert torch.allclose(net(x), clean)  # the hook is gone
    with feature_dropout(net, 0.0):
        assert torch.allclose(net(x), clean)


def test_feature_dropout_keeps_one_hook_and_a_copy_of_the_network_is_not_perturbed():
    # one persistent hook (a compiled network must not see a new hook every pass), set per block, per network
    net = _unet(0).eval()
    x = torch.rand(2, 1, 32, 32)
    with feature_dropout(net, 0.5):
        pass
    twin = copy.deepcopy(net)
    for _ in range(3):
        with feature_dropout(net, 0.5):
            assert not torch.allclose(net(x), twin(x))  # the copy's bottleneck is not inside the block
    assert len(net.down_4._forward_hooks) == 1
    assert net.down_4._w2s_dropout is None and torch.allclose(net(x), twin(x))


class _Identity:
    """A strong view that is the weak view (no box): strong and feature-perturbed (p = 0) passes equal the weak one."""

    def __call__(self, x):
        return MixedView(x.clone(), torch.zeros_like(x), torch.arange(x.shape[0]))


@pytest.mark.parametrize("w2s", [0.0, 0.8])
def test_trainer_adds_the_weak_to_strong_terms(w2s):
    net_a, net_b = _unet(1).eval(), _unet(2).eval()
    for net in (net_a, net_b):
        net.train = lambda mode=True, net=net: net  # keep eval mode: passes are comparable
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)
    batch = slice_batch()
    trainer = CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[batch],
        epoch_length=1,
        net_a=net_a,
        optimizer_a=torch.optim.SGD(net_a.parameters(), lr=0.0),
        net_b=net_b,
        optimizer_b=torch.optim.SGD(net_b.parameters(), lr=0.0),
        supervised_loss=loss_fn,
        consistency_weight=0.3,
        rsl_weight=0.5,
        w2s_weight=w2s,
        w2s_threshold=0.0,
        w2s_dropout=0.0,
        strong_perturbation=_Identity(),
    )
    trainer.run()
    terms = trainer.state.output["terms"]
    expected = terms["sup_a"] + 0.3 * terms["cps_a"] + 0.5 * terms["rsl_a"]
    if w2s == 0:
        assert "strong_a" not in terms
        assert terms["loss_a"].item() == pytest.approx(expected.item(), rel=1e-5)
        return
    x_u = batch["unlabeled"]["image"]
    weak_a, weak_b = net_a(x_u), net_b(x_u)
    ce = F.cross_entropy(weak_a, weak_b.argmax(1))  # threshold 0: every pixel; identity view: strong = weak
    assert terms["strong_a"].item() == pytest.approx(ce.item(), rel=1e-4)
    assert terms["fp_a"].item() == pytest.approx(ce.item(), rel=1e-4)
    assert terms["confident_a"].item() == 1.0
    assert terms["loss_a"].item() == pytest.approx(
        (expected + w2s * 0.5 * (terms["strong_a"] + terms["fp_a"])).item(), rel=1e-5
    )


def test_feature_dropout_of_the_last_samples_leaves_the_others_alone():
    net = _unet(0).eval()
    x = torch.rand(4, 1, 32, 32)
    clean = net(x)
    torch.manual_seed(5)
    with feature_dropout(net, 0.5, last=2):
        mixed = net(x)
    torch.manual_seed(5)
    with feature_dropout(net, 0.5):
        alone = net(x[2:])  # the same random mask: dropout2d draws one per (sample, channel) of the last two
    assert torch.allclose(mixed[:2], clean[:2], atol=1e-6)
    assert not torch.allclose(mixed[2:], clean[2:]) and torch.allclose(mixed[2:], alone, atol=1e-5)


def _w2s_trainer(batched: bool, nets=None, lr: float = 0.1) -> CrossTeachingTrainer:
    torch.manual_seed(0)
    net_a, net_b = nets if nets is not None else (_unet(1), _unet(2))
    return CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[slice_batch()],
        epoch_length=1,
        net_a=net_a,
        optimizer_a=torch.optim.SGD(net_a.parameters(), lr=lr),
        net_b=net_b,
        optimizer_b=torch.optim.SGD(net_b.parameters(), lr=lr),
        supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5),
        consistency_weight=0.3,
        rsl_weight=0.5,
        w2s_weight=1.0,
        w2s_threshold=0.5,
        w2s_dropout=0.5,
        w2s_batched=batched,
    )


def test_batched_views_give_the_separate_passes_losses_and_update():
    """Instance-normalised networks: one pass of [x_l; x_u; strong; x_u] per network is the same mathematics as the
    three passes (same random streams: the strong view, then A's and B's feature dropout, in that order)."""
    runs = {}
    for batched in (True, False):
        trainer = _w2s_trainer(batched)
        assert trainer.w2s_one_pass == batched
        trainer.run()
        runs[batched] = trainer
    one, three = runs[True], runs[False]
    terms_one, terms_three = one.state.output["terms"], three.state.output["terms"]
    assert set(terms_one) == set(terms_three) and terms_one["strong_a"].item() > 0
    for key in terms_one:
        assert terms_one[key].item() == pytest.approx(terms_three[key].item(), rel=1e-4, abs=1e-6), key
    for p, q in zip(one.network.parameters(), three.network.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    for p, q in zip(one.net_b.parameters(), three.net_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_batch_norm_networks_keep_separate_passes():
    from scripts.training.networks import SSL4MISUNet

    trainer = _w2s_trainer(True, nets=(SSL4MISUNet(1, 3), _unet(2)))
    assert not trainer.w2s_one_pass
    trainer.run()
    assert trainer.state.output["terms"]["fp_a"].item() > 0


def test_weak_to_strong_needs_two_students():
    net = _unet(0)
    with pytest.raises(ValueError, match="two students"):
        CrossTeachingTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=[slice_batch()],
            net_a=net,
            net_b=None,
            optimizer_a=torch.optim.SGD(net.parameters(), lr=0.1),
            supervised_loss=DiceCELoss(),
            consistency="none",
            w2s_weight=1.0,
        )


def test_w2s_overlay_trains_cct_r_with_scl_and_the_terms(tmp_path_factory):
    from tests.cross_teaching_fixtures import make_rsl_datalist, run_trainer

    data = make_rsl_datalist(tmp_path_factory.mktemp("phantom"))
    trainer = run_trainer(
        tmp_path_factory.mktemp("run"),
        ["train.yaml", "variant_no_reps.yaml", "variant_w2s.yaml"],
        data["rsl"],
        num_iterations=1,
        val_interval=1,
        rsl_weight=1.0,  # CCT-R's RSL (off in the default since 0.8.0): the strong view mixes registered labels
        cl_num_anchors=50,
        cl_num_negatives=50,
    )
    assert trainer.w2s_weight == 1.0 and trainer.w2s_threshold == 0.95
    terms = trainer.state.output["terms"]
    # the contrastive term reads the weak pass's features, before the extra passes replace them
    assert {"strong_a", "strong_b", "fp_a", "fp_b", "rsl_a", "rsl_b", "cl_a", "cl_b"} <= set(terms)


def test_two_unets_overlay_trains_the_default_with_a_second_unet(tmp_path_factory):
    from monai.networks.nets import BasicUNet

    from tests.cross_teaching_fixtures import make_rsl_datalist, run_trainer

    data = make_rsl_datalist(tmp_path_factory.mktemp("phantom"))
    trainer = run_trainer(
        tmp_path_factory.mktemp("run"),
        ["train.yaml", "variant_no_reps.yaml", "variant_two_unets.yaml"],
        data["rsl"],
        num_iterations=1,
        val_interval=1,
        cl_num_anchors=50,
        cl_num_negatives=50,
    )
    assert isinstance(trainer.network, BasicUNet) and isinstance(trainer.net_b, BasicUNet)
    assert trainer.optimizer_b.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"]
    a, b = dict(trainer.network.named_parameters()), dict(trainer.net_b.named_parameters())
    assert a.keys() == b.keys() and not torch.equal(a["conv_0.conv_0.conv.weight"], b["conv_0.conv_0.conv.weight"])
    terms = trainer.state.output["terms"]
    assert {"cps_a", "cps_b", "cl_a", "cl_b", "strong_b", "fp_b"} <= set(terms) and "rsl_a" not in terms
    assert all(torch.isfinite(v).all() for v in terms.values())
