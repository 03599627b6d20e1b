"""TAC (task-affinity consistency): the enhanced U-Net, the masked class averages, the loss, and the overlays."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
import torch
from monai.networks.nets import BasicUNet

from scripts.contrastive.task_affinity import (
    SkipFeatureTap,
    TaskAffinityConsistency,
    class_representations,
    representation_distance,
)
from scripts.training.networks import StructuralEnhancement, StructureEnhancedUNet
from tests.cross_teaching_fixtures import make_rsl_datalist, run_bundle, run_trainer

torch.set_num_threads(1)

FEATURES = [8, 8, 16, 16, 32, 8]


def _net(seed: int = 0) -> StructureEnhancedUNet:
    torch.manual_seed(seed)
    return StructureEnhancedUNet(2, 1, 3, features=FEATURES, dropout=0.0)


# ---------------------------------------------------------------- masked averages
def test_class_representations_match_a_hand_computation():
    torch.manual_seed(1)
    feats = torch.randn(2, 3, 4, 4)
    label = torch.randint(0, 3, (2, 1, 4, 4))
    label[:, 0, 0, 0] = 0
    masks = torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 3, 1, 2).float()
    masks[:, 2] = 0  # class 2 absent
    reps, present = class_representations(feats, masks)
    for c in range(2):
        sel = label[:, 0] == c  # (B, H, W)
        expected = torch.stack([feats[:, f][sel].mean() for f in range(3)])
        assert torch.allclose(reps[c], expected, atol=1e-6)
    assert present.tolist() == [True, (label == 1).any().item(), False]
    assert torch.all(reps[2] == 0)


def test_masks_are_area_averaged_to_coarse_features():
    feats = torch.arange(4.0).reshape(1, 1, 2, 2)  # one channel, 2x2
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1.0  # top-left quadrant -> the top-left coarse pixel, weight 1
    mask[0, 0, 2, 2] = 1.0  # one of four fine pixels of the bottom-right coarse pixel -> weight 0.25
    reps, _ = class_representations(feats, mask)
    assert torch.allclose(reps[0, 0], torch.tensor((0.0 * 1 + 3.0 * 0.25) / 1.25))


def test_distance_sums_squared_differences_of_classes_present_in_both_halves():
    feats_l, feats_u = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    feats_u[0, :, 0, :] = torch.tensor([1.0, 2.0])[:, None]  # class 0 region (top row) differs by (1, 2)
    masks = torch.zeros(1, 3, 2, 2)
    masks[0, 0, 0, :] = 1
    masks[0, 1, 1, :] = 1
    masks_u = masks.clone()
    masks_u[0, 1] = 0  # class 1 absent in the unlabeled half: not compared
    masks_u[0, 2, 1, :] = 1
    assert torch.allclose(representation_distance(feats_l, masks, feats_u, masks_u), torch.tensor(5.0))


def test_mean_reduction_divides_each_scale_by_its_channels():
    g = torch.Generator().manual_seed(3)
    feats_l, feats_u = torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 6, 8, 8, generator=g)
    masks = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 16, 16), generator=g), 3).permute(0, 3, 1, 2).float()
    total = representation_distance(feats_l, masks, feats_u, masks)
    mean = representation_distance(feats_l, masks, feats_u, masks, reduction="mean")
    assert total.item() > 0 and torch.allclose(mean * 6, total)


def test_nearest_resize_picks_pixels_where_area_averages():
    feats = torch.arange(4.0).reshape(1, 1, 2, 2)
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1.0
    mask[0, 0, 2, 2] = 1.0  # the sampled pixel of the bottom-right coarse pixel: weight 1 (area: 0.25)
    near, _ = class_representations(feats, mask, resize="nearest")
    assert torch.allclose(near[0, 0], torch.tensor((0.0 + 3.0) / 2))
    mask[0, 0, 2, 2], mask[0, 0, 3, 3] = 0.0, 1.0  # not the sampled pixel: gone with nearest, 0.25 with area
    near, _ = class_representations(feats, mask, resize="nearest")
    area, _ = class_representations(feats, mask)
    assert near[0, 0].item() == 0.0 and area[0, 0].item() == pytest.approx(0.75 / 1.25)


def test_paired_compares_slice_i_with_slice_i_and_averages():
    feats_l, feats_u = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    feats_u[0] = 1.0  # pair 0 differs by 1 in class 0, pair 1 agrees
    masks = torch.zeros(2, 1, 2, 2)
    masks[:, 0] = 1
    assert representation_distance(feats_l, masks, feats_u, masks, pairing="paired").item() == pytest.approx(0.5)
    # pooled, the same halves differ by the mean of the unlabeled slices: 0.5^2
    assert representation_distance(feats_l, masks, feats_u, masks).item() == pytest.approx(0.25)
    # a slice without the class is skipped in its pair only
    masks_u = masks.clone()
    masks_u[1] = 0
    feats_u[1] = 7.0
    assert representation_distance(feats_l, masks, feats_u, masks_u, pairing="paired").item() == pytest.approx(0.5)


def test_zero_absent_compares_a_missing_class_as_a_zero_feature():
    feats_l, feats_u = torch.full((1, 2, 2, 2), 3.0), torch.zeros(1, 2, 2, 2)
    masks_l, masks_u = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    masks_l[0, 1] = 1  # class 1 only in the labeled half: feature (3, 3) against a zero feature
    masks_u[0, 0] = 1
    assert representation_distance(feats_l, masks_l, feats_u, masks_u).item() == 0.0
    assert representation_distance(feats_l, masks_l, feats_u, masks_u, absent="zero").item() == pytest.approx(18.0)


def test_switches_are_checked_when_the_loss_is_built():
    for key, bad in (
        ("reduction", "max"),
        ("mask", "argmax"),
        ("resize", "bilinear"),
        ("pairing", "x"),
        ("absent", "y"),
    ):
        with pytest.raises(ValueError, match=key):
            TaskAffinityConsistency(_net(), 3, **{key: bad})


# ---------------------------------------------------------------- the enhanced U-Net
def test_enhancement_changes_the_skip_only_through_alpha():
    layer = StructuralEnhancement(4, 6)
    x, xbar = torch.randn(2, 4, 5, 7), torch.randn(2, 6, 5, 7)
    out = layer(x, xbar)
    alpha = layer.alpha(x, xbar)
    assert alpha.shape == (2, 1, 5, 7) and torch.all((alpha > 0) & (alpha < 1))
    assert torch.allclose(out, alpha * x)
    # the same skip feature is scaled, never mixed: a channel of zeros stays zeros
    x[:, 2] = 0
    assert torch.all(layer(x, xbar)[:, 2] == 0)


def test_with_alpha_one_the_network_is_basic_unet():
    net = _net()
    plain = BasicUNet(2, 1, 3, features=FEATURES, dropout=0.0)
    result = plain.load_state_dict(net.state_dict(), strict=False)
    assert not result.missing_keys and all(k.startswith("sel_") for k in result.unexpected_keys)
    x = torch.rand(2, 1, 36, 44)  # odd sizes at depth: the UpCat padding path
    net.eval(), plain.eval()
    assert not torch.allclose(net(x), plain(x), atol=1e-4)  # random alpha: a different network
    for name in net.skip_layers:
        torch.nn.init.zeros_(getattr(net, name).f_psi.weight)
        torch.nn.init.constant_(getattr(net, name).f_psi.bias, 50.0)  # alpha = 1
    assert torch.allclose(net(x), plain(x), atol=1e-5)


def test_tap_reads_contextual_and_structural_features():
    net = _net()
    tap = SkipFeatureTap(net)
    net(torch.rand(2, 1, 32, 32))
    feats = tap.features()
    assert [tuple(x.shape) for x, _ in feats] == [(2, 8, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)]
    for x, x_hat in feats:
        assert x_hat.shape == x.shape and x_hat.requires_grad
    tap.remove()
    with pytest.raises(ValueError, match="StructureEnhancedUNet"):
        SkipFeatureTap(BasicUNet(2, 1, 3, features=FEATURES))


# ---------------------------------------------------------------- the loss
def test_loss_is_zero_when_both_halves_agree_and_positive_otherwise():
    net = _net()
    tac = TaskAffinityConsistency(net, num_classes=3)
    net.eval()
    x = torch.rand(2, 1, 32, 32)
    logits = net(torch.cat([x, x]))  # the unlabeled half is the labeled half again
    label = logits[:2].argmax(1, keepdim=True)  # ... and its labels are the network's own argmax
    assert tac(logits, label, 2).item() == pytest.approx(0.0, abs=1e-8)
    logits = net(torch.cat([x, torch.rand(2, 1, 32, 32)]))
    assert tac(logits, label, 2).item() > 0


def test_loss_equals_the_formula_and_trains_the_network():
    net = _net()
    tac = TaskAffinityConsistency(net, num_classes=3, tau_context=0.5, tau_structure=2.0)
    x = torch.rand(4, 1, 32, 32)
    label = torch.randint(0, 3, (2, 1, 32, 32))
    logits = net(x)
    loss = tac(logits, label, 2)
    masks_l = torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 3, 1, 2).float()
    masks_u = torch.nn.functional.one_hot(logits[2:].argmax(1), 3).permute(0, 3, 1, 2).float()
    ctx = sum(representation_distance(a[:2], masks_l, a[2:], masks_u) for a, _ in tac.tap.features())
    st = sum(representation_distance(b[:2], masks_l, b[2:], masks_u) for _, b in tac.tap.features())
    assert torch.allclose(loss, (0.5 * ctx + 2.0 * st) / 3)
    loss.backward()
    assert net.sel_4.f_psi.weight.grad.abs().sum() > 0  # the structural term reaches alpha's weights
    assert next(net.down_1.parameters()).grad.abs().sum() > 0  # and the encoder


# ---------------------------------------------------------------- from the overlays


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return make_rsl_datalist(tmp_path_factory.mktemp("phantom"))


def _tap_features_and_logits(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 32, 32, generator=g)
    label = torch.randint(0, 3, (2, 1, 32, 32), generator=g)
    logits = net(x).detach().requires_grad_(True)  # a leaf: the gradient R sends to the predictions
    return logits, label


def test_soft_masks_send_gradient_to_the_unlabeled_prediction_hard_masks_do_not():
    net = _net()
    for mask, reaches in (("hard", False), ("soft", True)):
        tac = TaskAffinityConsistency(net, 3, mask=mask)
        logits, label = _tap_features_and_logits(net)
        loss = tac(logits, label, 2)
        assert loss.item() > 0
        loss.backward()
        grad = logits.grad
        assert (grad is not None and grad[2:].abs().sum().item() > 0) == reaches
        assert grad is None or grad[:2].abs().sum().item() == 0  # the labeled half's masks are the labels
        tac.tap.remove()
    # soft masks are the softmax: a confident prediction gives the hard loss
    tac = TaskAffinityConsistency(net, 3, mask="soft")
    hard = TaskAffinityConsistency(net, 3)
    logits, label = _tap_features_and_logits(net)
    confident = logits.detach() * 1e4
    assert torch.allclose(tac(confident, label, 2), hard(confident, label, 2), rtol=1e-4)


def test_mean_reduction_scales_r_down_by_the_skip_widths():
    net = _net()
    tac_sum, tac_mean = TaskAffinityConsistency(net, 3), TaskAffinityConsistency(net, 3, reduction="mean")
    logits, label = _tap_features_and_logits(net)
    r_sum, r_mean = tac_sum(logits, label, 2), tac_mean(logits, label, 2)
    # FEATURES' skips have 8, 8, 16 and 16 channels: R shrinks by between 8x and 16x
    assert r_sum.item() / 16 - 1e-6 <= r_mean.item() <= r_sum.item() / 8 + 1e-6


def _assert_best_readings(tac) -> None:
    """train.yaml's TAC readings: the best of the screen (mean, soft masks, nearest resize; pooled, skip)."""
    assert (tac.reduction, tac.mask, tac.resize, tac.pairing, tac.absent) == (
        "mean",
        "soft",
        "nearest",
        "pooled",
        "skip",
    )


