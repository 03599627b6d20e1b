"""SCL (Eq. 4) and MCSC (Eq. 2) against direct loop computations; sampling rules; feature taps and projectors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

from scripts.contrastive.contrastive_loss import (
    SupervisedPixelContrastiveLoss,
    flatten_pixels,
    sample_contrastive_pixels,
)
from scripts.contrastive.feature_taps import FeatureTap, feature_channels
from scripts.contrastive.mcsc_loss import MultiScaleBalancedContrastiveLoss, balanced_supcon
from scripts.contrastive.projector import ProjectionHead
from scripts.training.networks import StructureEnhancedUNet, SwinUNETR2D

torch.set_num_threads(1)


def _eq4_loop(z, labels, samples, t, registered=None, w1=1.0, w2=0.0):
    """Eq. 4 one anchor at a time, straight from the definition (``registered``: ``(K, N', D)``, ``(K, N')``)."""
    class_losses = []
    for c, anchors, negatives in zip(*samples.as_lists()):
        if anchors.numel() < 2:
            continue
        per_anchor = []
        for n, a in enumerate(anchors.tolist()):
            others = [k for k in anchors.tolist() if k != a]
            pos = torch.stack([z[k] for k in others]).mean(0)
            if registered is not None and bool(registered[1][c, n]):
                pos = w1 * pos + w2 * registered[0][c, n]
            num = math.exp(float(z[a] @ pos) / t)
            den = num + sum(math.exp(float(z[a] @ z[k]) / t) for k in negatives.tolist())
            per_anchor.append(-math.log(num / den))
        class_losses.append(sum(per_anchor) / len(per_anchor))
    return sum(class_losses) / len(class_losses)


def _toy(seed=0, b=2, d=8, h=5, w=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(b, d, h, w, generator=g), dim=1)
    labels = torch.randint(0, classes, (b, h, w), generator=g)
    conf = torch.rand(b, h, w, generator=g)
    return emb, labels, conf


def test_scl_matches_direct_eq4_computation():
    emb, labels, conf = _toy()
    loss_fn = SupervisedPixelContrastiveLoss(3, threshold=0.3, num_anchors=1000, num_negatives=1000, temperature=0.1)
    samples = loss_fn.sample(labels, conf)
    flat = flatten_pixels(emb)
    got = loss_fn.loss_from_samples(flat, samples)
    assert got.item() == pytest.approx(_eq4_loop(flat, labels, samples, 0.1), rel=1e-5)
    # caps not binding: all eligible pixels are used, so forward() is deterministic and equal
    assert loss_fn(emb, labels, conf).item() == pytest.approx(got.item(), rel=1e-5)


def test_scl_reps_blend_matches_loop_and_gradient_flows_to_anchors_only():
    emb, labels, conf = _toy(1)
    emb.requires_grad_(True)
    loss_fn = SupervisedPixelContrastiveLoss(
        3, threshold=0.0, num_anchors=6, num_negatives=7, class_weight=0.3, registered_weight=0.7
    )
    samples = loss_fn.sample(labels, conf, generator=torch.Generator().manual_seed(0))
    k, n = samples.anchor_valid.shape
    reg = F.normalize(torch.randn(k, n, 8), dim=1 + 1)
    avail = (torch.arange(k * n) % 2 == 0).reshape(k, n)
    flat = flatten_pixels(emb)
    got = loss_fn.loss_from_samples(flat, samples, (reg, avail))
    assert got.item() == pytest.approx(_eq4_loop(flat.detach(), labels, samples, 0.1, (reg, avail), 0.3, 0.7), rel=1e-5)
    got.backward()
    grad = flatten_pixels(emb.grad).abs().sum(1)
    anchors = torch.cat(samples.as_lists()[1])
    others = torch.ones_like(grad, dtype=torch.bool)
    others[anchors] = False
    assert grad[anchors].sum() > 0 and grad[others].sum() == 0  # keys are detached


def test_anchor_threshold_and_per_class_caps():
    # 4 classes: background dominates; pixel confidence 0.9 except a block of low-confidence class-1 pixels
    labels = torch.zeros(1, 20, 20, dtype=torch.long)
    labels[0, :4, :4], labels[0, 10:13, :], labels[0, 15:, 15:] = 1, 2, 3
    conf = torch.full((1, 20, 20), 0.9)
    conf[0, :2, :4] = 0.4  # 8 of the 16 class-1 pixels are below h = 0.5
    s = sample_contrastive_pixels(
        labels.reshape(-1),
        conf.reshape(-1) > 0.5,
        4,
        num_anchors=50,
        num_negatives=30,
        generator=torch.Generator().manual_seed(0),
    )
    flat_lab, flat_conf = labels.reshape(-1), conf.reshape(-1)
    classes, anchors, negatives = s.as_lists()
    by_class = dict(zip(classes, zip(anchors, negatives)))
    assert sorted(by_class) == [0, 1, 2, 3]
    anchors1, _ = by_class[1]
    assert anchors1.numel() == 8 and bool((flat_conf[anchors1] > 0.5).all()) and bool((flat_lab[anchors1] == 1).all())
    assert by_class[0][0].numel() == 50  # N caps the anchors of a large class
    for c, (anchors, negatives) in by_class.items():
        assert len(set(anchors.tolist())) == anchors.numel()
        neg_labels = flat_lab[negatives]
        assert bool((neg_labels != c).all()) and negatives.numel() <= 30
        counts = torch.bincount(neg_labels, minlength=4)
        assert int(counts.max()) <= 10  # cap = ceil(30 / 3 other classes): background cannot dominate
    assert int(torch.bincount(flat_lab[by_class[1][1]], minlength=4)[0]) == 10


def _balanced_loop(z, y, t):
    n, total, count = len(y), 0.0, 0
    classes = sorted(set(y.tolist()))
    for i in range(n):
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        if not pos:
            continue
        den = 0.0
        for c in classes:
            members = [k for k in range(n) if k != i and y[k] == c]
            if members:
                den += sum(math.exp(float(z[i] @ z[k]) / t) for k in members) / len(members)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / den) for p in pos) / len(pos)
        count += 1
    return total / count


def test_mcsc_matches_direct_eq2_computation():
    g = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(12, 6, generator=g), dim=1)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    assert balanced_supcon(z, y, 4, 0.1).item() == pytest.approx(_balanced_loop(z, y, 0.1), rel=1e-5)


def test_mcsc_flattens_labels_and_features_in_the_same_order():
    # features encode their own label: aligned flattening gives perfectly clustered classes (low loss);
    # pairing features with the labels of other pixels (the reference code's order) does not.
    labels = torch.zeros(2, 4, 6, dtype=torch.long)
    labels[0, :, 3:], labels[1, 2:, :] = 1, 2
    emb = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    loss = MultiScaleBalancedContrastiveLoss(3, temperature=0.1, max_samples=10_000)
    aligned = loss(emb, labels)
    flat = flatten_pixels(emb)
    assert torch.equal(flat.argmax(1), labels.reshape(-1))
    misaligned = balanced_supcon(emb.reshape(-1, 3), labels.reshape(-1), 3, 0.1)  # (B, D, H, W).reshape: wrong order
    assert aligned.item() < misaligned.item() - 1.0


@pytest.mark.parametrize(
    "make, size",
    [
        (lambda: BasicUNet(spatial_dims=2, in_channels=1, out_channels=4, features=(8, 8, 16, 16, 32, 8)), 32),
        (lambda: SwinUNETR2D(1, 4, feature_size=12), 40),
        (lambda: StructureEnhancedUNet(2, 1, 4, features=(8, 8, 16, 16, 32, 8)), 32),
    ],
)
def test_feature_taps_leave_output_and_state_dict_unchanged(make, size):
    torch.manual_seed(0)
    net = make().eval()
    keys = list(net.state_dict())
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        before = net(x)
        tap = FeatureTap(net)
        after = net(x)
        feats = tap.features()
    assert torch.equal(before, after) and list(net.state_dict()) == keys
    assert feats["full"].shape[-2:] == (size, size) and feats["coarse"].shape[-2:] == (size // 8, size // 8)
    assert feature_channels(net) == {k: v.shape[1] for k, v in feats.items()}
    tap.remove()


def test_projection_head_shapes_and_unit_norm():
    head = ProjectionHead(16)
    out = head(torch.randn(2, 16, 5, 7))
    assert out.shape == (2, 128, 5, 7)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 5, 7), atol=1e-5)
    assert [m.out_channels for m in head.net if hasattr(m, "out_channels")] == [256, 128]


def test_sparse_projection_equals_dense_loss_and_gradients():
    """SCL on only the sampled pixels (projected as vectors) equals SCL on the densely projected map."""
    from scripts.contrastive.projector import ScaleProjectors

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 16, 9, 11, generator=g)
    labels = torch.randint(0, 3, (2, 9, 11), generator=g)
    conf = torch.rand(2, 9, 11, generator=g)
    heads = ScaleProjectors({"full": 16})
    loss_fn = SupervisedPixelContrastiveLoss(3, threshold=0.2, num_anchors=20, num_negatives=15, temperature=0.1)
    samples = loss_fn.sample(labels, conf, torch.Generator().manual_seed(0))
    assert sum(a.numel() for a in samples.as_lists()[1]) < labels.numel()  # caps bind: a real subset

    dense = loss_fn.loss_from_samples(flatten_pixels(heads({"full": feats})["full"]), samples)
    dense_grads = torch.autograd.grad(dense, list(heads.parameters()))
    assert samples.order.numel() < labels.numel()  # only these pixels are embedded
    selected = heads.project_pixels("full", feats, samples.order.reshape(-1)).reshape(*samples.order.shape, -1)
    sparse = loss_fn.loss_from_samples(selected, samples)
    sparse_grads = torch.autograd.grad(sparse, list(heads.parameters()))
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    for a, b in zip(dense_grads, sparse_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_mcsc_on_its_drawn_pixels_equals_mcsc_on_the_whole_embedded_map():
    """The term embeds only the pixels MCSC draws (the 1x1 head as linear layers): the same loss and the same
    gradients as embedding the whole map first, as the term did before."""
    from scripts.contrastive.contrastive_loss import flatten_pixels

    torch.manual_seed(3)
    head = ProjectionHead(6, hidden_channels=16, out_channels=8)
    loss_fn = MultiScaleBalancedContrastiveLoss(4, temperature=0.1, max_samples=50, threshold=0.3)
    labels, conf = torch.randint(0, 4, (2, 12, 12)), torch.rand(2, 12, 12)
    results = []
    for sampled in (False, True):
        feats = torch.randn(2, 6, 12, 12, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        g = torch.Generator().manual_seed(7)
        if sampled:
            idx, valid = loss_fn.draw(labels, conf, generator=g)
            z = head.project_vectors(flatten_pixels(feats)[idx])
            loss = loss_fn.on_samples(z, labels.reshape(-1)[idx], valid)
        else:
            loss = loss_fn(head(feats), labels, conf, generator=g)
        loss.backward()
        results.append((loss.detach(), feats.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    assert results[0][1].abs().sum() > 0
