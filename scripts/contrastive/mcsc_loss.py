"""MCSC: the class-balanced supervised contrastive loss of Liu et al. (BMVC 2023), Eq. 2.

For samples ``z_1..z_n`` (unit-norm patch embeddings) with labels ``y``, ``B_c`` the samples of class
``c`` and ``P(i) = B_{y_i} \\ {i}``::

    L = 1/|I| sum_{i in I} -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t) / D_i ),
    D_i = sum_c 1/|B_c \\ {i}| sum_{k in B_c, k != i} exp(z_i.z_k / t)

``I``: samples with at least one positive. The denominator averages within each class before summing
over classes, so a frequent class (background) weighs as much as a rare one.

Samples are pixels (or patches) of ``(B, D, H, W)`` maps. Labels and features are flattened in the
*same* ``(b, h, w)`` order (:func:`scripts.contrastive.contrastive_loss.flatten_pixels` and ``labels.reshape(-1)``);
the public reference code flattens them in different orders, which pairs features with the labels
of other pixels. Dense maps are subsampled to ``max_samples`` pixels (uniformly, same indices for
features and labels) to keep the ``n x n`` similarity tractable.
"""

from __future__ import annotations

import torch
from torch import nn

from scripts.contrastive.contrastive_loss import flatten_pixels

__all__ = ["balanced_supcon", "MultiScaleBalancedContrastiveLoss"]


def balanced_supcon(
    z: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float = 0.1, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 2 on ``(n, D)`` embeddings and ``(n,)`` integer labels (vectorised, ``n x n``).

    ``valid`` ``(n,)``: samples that take part (the others are padding of a fixed-size draw); masks
    instead of indexing, so nothing is read on the host.
    """
    n = z.shape[0]
    labels = labels.reshape(-1).long()
    if labels.numel() != n:
        raise ValueError(f"balanced_supcon: {labels.numel()} labels for {n} samples")
    if n < 2:
        return z.sum() * 0.0
    valid = torch.ones(n, dtype=torch.bool, device=z.device) if valid is None else valid.reshape(-1).to(z.device)
    logits = z @ z.T / temperature
    pair = ~torch.eye(n, dtype=torch.bool, device=z.device) & valid[None, :] & valid[:, None]
    onehot = (labels[:, None] == torch.arange(num_classes, device=z.device)[None, :]).to(z.dtype) * valid[:, None].to(
        z.dtype
    )  # (n, C)
    class_sizes = onehot.sum(0)[None, :] - onehot  # |B_c \ {i}|, (n, C)
    logits = logits - logits.detach().masked_fill(~pair, float("-inf")).max(1, keepdim=True).values.clamp_min(
        -1e4
    )  # stability
    exp = torch.exp(logits) * pair
    per_class = exp @ onehot  # (n, C): sum over k in B_c, k != i
    denom = (per_class / class_sizes.clamp_min(1)).masked_fill(class_sizes == 0, 0.0).sum(1)
    positive = (labels[:, None] == labels[None, :]) & pair
    n_pos = positive.sum(1)
    log_prob = logits - torch.log(denom.clamp_min(torch.finfo(z.dtype).tiny))[:, None]
    per_sample = -(log_prob * positive).sum(1) / n_pos.clamp_min(1)
    keep = (n_pos > 0) & valid
    return torch.where(keep, per_sample, 0.0).sum() / keep.sum().clamp_min(1) + 0.0 * z.sum()


class MultiScaleBalancedContrastiveLoss(nn.Module):
    """MCSC loss of one scale's ``(B, D, H, W)`` embeddings with ``(B, [1,] H, W)`` labels.

    Args:
        num_classes: label values.
        temperature: ``t``.
        max_samples: pixels drawn (uniformly, without replacement) when the map has more.
        threshold: pixels with confidence ``<= threshold`` are not sampled (0 keeps all).
    """

    def __init__(self, num_classes: int, temperature: float = 0.1, max_samples: int = 1024, threshold: float = 0.0):
        super().__init__()
        self.num_classes, self.temperature = int(num_classes), float(temperature)
        self.max_samples, self.threshold = int(max_samples), float(threshold)

    def draw(
        self, labels: torch.Tensor, confidence: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixels the loss uses, in a fixed number: a uniform draw without replacement among the kept pixels
        (the lowest random priorities). Returns their flat indices and whether each is a kept pixel."""
        lab = labels.reshape(-1)
        keep = torch.ones_like(lab, dtype=torch.bool) if confidence is None else confidence.reshape(-1) > self.threshold
        device = "cpu" if generator is not None else lab.device
        priority = torch.rand(lab.shape, generator=generator, device=device).to(lab.device)
        key = torch.where(keep, priority, torch.full_like(priority, 2.0))
        idx = torch.topk(key, min(self.max_samples, lab.numel()), largest=False).indices
        return idx, key[idx] < 2.0

    def on_samples(self, embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The loss of the drawn pixels' ``(n, D)`` unit embeddings and ``(n,)`` labels (``valid``: from :meth:`draw`)."""
        return balanced_supcon(embeddings, labels, self.num_classes, self.temperature, valid=valid)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        confidence: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        flat = flatten_pixels(embeddings)
        lab = labels.reshape(-1)
        if lab.numel() != flat.shape[0]:
            raise ValueError(f"MCSC: labels {tuple(labels.shape)} do not match embeddings {tuple(embeddings.shape)}")
        idx, valid = self.draw(labels, confidence, generator)
        return self.on_samples(flat[idx], lab[idx], valid)