def test_ramp_up_makes_w_tac_follow_the_cross_teaching_ramp(tmp_path, data):
    trainer = run_trainer(
        tmp_path,
        ["train.yaml", "variant_tac.yaml"],
        data["plain"],
        num_iterations=2,
        val_interval=2,
        tac_weight=0.5,
        tac_ramp_up=True,
    )
    from scripts.training.consistency_weight import RampUpWeight

    assert isinstance(trainer.affinity_weight, RampUpWeight) and trainer.affinity_on
    assert trainer.w_tac(0) == pytest.approx(0.5 * 2.718281828**-5) and trainer.w_tac(2) == pytest.approx(0.5)
    terms = trainer.state.output["terms"]  # the last (second, 0-based 1) iteration
    assert terms["w_tac"].item() == pytest.approx(0.5 * 2.718281828 ** (-5 * 0.25), rel=1e-5)
    assert terms["loss_a"].item() == pytest.approx(
        terms["sup_a"].item() + terms["w_tac"].item() * terms["tac_a"].item(), rel=1e-4
    )
    _assert_best_readings(trainer.affinity)  # the overlay's readings (docs/conventions.md)


def test_tac_overlay_trains_and_the_plain_inference_command_serves_it(tmp_path, data):
    run_bundle(
        tmp_path, ["train.yaml", "variant_tac.yaml"], data["plain"], "--num_iterations", "2", "--val_interval", "2"
    )
    state = torch.load(tmp_path / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    assert state["trainer"]["iteration"] == 2
    model = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("sel_4.") for k in model) and not any(k.startswith("net_") for k in model)
    config = json.loads((tmp_path / "models" / "model_config.json").read_text())
    assert config["variant"] == "tac" and set(config["networks"]) == {"a"}
    assert config["networks"]["a"]["type"].endswith("StructureEnhancedUNet")
    (folder,) = sorted((tmp_path / "eval").glob("training_*"))
    history = json.loads((folder / "pseudo_label_dice.json").read_text())
    assert set(history[-1]["dice"]) == {"tac_unet"}
    # the plain inference command on a folder of volumes (the validation volume's folder)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    entry = json.loads(Path(data["plain"]).read_text())["validation"][0]
    (inputs / "case.nii.gz").symlink_to(Path(data["plain"]).parent / entry["image"])
    out = tmp_path / "pred"
    run_bundle(
        tmp_path,
        ["inference.yaml"],
        data["plain"],
        "--input_dir",
        str(inputs),
        "--output_dir",
        str(out),
        run_id="inference",
    )
    (pred,) = out.glob("*_seg.nii.gz")
    assert nib.load(pred).shape == nib.load(inputs / "case.nii.gz").shape


