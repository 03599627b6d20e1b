"""The mean teacher of UA-MT: an exponential moving average of the student, and its uncertainty.

Following the UA-MT reference implementation (Yu et al., MICCAI 2019; SSL4MIS):

* after each optimizer step the teacher's weights move toward the student's,
  ``theta_t <- alpha theta_t + (1 - alpha) theta_s`` with ``alpha = min(1 - 1 / (step + 1), decay)``;
* on the unlabeled slices the teacher runs ``passes`` times on inputs perturbed by clipped Gaussian
  noise; the consistency target is one such pass and the uncertainty is the entropy of the mean
  of all passes.
"""

from __future__ import annotations

import torch
from torch import nn

from scripts.training.semi_supervised_losses import predictive_entropy

__all__ = ["unwrap", "ema_update", "noisy_teacher_predictions"]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else itself)."""
    return module.module if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else module


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> float:
    """Move ``teacher`` toward ``student`` (parameters by EMA, buffers copied); return the ``alpha`` used."""
    alpha = min(1.0 - 1.0 / (int(step) + 1), float(decay))
    teacher, student = unwrap(teacher), unwrap(student)
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher and student differ: {len(t_params)} vs {len(s_params)} parameter tensors")
    for t, s in zip(t_params, s_params):
        t.lerp_(s.detach(), 1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
    return alpha


@torch.no_grad()
def noisy_teacher_predictions(
    teacher: nn.Module, images: torch.Tensor, passes: int = 8, noise_std: float = 0.1, noise_clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities on noisy copies of ``images``: ``(target, uncertainty)``.

    All ``passes`` noisy copies go through the teacher in one batch. ``target`` ``(B, K, H, W)`` is
    the softmax of the first pass; ``uncertainty`` ``(B, 1, H, W)`` the entropy of the mean softmax.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    b = images.shape[0]
    copies = images.repeat(passes, *([1] * (images.ndim - 1)))
    noise = torch.clamp(torch.randn_like(copies) * noise_std, -noise_clip, noise_clip)
    probabilities = torch.softmax(teacher(copies + noise).float(), dim=1)
    probabilities = probabilities.reshape(passes, b, *probabilities.shape[1:])
    return probabilities[0], predictive_entropy(probabilities.mean(dim=0))
