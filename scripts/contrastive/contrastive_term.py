"""The contrastive term of the cross-teaching trainer: SCL (optionally with REPS) or MCSC, per student.

:class:`ContrastiveTerm` is the pluggable component :class:`scripts.training.cross_teaching.CrossTeachingTrainer`
calls (``contrastive=``, weighted by ``contrastive_weight`` = ``w_cl``). For each trained network it
owns a :class:`scripts.contrastive.feature_taps.FeatureTap` (decoder features at full resolution and 1/8), a
:class:`scripts.contrastive.projector.ScaleProjectors` (their parameters belong in that network's optimizer,
see :meth:`projector_parameters`) and, with REPS, a :class:`scripts.contrastive.memory_bank.SliceFeatureBank`.

Per network and iteration (labels: ground truth on the labeled half, the peer's argmax on the
unlabeled half; confidence: the network's own top-1 softmax probability, detached), at every scale
the labels are the majority label and the confidence the mean confidence of each ``s x s`` block;
the term is the mean over scales of

* ``loss="scl"``: :class:`scripts.contrastive.contrastive_loss.SupervisedPixelContrastiveLoss`; with REPS, at the
  bank's scale, the anchors' positives are blended with :func:`scripts.contrastive.memory_bank.registered_positives`,
  and the batch's embeddings (detached) are then pushed into the bank in their original slice frame
  (:func:`scripts.contrastive.slice_coordinates.fit_patch_frames`);
* ``loss="mcsc"``: :class:`scripts.contrastive.mcsc_loss.MultiScaleBalancedContrastiveLoss`.

**Joint space** (``joint=True``, CCT-R's default; SCL with two trained networks): both networks'
projectors map into one 128-d space and :meth:`ContrastiveTerm.pair` computes one SCL over the union
``F = F_A u F_B`` of the batch's pixels: anchors and negatives are drawn from both networks' pixels
(each labelled by its network's cross label: ground truth, or the *peer's* argmax, as in MCSC), the
class-mean positive averages anchors of both networks, and REPS reads registered positives from one
bank that holds both networks' feature maps of each slice. The loss is returned split by the network
each anchor came from, ``(cl_a, cl_b)`` (per class, the mean over that network's anchors; then the
mean over classes), so each network's loss gains ``w_cl * cl_x`` as in the per-network mode, and the
gradient of ``cl_a`` reaches A's features only (keys carry no gradient). ``joint=False`` is the
per-network mode: a separate loss, space and bank for each network. With ``loss="mcsc"`` the joint space is
MCSC's own (its reference code contrasts the CNN's and the Transformer's pixels as two views of one batch): the
same drawn pixel positions in both networks' maps, one balanced loss over the union, and both networks get that
one loss (``cl_a == cl_b``; gradients reach both, as the reference adds the one loss to both networks' losses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scripts.contrastive.contrastive_loss import SupervisedPixelContrastiveLoss, flatten_pixels
from scripts.contrastive.feature_taps import SCALES, FeatureTap, feature_channels
from scripts.contrastive.mcsc_loss import MultiScaleBalancedContrastiveLoss
from scripts.contrastive.memory_bank import SliceFeatureBank, bank_capacity, registered_positives
from scripts.contrastive.projector import ScaleProjectors
from scripts.contrastive.registered_correspondence import RegisteredCorrespondence
from scripts.contrastive.slice_coordinates import fit_patch_frames
from scripts.data.semi_supervised_data import SemiSupervisedBatch

__all__ = ["LOSSES", "ContrastiveTerm", "block_labels"]

LOSSES = ("scl", "mcsc")


def block_labels(
    labels: torch.Tensor, confidence: torch.Tensor, stride: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, W)`` labels / confidence -> majority label and mean confidence of ``stride`` blocks."""
    if stride == 1:
        return labels, confidence
    classes = torch.arange(num_classes, device=labels.device)[None, :, None, None]
    onehot = (
        labels.long().clamp(0, num_classes - 1)[:, None] == classes
    ).float()  # (F.one_hot reads the labels' range on the host)
    votes = F.avg_pool2d(onehot, stride)
    return votes.argmax(1), F.avg_pool2d(confidence[:, None].float(), stride)[:, 0]


