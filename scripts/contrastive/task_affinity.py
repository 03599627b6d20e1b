"""Task-affinity consistency (TAC; Chen, Zhang, Debattista, Han, IEEE TMI): the unpaired consistency loss.

The labeled and the unlabeled halves of a batch come from different volumes (unpaired), so TAC
compares what the network *represents per class* in each half rather than pixels. For every class
``c`` and every skip connection ``k`` of a :class:`scripts.training.networks.StructureEnhancedUNet`:

* the class-specific representation is the masked average of a feature map,
  ``E_k^c = sum(x_k * M_k^c) / sum(M_k^c)`` over the pixels of the half (all its slices together),
  with ``M^c`` the ground-truth mask on labeled slices and the network's own (detached) argmax on
  unlabeled ones, resized to the feature map by area averaging (a soft mask at coarse scales);
* it is taken for the contextual feature ``x_k`` (the encoder's skip feature, the enhancement layer's
  input) and for the structural feature ``x_hat_k = alpha * x_k`` (its output), ``E`` and ``S``;

and the loss is ``R = tau1 / C * sum_c sum_k ||E_l^c - E_u^c||^2 + tau2 / C * sum_c sum_k ||S_l^c - S_u^c||^2``
(squared Euclidean norm over channels). A class missing from either half (empty mask) adds nothing
to that scale's sum; ``C`` is the number of classes, background included. No memory bank.

:class:`SkipFeatureTap` reads ``x_k`` and ``x_hat_k`` through forward hooks on the enhancement layers,
so the network, its output and its ``state_dict`` are untouched; :class:`TaskAffinityConsistency`
computes ``R`` after the trainer's forward pass of ``[x_l; x_u]``
(:class:`scripts.training.cross_teaching.CrossTeachingTrainer`, ``affinity=``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.utils import one_hot
from torch import nn

from scripts.training.mean_teacher import unwrap

__all__ = [
    "SkipFeatureTap",
    "resize_masks",
    "class_representations",
    "representation_distance",
    "TaskAffinityConsistency",
]


class SkipFeatureTap:
    """Keep the input (contextual) and output (structural) of a network's enhancement layers.

    Args:
        network: a network with enhancement layers (DDP / wrappers unwrapped).
        layers: names of the layers; default ``network.skip_layers``.

    After ``network(x)``, :meth:`features` returns ``[(x_k, x_hat_k), ...]`` in the order of ``layers``.
    The tensors keep their autograd graph.
    """

    def __init__(self, network: nn.Module, layers: Sequence[str] | None = None) -> None:
        net = unwrap(network)
        layers = list(getattr(net, "skip_layers", ()) if layers is None else layers)
        modules = dict(net.named_modules())
        missing = [name for name in layers if name not in modules]
        if not layers or missing:
            raise ValueError(
                f"{type(net).__name__} has no enhancement layers {missing or ''} to tap: TAC needs "
                "scripts.training.networks.StructureEnhancedUNet (configs/variant_tac.yaml)"
            )
        self.layers = layers
        self._captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]
        self._handles.append(net.register_forward_pre_hook(lambda module, args: self._captured.clear()))

    def _hook(self, name: str):
        def hook(module, args, output):
            self._captured[name] = (args[0], output)

        return hook

    def features(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if set(self._captured) != set(self.layers):
            raise ValueError("no skip features captured: run a forward pass of the network first")
        return [self._captured[name] for name in self.layers]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def resize_masks(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, H, W)`` masks to ``size`` by area averaging (unchanged when the size already fits)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.adaptive_avg_pool2d(masks, tuple(int(s) for s in size))


def class_representations(
    features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked averages ``sum(x * M^c) / sum(M^c)`` over every pixel of every slice.

    Args:
        features: ``(B, F, h, w)``.
        masks: ``(B, C, H, W)`` class masks (one-hot or soft), resized to ``(h, w)`` here.

    Returns:
        ``(C, F)`` representations (zero for an absent class) and ``(C,)`` booleans: the class has pixels.
    """
    m = resize_masks(masks.to(features.dtype), features.shape[-2:])
    area = m.sum(dim=(0, 2, 3))
    present = area > eps
    sums = torch.einsum("bfhw,bchw->cf", features, m)
    return sums / area.clamp_min(eps)[:, None], present


def representation_distance(
    feat_l: torch.Tensor, masks_l: torch.Tensor, feat_u: torch.Tensor, masks_u: torch.Tensor
) -> torch.Tensor:
    """``sum_c ||E_l^c - E_u^c||^2`` over the classes present in both halves."""
    e_l, p_l = class_representations(feat_l, masks_l)
    e_u, p_u = class_representations(feat_u, masks_u)
    both = (p_l & p_u).to(e_l.dtype)
    return (((e_l - e_u) ** 2).sum(dim=1) * both).sum()


class TaskAffinityConsistency(nn.Module):
    """TAC's unpaired consistency loss ``R`` between the labeled and unlabeled halves of a batch.

    Args:
        network: the :class:`scripts.training.networks.StructureEnhancedUNet` being trained (hooks are
            registered on its enhancement layers).
        num_classes: ``C``, background included.
        tau_context: ``tau1``, weight of the contextual term (1 for 2D in the paper).
        tau_structure: ``tau2``, weight of the structural term (1 for 2D).
        layers: enhancement layers to use (default: all four skips).

    Call with the logits of the forward pass of ``[x_l; x_u]``, the labels ``(n, 1, H, W)`` of the
    first ``n`` slices, and ``n``. Features are compared in float32.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        tau_context: float = 1.0,
        tau_structure: float = 1.0,
        layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if float(tau_context) < 0 or float(tau_structure) < 0:
            raise ValueError(f"tau_context and tau_structure must be >= 0, got {tau_context!r}, {tau_structure!r}")
        self.num_classes = int(num_classes)
        self.tau_context, self.tau_structure = float(tau_context), float(tau_structure)
        self.tap = SkipFeatureTap(network, layers)

    def masks(self, logits: torch.Tensor, label: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot masks of the labeled half (ground truth) and the unlabeled half (own argmax, detached)."""
        masks_l = one_hot(label.long(), self.num_classes, dim=1).float()
        masks_u = one_hot(logits[n:].detach().argmax(dim=1, keepdim=True), self.num_classes, dim=1).float()
        return masks_l, masks_u

    def forward(self, logits: torch.Tensor, label: torch.Tensor, n: int) -> torch.Tensor:
        if not 0 < n < logits.shape[0]:
            raise ValueError(
                f"TAC needs labeled and unlabeled slices in the batch, got {n} labeled of {logits.shape[0]}"
            )
        masks_l, masks_u = self.masks(logits, label, n)
        context = structure = logits.new_zeros((), dtype=torch.float32)
        for x, x_hat in self.tap.features():
            x, x_hat = x.float(), x_hat.float()
            context = context + representation_distance(x[:n], masks_l, x[n:], masks_u)
            structure = structure + representation_distance(x_hat[:n], masks_l, x_hat[n:], masks_u)
        return (self.tau_context * context + self.tau_structure * structure) / self.num_classes
