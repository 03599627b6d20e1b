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
Everything is batched tensor algebra; the only Python loop is over the (few) classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ContrastiveSamples", "sample_contrastive_pixels", "flatten_pixels", "SupervisedPixelContrastiveLoss"]


@dataclass
class ContrastiveSamples:
    """Sampled flat pixel indices: per class present, its anchors and its negatives."""

    classes: list[int]
    anchors: list[torch.Tensor]
    negatives: list[torch.Tensor]

    def all_anchors(self) -> torch.Tensor:
        """All anchors, class by class (the order REPS look-ups must follow)."""
        if not self.anchors:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(self.anchors)

    def compact(self) -> tuple[torch.Tensor, "ContrastiveSamples"]:
        """``(pixels, samples)``: the distinct sampled flat pixels, and these samples re-indexed into them.

        ``loss_from_samples(project(pixels), compact_samples)`` equals
        ``loss_from_samples(project(all pixels), samples)``: only the sampled pixels need embedding.
        """
        parts = self.anchors + self.negatives
        if not parts:
            return torch.zeros(0, dtype=torch.long), ContrastiveSamples(list(self.classes), [], [])
        pixels, inverse = torch.unique(torch.cat(parts), return_inverse=True)
        pieces = list(torch.split(inverse, [p.numel() for p in parts]))
        k = len(self.anchors)
        return pixels, ContrastiveSamples(list(self.classes), pieces[:k], pieces[k:])


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

    One random priority per pixel; class ``c``'s pixels in priority order give its anchors (first
    ``num_anchors``) and, for every other class, its contribution to the negatives (first ``cap``).
    """
    labels, eligible = labels.reshape(-1), eligible.reshape(-1).bool()
    if labels.shape != eligible.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and eligible {tuple(eligible.shape)} differ")
    priority = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device)
    counts = torch.bincount(labels[eligible].long(), minlength=num_classes)[:num_classes].tolist()
    present = [c for c in range(num_classes) if counts[c] > 0]
    cap = math.ceil(num_negatives / max(len(present) - 1, 1))
    ordered: dict[int, torch.Tensor] = {}
    for c in present:
        take = min(max(num_anchors, cap), counts[c])
        key = torch.where(eligible & (labels == c), priority, torch.full_like(priority, 2.0))
        ordered[c] = torch.topk(key, take, largest=False).indices
    samples = ContrastiveSamples([], [], [])
    for c in present:
        negatives = [ordered[o][:cap] for o in present if o != c]
        if not negatives:
            continue
        samples.classes.append(c)
        samples.anchors.append(ordered[c][:num_anchors])
        samples.negatives.append(torch.cat(negatives)[:num_negatives])
    return samples


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

    def __init__(self, num_classes: int, threshold: float = 0.5, num_anchors: int = 1000, num_negatives: int = 500,
                 temperature: float = 0.1, detach_keys: bool = True, class_weight: float = 1.0, registered_weight: float = 0.0):
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

    def sample(self, labels: torch.Tensor, confidence: torch.Tensor, generator: torch.Generator | None = None) -> ContrastiveSamples:
        """Anchors and negatives of ``labels`` / ``confidence`` (any shape, flattened in the same order)."""
        eligible = confidence.reshape(-1) > self.threshold
        return sample_contrastive_pixels(labels.reshape(-1), eligible, self.num_classes, self.num_anchors, self.num_negatives, generator)

    def anchor_losses(self, flat: torch.Tensor, samples: ContrastiveSamples,
                      registered: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """Eq. 4's per-anchor losses ``l_a`` on flat embeddings ``(P, D)``: one ``(n_c,)`` tensor per class
        of ``samples`` (``None`` for a class that has fewer than two anchors or no negative).

        ``registered``: ``(a_reg (A, D), available (A,) bool)`` for the anchors of
        :meth:`ContrastiveSamples.all_anchors` (REPS), or ``None``.
        """
        keys = flat.detach() if self.detach_keys else flat
        out: list[torch.Tensor | None] = []
        hi = 0
        for anchors_idx, negatives_idx in zip(samples.anchors, samples.negatives):
            n = anchors_idx.numel()
            lo, hi = hi, hi + n
            if n < 2 or negatives_idx.numel() == 0:
                out.append(None)
                continue
            anchors = flat[anchors_idx]
            anchor_keys = keys[anchors_idx]
            positive = (anchor_keys.sum(0, keepdim=True) - anchor_keys) / (n - 1)
            if registered is not None:
                reg, ok = registered[0][lo:hi], registered[1][lo:hi]
                blend = self.class_weight * positive + self.registered_weight * reg.to(positive.dtype)
                positive = torch.where(ok[:, None], blend, positive)
            pos_logit = (anchors * positive).sum(-1, keepdim=True) / self.temperature
            neg_logits = anchors @ keys[negatives_idx].T / self.temperature
            logits = torch.cat([pos_logit, neg_logits], dim=1)
            out.append(torch.logsumexp(logits, dim=1) - pos_logit[:, 0])
        return out

    def loss_from_samples(self, flat: torch.Tensor, samples: ContrastiveSamples,
                          registered: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Eq. 4 on flat embeddings ``(P, D)`` for given samples: the mean over anchors of each class,
        then over the classes (see :meth:`anchor_losses` for ``registered``)."""
        return self.group_losses(flat, samples, None, 1, registered)[0]

    def group_losses(self, flat: torch.Tensor, samples: ContrastiveSamples, groups: list[torch.Tensor] | None,
                     num_groups: int, registered: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Eq. 4 split by where the anchors come from (the joint space of two networks).

        ``groups``: per class of ``samples``, the group (``0 .. num_groups-1``) of each anchor, or
        ``None`` for one group. Returns, per group, the mean over classes of the mean loss of that
        group's anchors of the class (0, still attached to ``flat``, for a group without anchors).
        The keys (positives and negatives) are shared by all groups.
        """
        per_class = self.anchor_losses(flat, samples, registered)
        sums: list[list[torch.Tensor]] = [[] for _ in range(num_groups)]
        for c, losses in enumerate(per_class):
            if losses is None:
                continue
            if groups is None:
                sums[0].append(losses.mean())
                continue
            g = groups[c].to(losses.device)
            for k in range(num_groups):
                mine = g == k
                if bool(mine.any()):
                    sums[k].append(losses[mine].mean())
        return [torch.stack(s).mean() if s else flat.sum() * 0.0 for s in sums]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """SCL of ``(B, D, H, W)`` embeddings with ``(B, [1,] H, W)`` labels and confidence."""
        flat = flatten_pixels(embeddings)
        if labels.numel() != flat.shape[0] or confidence.numel() != flat.shape[0]:
            raise ValueError(
                f"SCL: labels ({tuple(labels.shape)}) and confidence ({tuple(confidence.shape)}) must have one value per "
                f"pixel of the embeddings {tuple(embeddings.shape)}"
            )
        return self.loss_from_samples(flat, self.sample(labels, confidence, generator))