class ContrastiveTerm(nn.Module):
    """SCL / SCL+REPS / MCSC for network A (and B).

    Args:
        net_a: network A; net_b: network B, or ``None`` when B is not trained (UA-MT's teacher).
        num_classes: label values.
        loss: ``"scl"`` or ``"mcsc"``.
        scales: tapped scales (``"full"``, ``"coarse"``).
        in_channels: image channels (for the projector sizes).
        threshold, num_anchors, num_negatives, temperature: SCL's ``h``, ``N``, ``O``, ``t``
            (``threshold`` and ``temperature`` also MCSC's).
        hidden_channels, out_channels: projector widths (256, 128).
        mcsc_max_samples: MCSC pixels per scale.
        correspondence: a :class:`RegisteredCorrespondence` switches REPS on (``loss="scl"`` only).
        class_weight, registered_weight: ``w1``, ``w2`` of ``a_p = w1 a_class + w2 a_reg``.
        bank_scale: the scale stored in the bank and blended with registered positives.
        bank_fraction, bank_max_slices: bank capacity ``min(ceil(fraction * slices), max)``; the
            slices are those of the correspondence's volumes (labeled + unlabeled).
        bank_dtype: ``"float32"`` or ``"float16"``.
        joint: one contrastive space for both networks (module docstring); only with ``net_b``. SCL splits the
            loss by the network of each anchor; MCSC gives both networks the one loss over the union.
    """

    def __init__(
        self,
        net_a: nn.Module,
        num_classes: int,
        net_b: nn.Module | None = None,
        loss: str = "scl",
        scales: Sequence[str] = ("full", "coarse"),
        in_channels: int = 1,
        threshold: float = 0.5,
        num_anchors: int = 1000,
        num_negatives: int = 500,
        temperature: float = 0.1,
        hidden_channels: int = 256,
        out_channels: int = 128,
        mcsc_max_samples: int = 1024,
        correspondence: RegisteredCorrespondence | None = None,
        class_weight: float = 1.0,
        registered_weight: float = 0.0,
        bank_scale: str = "coarse",
        bank_fraction: float = 0.2,
        bank_max_slices: int | None = None,
        bank_dtype: str = "float32",
        joint: bool = False,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"contrastive loss must be one of {LOSSES}, got {loss!r}")
        scales = tuple(scales)
        if correspondence is not None and (loss != "scl" or bank_scale not in scales):
            raise ValueError(f"REPS needs loss='scl' and bank_scale ({bank_scale!r}) among scales {list(scales)}")
        self.num_classes, self.loss_name, self.scales = int(num_classes), loss, scales
        self.joint = bool(joint) and net_b is not None  # one trained network: one space anyway
        nets = {"a": net_a} if net_b is None else {"a": net_a, "b": net_b}
        self.taps = {k: FeatureTap(n, scales) for k, n in nets.items()}
        self.projectors = nn.ModuleDict(
            {
                k: ScaleProjectors(feature_channels(n, in_channels, scales), hidden_channels, out_channels)
                for k, n in nets.items()
            }
        )
        if loss == "scl":
            self.loss = SupervisedPixelContrastiveLoss(
                num_classes,
                threshold,
                num_anchors,
                num_negatives,
                temperature,
                class_weight=class_weight,
                registered_weight=registered_weight,
            )
        else:
            self.loss = MultiScaleBalancedContrastiveLoss(num_classes, temperature, mcsc_max_samples, threshold)
        self.correspondence = correspondence
        self.bank_scale = bank_scale
        self.bank_dtype = {"float32": torch.float32, "float16": torch.float16}[str(bank_dtype)]
        self.capacity = None
        if correspondence is not None:
            self.capacity = bank_capacity(int(correspondence.num_slices().sum()), 0, bank_fraction, bank_max_slices)
        self.banks: dict[str, SliceFeatureBank] = {}
        self.reps_found: dict[str, float] = {}

    @property
    def reps(self) -> bool:
        return self.correspondence is not None

    def projector_parameters(self, which: str = "a"):
        """Parameters of network ``which``'s projector heads (add them to that network's optimizer)."""
        return self.projectors[which].parameters()

    # ------------------------------------------------------------------ checkpoint: the REPS banks
    def get_extra_state(self) -> dict:
        """The REPS banks go into this module's ``state_dict`` (the training checkpoint), so that a resumed
        run looks registered positives up in the same slices as an uninterrupted one."""
        return {"banks": {name: bank.state() for name, bank in self.banks.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.banks = {name: SliceFeatureBank.from_state(s) for name, s in (state or {}).get("banks", {}).items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the banks were saved have no entry: resume with empty banks
        state_dict.setdefault(prefix + "_extra_state", {"banks": {}})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ REPS helpers
    def _bank(self, name: str, emb: torch.Tensor, layers: int) -> SliceFeatureBank:
        """The bank ``name`` (a network, or ``"joint"`` holding ``layers`` maps per slice)."""
        if name in self.banks and self.banks[name].features.device != emb.device:
            self.banks[name].to(emb.device)  # restored from a checkpoint on the CPU
        if name not in self.banks:
            c = self.correspondence
            self.banks[name] = SliceFeatureBank(
                self.capacity * layers,
                emb.shape[1],
                emb.shape[2],
                emb.shape[3],
                len(c) * layers,
                max(c.max_slices, 1),
                dtype=self.bank_dtype,
                device=emb.device,
            )
        return self.banks[name]

    def _batch_geometry(self, batch: SemiSupervisedBatch, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(volume index (B,), slice index (B,), patch->slice frames (B, 2, 3))``; volume -1 = unknown."""
        ids, slices, coords = (getattr(batch, k, None) for k in ("ids", "slice_index", "slice_coords"))
        frames = getattr(batch, "slice_frames", None)  # exact maps from the device sampler, else fitted to the coords
        if ids is None or slices is None or (coords is None and frames is None):
            raise ValueError(
                "REPS needs volume ids, slice indices and slice coordinate maps in every batch: use "
                "scripts.contrastive.slice_coordinates.ContrastivePrepareBatch and SliceCoordinatesd "
                "(configs/train.yaml with use_reps: true)"
            )
        if len(ids) != size:
            raise ValueError(f"REPS: {len(ids)} ids for a batch of {size}")
        device = (frames if frames is not None else coords).device
        if self.correspondence.device != device:
            self.correspondence.to(device)
        # the ids are host strings (from the loader): their indices go to the device with the batch
        volume = torch.tensor([self.correspondence.index.get(i, -1) for i in ids], dtype=torch.long).to(
            device, non_blocking=True
        )
        if frames is None:
            frames, ok = fit_patch_frames(coords)
            volume = torch.where(ok, volume, -1)
        else:
            frames = frames.to(torch.float64)
        return volume, slices.long().to(device, non_blocking=True), frames

    def _registered(
        self,
        name: str,
        flat_idx: torch.Tensor,
        shape: torch.Size,
        stride: int,
        volume: torch.Tensor,
        slices: torch.Tensor,
        frames: torch.Tensor,
        dim: int,
        layers: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Registered positives ``(a_reg (*flat_idx.shape, D), found (*flat_idx.shape))`` of anchors at flat pixel
        indices ``flat_idx`` of a ``(B, h, w)`` map at ``stride``; fixed sizes, on the device."""
        b, h, w = shape
        idx = flat_idx.reshape(-1)
        sample, rest = idx // (h * w), idx % (h * w)
        rc = torch.stack([rest // w, rest % w], 1).to(torch.float64) * stride + (stride - 1) / 2.0  # patch pixel
        f = frames[sample]  # (A, 2, 3) patch -> slice
        uv = (f[..., :2] @ rc[..., None])[..., 0] + f[..., 2]
        vol = volume[sample]
        known = vol >= 0
        if name in self.banks:
            reg, found = registered_positives(
                self.correspondence, self.banks[name], vol.clamp_min(0), slices[sample], uv, layers
            )
            reg, found = reg.float(), found & known
        else:
            reg = torch.zeros((idx.numel(), dim), dtype=torch.float32, device=idx.device)
            found = torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
        # share of this iteration's anchors that found a registered positive (a device scalar, logged by the trainer)
        self.reps_found[name] = found.float().mean() if found.numel() else torch.zeros((), device=idx.device)
        return reg.reshape(*flat_idx.shape, dim), found.reshape(flat_idx.shape)

    @staticmethod
    def _bank_frames(frames: torch.Tensor, stride: int) -> torch.Tensor:
        """Patch->slice frames -> slice ``(u, v, 1)`` -> bank map pixel frames at ``stride``."""
        g = torch.zeros((frames.shape[0], 3, 3), dtype=torch.float64, device=frames.device)
        g[:, :2], g[:, 2, 2] = frames, 1.0
        ok = torch.isfinite(g).reshape(g.shape[0], -1).all(1)
        g = torch.where(ok[:, None, None], g, torch.eye(3, dtype=torch.float64, device=g.device))
        scale = torch.tensor(
            [
                [1.0 / stride, 0, -(stride - 1) / (2.0 * stride)],
                [0, 1.0 / stride, -(stride - 1) / (2.0 * stride)],
                [0, 0, 1],
            ],
            dtype=torch.float64,
        ).to(g.device, non_blocking=True)
        out = (scale @ torch.linalg.inv_ex(g).inverse)[:, :2]
        return torch.where(ok[:, None, None], out, float("nan"))

    def _mcsc(self, scale: str, labs: list, confs: list, features: list, projectors: list) -> list[torch.Tensor]:
        """MCSC's loss of one scale, per source: one loss over the same drawn pixel positions of every source's map,
        each source's pixels with its own cross labels. One source: its drawn pixels. Joint (both networks, as MCSC's
        reference code, which contrasts the CNN's and the Transformer's pixels as two views of one batch): the loss
        over the union, which both networks get (gradients reach both, as in the reference, where the one loss is
        added to both networks' losses)."""
        idx, drawn = self.loss.draw(labs[0], torch.stack(confs).amax(0))
        z, lab, valid = [], [], []
        for k, proj in enumerate(projectors):
            z.append(proj[scale].project_vectors(flatten_pixels(features[k][scale])[idx]))
            lab.append(labs[k].reshape(-1)[idx])
            valid.append(drawn & (confs[k].reshape(-1)[idx] > self.loss.threshold))
        loss = self.loss.on_samples(torch.cat(z), torch.cat(lab), torch.cat(valid))
        return [loss] * len(labs)

    # ------------------------------------------------------------------ the term
    def forward(
        self, which: str, logits: torch.Tensor, peer_probs: torch.Tensor, batch: SemiSupervisedBatch
    ) -> torch.Tensor:
        """The contrastive loss of network ``which`` alone (its own space) after its forward pass on ``batch.images()``.

        Args:
            which: ``"a"`` or ``"b"``.
            logits: the network's ``(L + U, K, H, W)`` logits.
            peer_probs: the peer's ``(U, K, H, W)`` probabilities on the unlabeled half (no gradient).
            batch: the batch (a :class:`scripts.contrastive.slice_coordinates.ContrastiveBatch` for REPS).
        """
        return self._losses([(which, logits, peer_probs)], batch)[0]

    def pair(
        self,
        logits_a: torch.Tensor,
        peer_probs_a: torch.Tensor,
        logits_b: torch.Tensor,
        peer_probs_b: torch.Tensor,
        batch: SemiSupervisedBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cl_a, cl_b)`` of both networks: one loss over the joint space (``joint``), else one per network.

        ``peer_probs_a`` are B's probabilities on the unlabeled half (A's cross labels), ``peer_probs_b`` A's.
        """
        if not self.joint:
            return self("a", logits_a, peer_probs_a, batch), self("b", logits_b, peer_probs_b, batch)
        cl_a, cl_b = self._losses([("a", logits_a, peer_probs_a), ("b", logits_b, peer_probs_b)], batch)
        return cl_a, cl_b

    def _losses(
        self, sources: list[tuple[str, torch.Tensor, torch.Tensor]], batch: SemiSupervisedBatch
    ) -> list[torch.Tensor]:
        """One contrastive loss over the pixels of all ``sources`` ``(which, logits, peer_probs)``, split by source."""
        for which, _, _ in sources:
            if which not in self.taps:
                raise ValueError(f"no contrastive branch {which!r} (have {list(self.taps)})")
        n_src = len(sources)
        bank_name = sources[0][0] if n_src == 1 else "joint"
        labels, confidence, features, projectors = [], [], [], []
        for which, logits, peer_probs in sources:
            labels.append(
                torch.cat(
                    [
                        batch.label.reshape(batch.num_labeled, *batch.label.shape[-2:]).long(),
                        peer_probs.detach().argmax(1),
                    ]
                )
            )
            confidence.append(torch.softmax(logits.detach().float(), 1).max(1).values)
            # the pass may have run more views after these slices (batched weak-to-strong): keep the first ones
            features.append({k: f[: logits.shape[0]] for k, f in self.taps[which].features().items()})
            projectors.append(self.projectors[which])
        # Dense embeddings only where a whole map is needed: the scale stored in the REPS bank. SCL and MCSC
        # elsewhere embed just their sampled pixels (the 1x1 heads as linear layers on gathered features: the
        # same embeddings as the whole map's at those pixels, without projecting every pixel at full resolution).
        dense = {s for s in self.scales if self.reps and s == self.bank_scale}
        emb = [{s: proj[s](feats[s]) for s in self.scales if s in dense} for proj, feats in zip(projectors, features)]
        geometry = self._batch_geometry(batch, labels[0].shape[0]) if self.reps else None
        losses: list[list[torch.Tensor]] = [[] for _ in sources]
        for scale in self.scales:
            stride = SCALES[scale]
            labs, confs = [], []
            for k in range(n_src):
                f = features[k][scale]
                lab, conf = block_labels(labels[k], confidence[k], stride, self.num_classes)
                labs.append(lab[:, : f.shape[2], : f.shape[3]])
                confs.append(conf[:, : f.shape[2], : f.shape[3]])
            if self.loss_name == "mcsc":
                for k, loss in enumerate(self._mcsc(scale, labs, confs, features, projectors)):
                    losses[k].append(loss)
                continue
            per_source = labs[0].numel()  # pixels per source (flat index k * per_source + pixel)
            samples = self.loss.sample(
                torch.cat([x.reshape(-1) for x in labs]), torch.cat([x.reshape(-1) for x in confs])
            )
            groups = samples.anchors // per_source if n_src > 1 else None
            registered = None
            if self.reps and scale == self.bank_scale:
                registered = self._registered(
                    bank_name,
                    samples.anchors % per_source,
                    labs[0].shape,
                    stride,
                    *geometry,
                    projectors[0].out_channels,
                    layers=n_src,
                )
            if scale in emb[0]:
                selected = torch.cat([flatten_pixels(e[scale]) for e in emb])[samples.order]
            else:  # embed only the sampled pixels, each with its own network's head
                idx = samples.order.reshape(-1)
                source, local = idx // per_source, idx % per_source
                selected = None
                for k in range(n_src):
                    own = projectors[k].project_pixels(scale, features[k][scale], local)
                    selected = own if selected is None else torch.where((source == k)[:, None], own, selected)
                selected = selected.reshape(*samples.order.shape, -1)
            for k, loss in enumerate(self.loss.group_losses(selected, samples, groups, n_src, registered)):
                losses[k].append(loss)
        if self.reps:
            volume, slices, frames = geometry
            bank_frames = self._bank_frames(frames, SCALES[self.bank_scale])
            v = len(self.correspondence)
            for k in range(n_src):
                e = emb[k][self.bank_scale]
                self._bank(bank_name, e, n_src).push(volume + k * v, slices, e.detach(), bank_frames, keep=volume >= 0)
        return [torch.stack(x).mean() for x in losses]
