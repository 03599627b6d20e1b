"""Cost of SCL + REPS on top of a cross-teaching iteration (CPU, patch 224), and the bank's memory.

    python benchmarks/contrastive_speed.py [--patch 224] [--batch 4] [--repeats 3] [--partners 12] \
        [--out benchmarks/results/contrastive.json]

Measures (median of ``repeats``, after one warm-up):
* ``plain``: forward of U-Net + SwinUNETR2D on ``batch`` slices, Dice + CE losses, backward (the cct-r core);
* ``scl_reps``: the same plus :class:`scripts.contrastive.contrastive_term.ContrastiveTerm` (SCL at both scales with
  REPS at 1/8 against a filled bank) for both networks;
* ``vectorised`` vs ``naive``: the SCL + REPS loss alone, vectorised, against a direct implementation
  looping over anchors (one REPS mapping + look-up call per anchor).
The anchor threshold is set to 0 so that the untrained networks still give full anchor sets.
Bank memory: bytes per slice at 1/8 of the patch, and the total at ACDC's default K ((M+K)/5 of the
``acdc_slices`` training slices: 1312 in the headers of the 70-patient x 2-frame train split, per network).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from scripts.contrastive.contrastive_term import ContrastiveTerm
from scripts.contrastive.memory_bank import bank_capacity
from scripts.contrastive.registered_correspondence import RegisteredCorrespondence
from scripts.contrastive.slice_coordinates import ContrastiveBatch
from scripts.data.atomic_io import write_json
from scripts.training.networks import SwinUNETR2D


def _timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _naive_scl_reps(term: ContrastiveTerm, which, emb, lab, conf, geometry, stride):
    """SCL + REPS one anchor at a time (the direct reading of Eq. 4 and Eq. 12)."""
    loss_fn, corr = term.loss, term.correspondence
    bank = term.banks[which]
    flat = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    samples = loss_fn.sample(lab, conf)
    b, h, w = lab.shape
    volume, slices, frames = geometry
    losses = []
    for anchors, negatives in zip(samples.anchors, samples.negatives):
        per = []
        keys = flat.detach()
        for a in anchors.tolist():
            pos = (keys[anchors].sum(0) - keys[a]) / (len(anchors) - 1)
            s, rest = a // (h * w), a % (h * w)
            rc = torch.tensor([rest // w, rest % w], dtype=torch.float64) * stride + (stride - 1) / 2
            uv = frames[s, :, :2] @ rc + frames[s, :, 2]
            feats = []
            if volume[s] >= 0:
                z, uvj, ok = corr.map_slice_points(volume[s : s + 1], slices[s : s + 1], uv[None])
                f, found = bank.lookup(torch.arange(len(corr))[None], z, uvj, ok)
                feats = list(f[0][found[0]])
            if feats:
                pos = loss_fn.class_weight * pos + loss_fn.registered_weight * torch.stack(feats).mean(0)
            logits = torch.cat([(flat[a] @ pos)[None], flat[a] @ keys[negatives].T]) / loss_fn.temperature
            per.append(torch.logsumexp(logits, 0) - logits[0])
        losses.append(torch.stack(per).mean())
    return torch.stack(losses).mean()


def main(
    patch: int = 224,
    batch: int = 4,
    repeats: int = 3,
    volumes: int = 40,
    partners: int = 12,
    acdc_slices: int = 1312,
    out: str = "benchmarks/results/contrastive.json",
):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net_a = BasicUNet(spatial_dims=2, in_channels=1, out_channels=4, features=(16, 32, 64, 128, 256, 16))
    net_b = SwinUNETR2D(1, 4, feature_size=24)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    # synthetic geometry: `volumes` volumes of 10 slices, 1.5 x 1.5 x 10 mm, pairwise small shifts
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 10.0, 1.0])
    ids = [f"v{i:03d}" for i in range(volumes)]
    # each volume registered to its next `partners` volumes (ACDC, 1 labeled, reps_partners 4: 11.4 on average)
    p = min(int(partners), volumes - 1)
    shifts = {(ids[i], ids[(i + k) % volumes]): np.eye(4) for i in range(volumes) for k in range(1, p + 1)}
    for t in shifts.values():
        t[:3, 3] = rng.normal(0, 2, 3)
    corr = RegisteredCorrespondence(ids, [aff] * volumes, [(patch, patch, 10)] * volumes, shifts)
    term = ContrastiveTerm(net_a, 4, net_b, correspondence=corr, registered_weight=0.5, class_weight=0.5)
    term.loss.threshold = 0.0  # untrained networks are rarely > 0.5 confident: time the loss with full anchor sets
    x = torch.rand(batch, 1, patch, patch)
    y = torch.randint(0, 4, (batch, 1, patch, patch)).float()
    n = batch // 2
    u, v = torch.meshgrid(
        torch.arange(patch, dtype=torch.float32), torch.arange(patch, dtype=torch.float32), indexing="ij"
    )
    coords = torch.stack([u, v, torch.ones_like(u)])[None].repeat(batch, 1, 1, 1)
    batch_data = ContrastiveBatch(
        labeled_image=x[:n],
        label=y[:n],
        unlabeled_image=x[n:],
        ids=[ids[i] for i in range(batch)],
        slice_index=torch.arange(batch) % 10,
        slice_coords=coords,
    )

    def plain(with_cl: bool = False):
        net_a.zero_grad()
        net_b.zero_grad()
        out_a, out_b = net_a(x), net_b(x)
        total = (
            loss(out_a[:n], y[:n])
            + loss(out_b[:n], y[:n])
            + loss(out_a[n:], out_b[n:].argmax(1, keepdim=True).float())
            + loss(out_b[n:], out_a[n:].argmax(1, keepdim=True).float())
        )
        if with_cl:
            total = total + 1e-3 * (
                term("a", out_a, torch.softmax(out_b[n:].detach(), 1), batch_data)
                + term("b", out_b, torch.softmax(out_a[n:].detach(), 1), batch_data)
            )
        total.backward()

    # fill the banks: every slice of the first volumes (the anchors' partners)
    for k in range(min(volumes, term.capacity // 10 + 1)):
        bd = ContrastiveBatch(
            labeled_image=x[:n],
            label=y[:n],
            unlabeled_image=x[n:],
            ids=[ids[k]] * batch,
            slice_index=(torch.arange(batch) + (k % 3) * batch) % 10,
            slice_coords=coords,
        )
        with torch.no_grad():
            out_a, out_b = net_a(x), net_b(x)
            term("a", out_a, torch.softmax(out_b[n:], 1), bd)
            term("b", out_b, torch.softmax(out_a[n:], 1), bd)
    t_plain = _timed(lambda: plain(False), repeats)
    t_cl = _timed(lambda: plain(True), repeats)

    with torch.no_grad():
        out_a = net_a(x)
    emb = term.projectors["a"](term.taps["a"].features())["coarse"].detach()
    from scripts.contrastive.contrastive_term import block_labels

    labels = torch.cat([y[:n, 0].long(), out_a[n:].argmax(1)])
    conf = torch.softmax(out_a, 1).max(1).values
    lab, cf = block_labels(labels, conf, 8, 4)
    geometry = term._batch_geometry(batch_data, batch)

    def vectorised():
        samples = term.loss.sample(lab, cf)
        reg = term._registered("a", samples.all_anchors(), lab.shape, 8, *geometry, emb.shape[1])
        return term.loss.loss_from_samples(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]), samples, reg)

    t_vec = _timed(vectorised, repeats)
    t_naive = _timed(lambda: _naive_scl_reps(term, "a", emb, lab, cf, geometry, 8), 1)
    bank = term.banks["a"]
    acdc_capacity = bank_capacity(acdc_slices, 0)
    per_slice = (128 * (patch // 8) ** 2) * 4 + 6 * 8
    result = {
        "patch": patch,
        "batch": batch,
        "threads": 1,
        "repeats": repeats,
        "partners": p,
        "plain_iteration_s": t_plain,
        "scl_reps_iteration_s": t_cl,
        "overhead": t_cl / t_plain - 1.0,
        "scl_reps_loss_vectorised_s": t_vec,
        "scl_reps_loss_naive_s": t_naive,
        "naive_over_vectorised": t_naive / t_vec,
        "anchors_coarse": int(term.loss.sample(lab, cf).all_anchors().numel()),
        "bank_bytes_per_slice": bank.bytes_per_slice,
        "bank_bytes_per_slice_acdc_224": per_slice,
        "acdc_training_slices": acdc_slices,
        "acdc_bank_capacity": acdc_capacity,
        "acdc_bank_total_bytes_per_network": acdc_capacity * per_slice,
    }
    print(json.dumps(result, indent=1))
    write_json(out, result)
    return result


if __name__ == "__main__":
    fire.Fire(main)
