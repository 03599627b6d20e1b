"""Similarity measures on sampled intensities, with a validity mask (points inside the moving volume).

Both work on ``(B, N)`` batches (one row per pair) and return one value per row, higher = more
similar.  Mutual information reuses MONAI's Parzen windowing (``GlobalMutualInformationLoss``);
the mask only changes which samples enter the joint histogram.
"""

from __future__ import annotations

import torch
from monai.losses import GlobalMutualInformationLoss


def masked_mutual_information(
    parzen: GlobalMutualInformationLoss, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mutual information per batch row of ``fixed``/``moving`` ``(B, N)`` over points with ``mask``.

    Uses MONAI's Parzen windowing; the joint histogram only counts valid points (ITK likewise
    ignores samples that map outside the moving image).
    """
    wa, _, wb, _ = parzen.parzen_windowing(fixed, moving)  # (B, N, bins)
    m = mask.to(wa.dtype)[..., None]
    count = m.sum(dim=1).clamp(min=1.0)  # (B, 1)
    wa = wa * m
    pa = wa.sum(dim=1) / count  # (B, bins)
    pb = (wb * m).sum(dim=1) / count
    pab = torch.bmm(wa.transpose(1, 2), wb) / count[..., None]
    papb = pa[:, :, None] * pb[:, None, :]
    eps = 1e-7
    return torch.sum(pab * torch.log((pab + eps) / (papb + eps) + eps), dim=(1, 2))


def masked_ncc(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global normalised cross-correlation per batch row over points with ``mask``."""
    m = mask.to(fixed.dtype)
    n = m.sum(dim=1).clamp(min=1.0)
    mf = (fixed * m).sum(1) / n
    mm = (moving * m).sum(1) / n
    df = (fixed - mf[:, None]) * m
    dm = (moving - mm[:, None]) * m
    return (df * dm).sum(1) / torch.sqrt((df**2).sum(1) * (dm**2).sum(1) + 1e-8)
