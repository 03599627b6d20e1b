"""The joint contrastive space: CCT-R's one SCL over both networks' pixels and one REPS bank for both; MCSC's one loss
over both networks' pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import BasicUNet

from scripts.contrastive.contrastive_loss import flatten_pixels
from scripts.contrastive.contrastive_term import ContrastiveTerm, block_labels
from scripts.contrastive.feature_taps import SCALES
from scripts.contrastive.mcsc_loss import balanced_supcon
from scripts.contrastive.memory_bank import SliceFeatureBank, registered_positives
from scripts.contrastive.registered_correspondence import RegisteredCorrespondence
from scripts.data.semi_supervised_data import SemiSupervisedBatch

torch.set_num_threads(1)
FEATURES = (4, 4, 8, 8, 16, 4)


def _setup(joint: bool, seed: int = 0):
    torch.manual_seed(seed)
    net_a, net_b = BasicUNet(2, 1, 3, features=FEATURES), BasicUNet(2, 1, 3, features=FEATURES)
    term = ContrastiveTerm(net_a, 3, net_b, threshold=0.0, num_anchors=40, num_negatives=30, joint=joint)
    g = torch.Generator().manual_seed(seed + 1)
    batch = SemiSupervisedBatch(
        torch.randn(2, 1, 32, 32, generator=g),
        torch.randint(0, 3, (2, 1, 32, 32), generator=g),
        torch.randn(2, 1, 32, 32, generator=g),
    )
    return term, net_a, net_b, batch


def _forward(net_a, net_b, batch):
    x, n = batch.images(), batch.num_labeled
    out_a, out_b = net_a(x), net_b(x)
    return out_a, out_b, torch.softmax(out_b[n:].detach(), 1), torch.softmax(out_a[n:].detach(), 1)


def _dense_sources(term, batch, sources, scale):
    """Each source's block labels, block confidences and densely projected pixels at ``scale`` (the reference)."""
    labs, confs, flats = [], [], []
    for which, logits, peer in sources:
        feats = term.taps[which].features()[scale]
        labels = torch.cat([batch.label[:, 0].long(), peer.argmax(1)])
        lab, conf = block_labels(labels, torch.softmax(logits.detach(), 1).max(1).values, SCALES[scale], 3)
        labs.append(lab[:, : feats.shape[2], : feats.shape[3]])
        confs.append(conf[:, : feats.shape[2], : feats.shape[3]])
        flats.append(flatten_pixels(term.projectors[which][scale](feats)))
    return labs, confs, flats


def _cl_a_after_moving_b(term, net_a, net_b, batch, peer_a, peer_b):
    """``cl_a`` again after B's projector moved (B's embeddings change; labels and confidence stay)."""
    with torch.no_grad():
        for p in term.projector_parameters("b"):
            p.add_(torch.randn_like(p))
    out_a, out_b, _, _ = _forward(net_a, net_b, batch)
    torch.manual_seed(3)
    return term.pair(out_a, peer_a, out_b, peer_b, batch)[0]