def test_trainer_adds_w_tac_times_r_to_the_supervised_loss_of_one_network():
    """consistency 'none': L = L_sup(labeled half) + w_tac R; the step is that loss's SGD step."""
    import copy

    from monai.losses import DiceCELoss

    from scripts.training.cross_teaching import CrossTeachingTrainer

    g = torch.Generator().manual_seed(0)
    batch = {
        "labeled": {
            "image": torch.rand(2, 1, 32, 32, generator=g),
            "label": torch.randint(0, 3, (2, 1, 32, 32), generator=g).float(),
        },
        "unlabeled": {"image": torch.rand(2, 1, 32, 32, generator=g)},
    }
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)
    net = _net()
    net.eval()  # no batch-norm statistics moving between the two passes
    ref = copy.deepcopy(net)
    trainer = CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[batch],
        epoch_length=1,
        net_a=net,
        optimizer_a=torch.optim.SGD(net.parameters(), lr=0.1),
        net_b=None,
        supervised_loss=loss_fn,
        consistency="none",
        affinity=TaskAffinityConsistency(net, 3),
        affinity_weight=0.7,
    )
    trainer.network.train = lambda mode=True: trainer.network  # keep eval mode in the trainer's step
    trainer.run()
    tac = TaskAffinityConsistency(ref, 3)
    x = torch.cat([batch["labeled"]["image"], batch["unlabeled"]["image"]])
    out = ref(x)
    sup, r = loss_fn(out[:2], batch["labeled"]["label"]), tac(out, batch["labeled"]["label"], 2)
    terms = trainer.state.output["terms"]
    assert terms["sup_a"].item() == pytest.approx(sup.item(), rel=1e-5)
    assert terms["tac_a"].item() == pytest.approx(r.item(), rel=1e-5) and r.item() > 0
    assert terms["loss_a"].item() == pytest.approx((sup + 0.7 * r).item(), rel=1e-5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    (sup + 0.7 * r).backward()
    opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="net_b and optimizer_b must be None"):
        CrossTeachingTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=[batch],
            net_a=net,
            net_b=ref,
            optimizer_a=torch.optim.SGD(net.parameters(), lr=0.1),
            supervised_loss=loss_fn,
            consistency="none",
        )


def test_with_tac_overlay_adds_the_term_to_network_a_of_cct_r(tmp_path, data):
    # with the default's contrastive term (REPS off: no registration folder here), which taps network A's decoder,
    # which the enhanced U-Net runs its own way
    trainer = run_trainer(
        tmp_path,
        ["train.yaml", "variant_no_reps.yaml", "variant_with_tac.yaml"],
        data["rsl"],
        num_iterations=1,
        val_interval=1,
        rsl_weight=1.0,  # CCT-R's RSL (off in the default since 0.8.0)
    )
    assert isinstance(trainer.network, StructureEnhancedUNet) and trainer.affinity_on
    _assert_best_readings(trainer.affinity)  # the same readings as variant_tac.yaml's (train.yaml's)
    assert trainer.w_tac(0) < 0.01 < trainer.w_tac(1)
    terms = trainer.state.output["terms"]
    assert terms["tac_a"].item() > 0 and "rsl_a" in terms and "cps_a" in terms and "tac_b" not in terms
    assert terms["cl_a"].item() > 0 and terms["cl_b"].item() > 0
    assert terms["loss_a"].item() > terms["sup_a"].item()
