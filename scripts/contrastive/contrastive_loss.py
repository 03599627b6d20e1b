"""SCL: the supervised pixel contrastive loss of CCT-R (Eq. 4), vectorised over anchors.

Inputs are per-pixel embeddings ``z`` (unit norm), labels ``y`` (ground truth on labeled slices,
the other network's argmax on unlabeled ones) and a confidence map ``q`` (top-1 probability).

* Anchors of class ``c``: pixels with ``y = c`` and ``q > h`` (``threshold``, 0.5); at most
  ``num_anchors`` (N = 1000) are drawn at random.
* Negatives of class ``c``: at most ``num_negatives`` (O = 500) eligible pixels (``y != c``,
  ``q > h``), drawn with a per-class cap ``ceil(O / (number of other present classes))`` from each
  other class, so that background cannot dominate.
* Positive key of anchor ``a`` of class ``c``: the mean of the class's *other* anchors,
  ``a_class = (sum_k z_k - z_a) / (n_c - 1)``; with REPS it is blended with the registered
  positive, ``a_p = w1 * a_class + w2 * a_reg`` (anchors without one keep ``a_class``).
* Per anchor::

      l_a = -log( exp(z_a . a_p / t) / (exp(z_a . a_p / t) + sum_{k in negatives(c)} exp(z_a . z_k / t)) )

  with temperature ``t`` = 0.1; averaged over the class's anchors, then over the classes present
  (a class needs two anchors and one negative).

Keys (positives and negatives) carry no gradient by default (``detach_keys``); the anchors do.

Everything has a fixed size and stays on the device: every class gets a ``(T,)`` row of its
lowest-priority eligible pixels (``T = min(max(N, O), pixels)``; rows of classes with fewer eligible
pixels are padded and masked), anchors are the first ``N`` of each row, negatives a ``(K, O)`` table
of positions in those rows with a validity mask, and the loss is masked means over ``(K, N)``
anchors. Nothing is read back to the host (no ``bincount().tolist()``, no boolean indexing), so a
GPU step never waits for it; the numbers equal those of the variable-length formulation above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ContrastiveSamples", "sample_contrastive_pixels", "flatten_pixels", "SupervisedPixelContrastiveLoss"]


@dataclass
class ContrastiveSamples:
    """Fixed-size samples of ``K`` classes (all device tensors; rows of absent classes are masked).

    Attributes:
        order: ``(K, T)`` flat pixel indices, per class its eligible pixels in priority order (padded).
        count: ``(K,)`` eligible pixels per class.
        num_anchors: ``N'`` = ``min(N, T)``: anchors of class ``c`` are ``order[c, :N']`` where ``anchor_valid``.
        anchor_valid: ``(K, N')``.
        negatives: ``(K, O')`` positions in ``order.reshape(-1)`` (``o * T + rank``) of each class's negatives.
        negative_valid: ``(K, O')``.
    """

    order: torch.Tensor
    count: torch.Tensor
    num_anchors: int
    anchor_valid: torch.Tensor
    negatives: torch.Tensor
    negative_valid: torch.Tensor

    @property
    def anchors(self) -> torch.Tensor:
        """``(K, N')`` flat pixel indices of the anchors (valid where ``anchor_valid``)."""
        return self.order[:, : self.num_anchors]

    def negative_pixels(self) -> torch.Tensor:
        """``(K, O')`` flat pixel indices of the negatives (valid where ``negative_valid``)."""
        return self.order.reshape(-1)[self.negatives]

    def class_valid(self) -> torch.Tensor:
        """``(K,)``: classes that enter the loss (two anchors, one negative)."""
        return (self.anchor_valid.sum(1) >= 2) & self.negative_valid.any(1)

    def as_lists(self) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """``(classes, anchors, negatives)`` of the classes present with a negative, as variable-length
        flat-index tensors (host reads: for tests and inspection, not for the training step)."""
        classes, anchors, negatives = [], [], []
        for c in range(self.order.shape[0]):
            if not bool(self.count[c] > 0) or not bool(self.negative_valid[c].any()):
                continue
            classes.append(c)
            anchors.append(self.anchors[c][self.anchor_valid[c]])
            negatives.append(self.negative_pixels()[c][self.negative_valid[c]])
        return classes, anchors, negatives


def flatten_pixels(x: torch.Tensor) -> torch.Tensor:
    """``(B, D, H, W) -> (B * H * W, D)`` in ``(b, h, w)`` order (the order of ``labels.reshape(-1)``)."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, D, H, W) map, got shape {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def sample_contrastive_pixels(
    labels: torch.Tensor,
    eligible: torch.Tensor,
    num_classes: int,
    num_anchors: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> ContrastiveSamples:
    """Draw anchors and negatives among ``eligible`` pixels (flat ``labels`` / ``eligible`` of shape ``(P,)``).

    One random priority per pixel; class ``c``'s eligible pixels in priority order give its anchors
    (first ``num_anchors``) and, for every other class present, its contribution to the negatives
    (first ``cap = ceil(num_negatives / (classes present - 1))``), the contributions concatenated in
    class order and cut at ``num_negatives``. Fixed shapes, no host reads.
    """
    labels, eligible = labels.reshape(-1), eligible.reshape(-1).bool()
    if labels.shape != eligible.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and eligible {tuple(eligible.shape)} differ")
    k, p = int(num_classes), labels.shape[0]
    device = labels.device
    priority = torch.rand(labels.shape, generator=generator, device="cpu" if generator is not None else device).to(
        device
    )
    classes = torch.arange(k, device=device)
    member = eligible[None, :] & (labels.long()[None, :] == classes[:, None])  # (K, P)
    count = member.sum(1)  # (K,)
    t = min(max(int(num_anchors), int(num_negatives)), p)
    order = torch.topk(
        torch.where(member, priority[None, :], torch.full_like(priority, 2.0)[None, :]), t, dim=1, largest=False
    ).indices
    present = count > 0
    others = present.sum() - 1
    cap = torch.div(int(num_negatives) + others.clamp_min(1) - 1, others.clamp_min(1), rounding_mode="floor")  # ceil
    o = min(int(num_negatives), t)
    rank = torch.arange(o, device=device)
    # candidates of class c: (class o', rank r) for every o' != c present, r < min(cap, count[o']), in class order
    take = rank[None, :] < torch.minimum(cap, count)[:, None]  # (K_o, O')
    cand = take[None, :, :] & (classes[:, None, None] != classes[None, :, None])  # (K_c, K_o, O')
    cand = cand.reshape(k, k * o)
    keep = cand & (torch.cumsum(cand.long(), 1) <= int(num_negatives))
    positions = (classes[:, None] * t + rank[None, :]).reshape(1, k * o).expand(k, -1)  # o' * T + r
    first = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :o]  # kept candidates first, in order
    negatives = positions.gather(1, first)
    negative_valid = keep.gather(1, first)
    n = min(int(num_anchors), t)
    anchor_valid = torch.arange(n, device=device)[None, :] < count[:, None]
    return ContrastiveSamples(order, count, n, anchor_valid, negatives, negative_valid)


class SupervisedPixelContrastiveLoss(nn.Module):
    """SCL (module docstring). ``forward(embeddings, labels, confidence)`` on ``(B, D, H, W)`` maps.

    Args:
        num_classes: number of label values (background included).
        threshold: ``h``; anchors need confidence ``> h``.
        num_anchors: ``N`` per class.
        num_negatives: ``O`` per class.
        temperature: ``t``.
        detach_keys: stop gradients through positive and negative keys.
        class_weight, registered_weight: ``w1``, ``w2`` of the REPS blend.
    """

    def __init__(
        self,
        num_classes: int,
        threshold: float = 0.5,
        num_anchors: int = 1000,
        num_negatives: int = 500,
        temperature: float = 0.1,
        detach_keys: bool = True,
        class_weight: float = 1.0,
        registered_weight: float = 0.0,
    ):
        super().__init__()
        if num_classes < 2 or num_anchors < 2 or num_negatives < 1 or temperature <= 0:
            raise ValueError(
                f"SCL needs num_classes >= 2, num_anchors >= 2, num_negatives >= 1, temperature > 0; got "
                f"{num_classes}, {num_anchors}, {num_negatives}, {temperature}"
            )
        self.num_classes, self.threshold = int(num_classes), float(threshold)
        self.num_anchors, self.num_negatives = int(num_anchors), int(num_negatives)
        self.temperature, self.detach_keys = float(temperature), bool(detach_keys)
        self.class_weight, self.registered_weight = float(class_weight), float(registered_weight)

    def sample(
        self, labels: torch.Tensor, confidence: torch.Tensor, generator: torch.Generator | None = None
    ) -> ContrastiveSamples:
        """Anchors and negatives of ``labels`` / ``confidence`` (any shape, flattened in the same order)."""
        eligible = confidence.reshape(-1) > self.threshold
        return sample_contrastive_pixels(
            labels.reshape(-1), eligible, self.num_classes, self.num_anchors, self.num_negatives, generator
        )

    def anchor_losses(
        self,
        selected: torch.Tensor,
        samples: ContrastiveSamples,
        registered: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Eq. 4's per-anchor losses ``l_a``: ``(K, N')`` (meaningful where ``samples.anchor_valid``).

        ``selected``: ``(K, T, D)`` embeddings of ``samples.order`` (or ``(P, D)`` embeddings of every
        pixel, gathered here). ``registered``: ``(a_reg (K, N', D), available (K, N') bool)`` (REPS), or ``None``.
        """
        if selected.ndim == 2:
            selected = selected[samples.order]
        keys = selected.detach() if self.detach_keys else selected
        n = samples.num_anchors
        anchors, anchor_keys = selected[:, :n], keys[:, :n]
        valid = samples.anchor_valid.to(anchor_keys.dtype)
        count = valid.sum(1)
        total = (anchor_keys * valid[..., None]).sum(1, keepdim=True)
        positive = (total - anchor_keys) / (count - 1).clamp_min(1)[:, None, None]
        if registered is not None:
            reg, ok = registered
            blend = self.class_weight * positive + self.registered_weight * reg.to(positive.dtype)
            positive = torch.where(ok[..., None], blend, positive)
        pos_logit = (anchors * positive).sum(-1) / self.temperature  # (K, N')
        negative_keys = keys.reshape(-1, keys.shape[-1])[samples.negatives]  # (K, O', D)
        neg_logits = torch.bmm(anchors, negative_keys.transpose(1, 2)) / self.temperature  # (K, N', O')
        neg_logits = neg_logits.masked_fill(~samples.negative_valid[:, None, :], float("-inf"))
        logits = torch.cat([pos_logit[..., None], neg_logits], dim=2)
        return torch.logsumexp(logits.float(), dim=2) - pos_logit.float()

    def loss_from_samples(
        self,
        selected: torch.Tensor,
        samples: ContrastiveSamples,
        registered: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Eq. 4 for given samples: the mean over anchors of each class, then over the classes (see
        :meth:`anchor_losses` for ``selected`` and ``registered``)."""
        return self.group_losses(selected, samples, None, 1, registered)[0]

    def group_losses(
        self,
        selected: torch.Tensor,
        samples: ContrastiveSamples,
        groups: torch.Tensor | None,
        num_groups: int,
        registered: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Eq. 4 split by where the anchors come from (the joint space of two networks).

        ``groups``: ``(K, N')`` group (``0 .. num_groups-1``) of each anchor, or ``None`` for one group.
        Returns, per group, the mean over classes of the mean loss of that group's anchors of the class
        (0, still attached to the embeddings, for a group without anchors). The keys (positives and
        negatives) are shared by all groups.
        """
        losses = self.anchor_losses(selected, samples, registered)
        usable = samples.anchor_valid & samples.class_valid()[:, None]
        out = []
        for k in range(num_groups):
            mine = usable if groups is None else usable & (groups == k)
            m = mine.to(losses.dtype)
            per_class = (torch.where(mine, losses, 0.0)).sum(1) / m.sum(1).clamp_min(1)
            has = mine.any(1).to(losses.dtype)
            out.append((per_class * has).sum() / has.sum().clamp_min(1) + 0.0 * losses.sum())
        return out

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        confidence: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """SCL of ``(B, D, H, W)`` embeddings with ``(B, [1,] H, W)`` labels and confidence."""
        flat = flatten_pixels(embeddings)
        if labels.numel() != flat.shape[0] or confidence.numel() != flat.shape[0]:
            raise ValueError(
                f"SCL: labels ({tuple(labels.shape)}) and confidence ({tuple(confidence.shape)}) must have one value per "
                f"pixel of the embeddings {tuple(embeddings.shape)}"
            )
        return self.loss_from_samples(flat, self.sample(labels, confidence, generator))