def test_joint_loss_equals_scl_over_the_union_of_both_networks_pixels():
    term, net_a, net_b, batch = _setup(joint=True)
    out_a, out_b, peer_a, peer_b = _forward(net_a, net_b, batch)
    torch.manual_seed(7)
    cl_a, cl_b = term.pair(out_a, peer_a, out_b, peer_b, batch)

    # reference: densely project each network's map with its own head, concatenate, SCL per anchor
    torch.manual_seed(7)
    expected = {"a": [], "b": []}
    sources = [("a", out_a, peer_a), ("b", out_b, peer_b)]
    for scale in term.scales:
        labs, confs, flats = _dense_sources(term, batch, sources, scale)
        labs, confs = [x.reshape(-1) for x in labs], [x.reshape(-1) for x in confs]
        samples = term.loss.sample(torch.cat(labs), torch.cat(confs))
        per_anchor = term.loss.anchor_losses(torch.cat(flats), samples)  # (K, N')
        size = labs[0].numel()
        usable = samples.anchor_valid & samples.class_valid()[:, None]
        for k, which in enumerate("ab"):
            means = [
                per_anchor[c][usable[c] & (samples.anchors[c] // size == k)].mean()
                for c in range(per_anchor.shape[0])
                if (usable[c] & (samples.anchors[c] // size == k)).any()
            ]
            expected[which].append(torch.stack(means).mean())
        # the union really mixes the networks: some class has anchors from both
        assert any(((a // size) == 0).any() and ((a // size) == 1).any() for a in samples.as_lists()[1])
    assert cl_a.item() == pytest.approx(torch.stack(expected["a"]).mean().item(), rel=1e-5)
    assert cl_b.item() == pytest.approx(torch.stack(expected["b"]).mean().item(), rel=1e-5)


def test_joint_space_aligns_the_networks_and_each_loss_trains_its_own_network():
    """In the joint space A's loss depends on B's embeddings (its positives and negatives); per network
    it does not. Gradients stay with each network (keys carry none)."""
    results = {}
    for joint in (True, False):
        term, net_a, net_b, batch = _setup(joint)
        out_a, out_b, peer_a, peer_b = _forward(net_a, net_b, batch)
        torch.manual_seed(3)
        cl_a, cl_b = term.pair(out_a, peer_a, out_b, peer_b, batch)
        params_b = list(net_b.parameters()) + list(term.projector_parameters("b"))
        grads = torch.autograd.grad(cl_a, params_b, allow_unused=True, retain_graph=True)
        assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)  # cl_a never trains B
        assert any(
            g is not None and float(g.abs().max()) > 0 for g in torch.autograd.grad(cl_b, params_b, allow_unused=True)
        )
        cl_a2 = _cl_a_after_moving_b(term, net_a, net_b, batch, peer_a, peer_b)
        results[joint] = (cl_a.item(), cl_a2.item())
    assert results[True][0] != pytest.approx(results[True][1], rel=1e-4)
    assert results[False][0] == pytest.approx(results[False][1], rel=1e-6)


def test_joint_bank_reads_both_networks_registered_features():
    ids = ["v0", "v1"]
    corr = RegisteredCorrespondence(
        ids, [np.eye(4)] * 2, [(4, 4, 2)] * 2, {("v1", "v0"): np.eye(4), ("v0", "v1"): np.eye(4)}
    )
    bank = SliceFeatureBank(capacity=4, channels=2, height=4, width=4, num_volumes=2 * len(ids), max_slices=2)
    frame = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    for layer, value in ((0, 1.0), (1, 3.0)):  # volume v0, slice 1: network A's map is 1, B's is 3
        bank.push(torch.tensor([0 + layer * len(ids)]), torch.tensor([1]), torch.full((1, 2, 4, 4), value), frame)
    anchor = (torch.tensor([1]), torch.tensor([1]), torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    joint, found = registered_positives(corr, bank, *anchor, layers=2)
    single, _ = registered_positives(corr, bank, *anchor, layers=1)
    assert bool(found[0]) and joint[0].tolist() == [2.0, 2.0] and single[0].tolist() == [1.0, 1.0]


def test_joint_space_is_ignored_for_one_network():
    net = BasicUNet(2, 1, 3, features=FEATURES)
    assert not ContrastiveTerm(net, 3, None, joint=True).joint  # UA-MT: only the student is trained
    assert not ContrastiveTerm(net, 3, None, loss="mcsc", joint=True).joint


def _mcsc_setup(joint: bool):
    torch.manual_seed(0)
    net_a, net_b = BasicUNet(2, 1, 3, features=FEATURES), BasicUNet(2, 1, 3, features=FEATURES)
    term = ContrastiveTerm(net_a, 3, net_b, loss="mcsc", threshold=0.0, mcsc_max_samples=48, joint=joint)
    _, _, _, batch = _setup(joint)
    return term, net_a, net_b, batch


def test_joint_mcsc_is_one_balanced_loss_over_both_networks_pixels_at_the_same_positions():
    term, net_a, net_b, batch = _mcsc_setup(joint=True)
    out_a, out_b, peer_a, peer_b = _forward(net_a, net_b, batch)
    torch.manual_seed(5)
    cl_a, cl_b = term.pair(out_a, peer_a, out_b, peer_b, batch)
    assert cl_a.item() == cl_b.item()  # both networks get the one loss

    torch.manual_seed(5)  # reference: the same draw, dense projection, Eq. 2 over the union of both networks' pixels
    expected = []
    for scale in term.scales:
        labs, confs, flats = _dense_sources(term, batch, (("a", out_a, peer_a), ("b", out_b, peer_b)), scale)
        idx, _ = term.loss.draw(labs[0], torch.stack(confs).amax(0))
        z = torch.cat([flats[0][idx], flats[1][idx]])
        expected.append(balanced_supcon(z, torch.cat([labs[0].reshape(-1)[idx], labs[1].reshape(-1)[idx]]), 3, 0.1))
    assert cl_a.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_joint_mcsc_trains_both_networks_and_couples_them():
    grads_b, coupled = {}, {}
    for joint in (True, False):
        term, net_a, net_b, batch = _mcsc_setup(joint)
        out_a, out_b, peer_a, peer_b = _forward(net_a, net_b, batch)
        torch.manual_seed(3)
        cl_a, _ = term.pair(out_a, peer_a, out_b, peer_b, batch)
        params_b = list(net_b.parameters()) + list(term.projector_parameters("b"))
        grads = torch.autograd.grad(cl_a, params_b, allow_unused=True, retain_graph=True)
        grads_b[joint] = any(g is not None and float(g.abs().max()) > 0 for g in grads)
        cl_a2 = _cl_a_after_moving_b(term, net_a, net_b, batch, peer_a, peer_b)
        coupled[joint] = cl_a.item() != pytest.approx(cl_a2.item(), rel=1e-6)
    assert grads_b == {True: True, False: False} and coupled == {True: True, False: False}
