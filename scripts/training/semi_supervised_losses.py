"""Loss terms of the semi-supervised methods, beside the supervised Dice + CE of ``train.yaml``.

* :class:`PseudoLabelDiceLoss` — cross teaching (CTS / CCT-R): Dice of one network's softmax on the
  unlabeled slices against the *other* network's argmax, taken without gradient.
* :class:`PseudoLabelCELoss` — cross pseudo supervision (CPS): cross-entropy against the other
  network's argmax, without gradient.
* :class:`UncertaintyMaskedMSE` and :func:`predictive_entropy` — the uncertainty-aware mean teacher
  (UA-MT): squared difference of student and teacher probabilities where the teacher is certain.
* :class:`SelectedSamplesLoss` — registration supervision (RSL): a loss (Dice + CE against the
  registered label) over only the samples that have a registered label.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = [
    "pseudo_label",
    "PseudoLabelDiceLoss",
    "PseudoLabelCELoss",
    "predictive_entropy",
    "UncertaintyMaskedMSE",
    "SelectedSamplesLoss",
    "label_agreement",
]


def pseudo_label(logits: torch.Tensor) -> torch.Tensor:
    """Hard pseudo-label ``(B, 1, H, W)`` (int64): the argmax over classes, detached from the graph."""
    return logits.detach().argmax(dim=1, keepdim=True)


class PseudoLabelDiceLoss(nn.Module):
    """``Dice(softmax(input), onehot(argmax(teacher)))``: the cross-teaching term ``L_cps``.

    Args:
        kwargs: passed to :class:`monai.losses.DiceLoss`; ``to_onehot_y`` and ``softmax`` are fixed
            to ``True`` (the defaults elsewhere: all classes incl. background, per-sample Dice,
            averaged; as the supervised Dice of ``train.yaml``).
    """

    def __init__(self, **kwargs):
        super().__init__()
        kwargs.update(to_onehot_y=True, softmax=True)
        self.dice = DiceLoss(**kwargs)

    def forward(self, input: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.dice(input, pseudo_label(teacher_logits))


class PseudoLabelCELoss(nn.Module):
    """``CE(input, argmax(teacher))``: the cross pseudo supervision term of CPS (mean over pixels)."""

    def forward(self, input: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, pseudo_label(teacher_logits)[:, 0])


def predictive_entropy(probabilities: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``-sum_c p_c log(p_c + eps)`` over the class axis 1, kept as a singleton axis ``(B, 1, H, W)``."""
    return -(probabilities * torch.log(probabilities + eps)).sum(dim=1, keepdim=True)


class UncertaintyMaskedMSE(nn.Module):
    """UA-MT consistency: ``sum(mask * (softmax(student) - p_teacher)^2) / (2 * sum(mask) + 1e-16)``.

    ``mask = uncertainty < threshold`` (pixels where the teacher is confident); the normalisation
    is that of the UA-MT reference implementation (SSL4MIS), the ``mask`` summed over pixels only.
    """

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_probabilities: torch.Tensor,
        uncertainty: torch.Tensor,
        threshold: float,
    ) -> torch.Tensor:
        mask = (uncertainty < threshold).to(student_logits.dtype)
        squared = (torch.softmax(student_logits, dim=1) - teacher_probabilities.detach()) ** 2
        return (mask * squared).sum() / (2.0 * mask.sum() + 1e-16)


class SelectedSamplesLoss(nn.Module):
    """``loss(input[valid], target[valid])``; zero (still part of the graph) when no sample is valid.

    Registration can fail for a volume, whose unlabeled slices then carry a blank registered label
    and ``valid = 0``; they still take part in the other loss terms.
    """

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.loss = loss

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        valid: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``weight`` ``(U,)``: per-sample weights; the loss is then ``mean_i(w_i * loss(sample i))`` over all
        samples (invalid ones count as 0), each sample's loss computed alone."""
        if valid is None and weight is None:
            return self.loss(input, target)
        # every sample's loss alone, combined with weights on the device (no host read of valid / weight):
        # the supervised losses here (Dice per sample + CE averaged over pixels) are means of per-sample losses,
        # so the mean over the valid samples equals loss(input[valid], target[valid])
        per_sample = torch.stack([self.loss(input[i : i + 1], target[i : i + 1]) for i in range(input.shape[0])])
        v = torch.ones_like(per_sample) if valid is None else (valid.reshape(-1) > 0).to(per_sample.dtype)
        if weight is not None:
            w = weight.reshape(-1).to(per_sample.dtype) * v
            return torch.where(w > 0, w * per_sample, 0.0).sum() / input.shape[0]
        return torch.where(v > 0, per_sample, 0.0).sum() / v.sum().clamp_min(1.0)


def label_agreement(label: torch.Tensor, other: torch.Tensor, num_classes: int, eps: float = 1.0) -> torch.Tensor:
    """Per-sample agreement of two label maps: the mean over the foreground classes of their Dice, ``(U,)``.

    ``label`` ``(U, 1, H, W)`` or ``(U, H, W)`` (a registered label, any dtype), ``other`` the same shape (e.g. the
    students' consensus argmax). A class absent from both counts as agreement (``eps`` smooths: a class both leave
    empty scores 1). Computed on the device with fixed shapes; nothing is read on the host.
    """
    u = label.shape[0]
    a = label.reshape(u, -1).long()
    b = other.reshape(u, -1).long()
    classes = torch.arange(1, num_classes, device=a.device)[None, :, None]  # (1, C-1, 1)
    in_a, in_b = (a[:, None] == classes), (b[:, None] == classes)  # (U, C-1, P)
    inter = (in_a & in_b).sum(-1).float()
    total = in_a.sum(-1).float() + in_b.sum(-1).float()
    return ((2 * inter + eps) / (total + eps)).mean(1)
