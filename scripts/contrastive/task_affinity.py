"""Task-affinity consistency (TAC; Chen, Zhang, Debattista, Han, IEEE TMI): the unpaired consistency loss.

The labeled and the unlabeled halves of a batch come from different volumes (unpaired), so TAC
compares what the network *represents per class* in each half rather than pixels. For every class
``c`` and every skip connection ``k`` of a :class:`scripts.training.networks.StructureEnhancedUNet`:

* the class-specific representation is the masked average of a feature map,
  ``E_k^c = sum(x_k * M_k^c) / sum(M_k^c)``, with ``M^c`` the ground-truth mask on labeled slices and
  the network's own prediction on unlabeled ones, resized to the feature map;
* it is taken for the contextual feature ``x_k`` (the encoder's skip feature, the enhancement layer's
  input) and for the structural feature ``x_hat_k = alpha * x_k`` (its output), ``E`` and ``S``;

and the loss is ``R = tau1 / C * sum_c sum_k d(E_l^c, E_u^c) + tau2 / C * sum_c sum_k d(S_l^c, S_u^c)``
with ``C`` the number of classes, background included. No memory bank. The switches (the paper's Eq. 6
read literally is the first value of each; the authors' released code is the second, see
``docs/conventions.md``):

* ``reduction``: ``d`` is the squared Euclidean distance summed over the channels (``"sum"``) or averaged
  over them (``"mean"``, a mean-squared error: R no longer grows with the width of the skips);
* ``mask``: the unlabeled half's masks are the one-hot argmax of the detached logits (``"hard"``: R can
  move only the features), or the softmax probabilities with their gradient (``"soft"``: R also corrects
  the unlabeled prediction towards the labeled half's class statistics);
* ``resize``: masks reach a coarse feature map by area averaging (``"area"``) or nearest neighbour
  (``"nearest"``);
* ``pairing``: one representation per half, pooled over its slices (``"pooled"``), or one per slice with
  the i-th labeled slice compared with the i-th unlabeled one and the distances averaged (``"paired"``);
* ``absent``: a class with no mask in either half adds nothing (``"skip"``) or keeps a zero
  representation and is compared as such (``"zero"``).

:class:`SkipFeatureTap` reads ``x_k`` and ``x_hat_k`` through forward hooks on the enhancement layers,
so the network, its output and its ``state_dict`` are untouched; :class:`TaskAffinityConsistency`
computes ``R`` after the trainer's forward pass of ``[x_l; x_u]``
(:class:`scripts.training.cross_teaching.CrossTeachingTrainer`, ``affinity=``). Nothing is read on the
host: classes are kept or dropped by multiplying with a 0/1 weight.
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
    "check_switches",
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


RESIZE_MODES = ("area", "nearest")


def resize_masks(masks: torch.Tensor, size: Sequence[int], mode: str = "area") -> torch.Tensor:
    """``(B, C, H, W)`` masks to ``size`` by area averaging or nearest neighbour (unchanged when the size fits)."""
    check_switches(resize=mode)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    size = tuple(int(s) for s in size)
    if mode == "nearest":
        return F.interpolate(masks, size=size, mode="nearest")
    return F.adaptive_avg_pool2d(masks, size)


def class_representations(
    features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6, resize: str = "area", per_slice: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked averages ``sum(x * M^c) / sum(M^c)``, over every pixel of every slice or per slice.

    Args:
        features: ``(B, F, h, w)``.
        masks: ``(B, C, H, W)`` class masks (one-hot or soft), resized to ``(h, w)`` here (``resize``).
        per_slice: one representation per slice instead of one for the whole batch.

    Returns:
        ``(C, F)`` representations (zero for an absent class) and ``(C,)`` booleans: the class has pixels;
        with ``per_slice``, ``(B, C, F)`` and ``(B, C)``.
    """
    m = resize_masks(masks.to(features.dtype), features.shape[-2:], resize)
    if per_slice:
        area = m.sum(dim=(2, 3))
        sums = torch.einsum("bfhw,bchw->bcf", features, m)
    else:
        area = m.sum(dim=(0, 2, 3))
        sums = torch.einsum("bfhw,bchw->cf", features, m)
    return sums / area.clamp_min(eps)[..., None], area > eps


REDUCTIONS = ("sum", "mean")
PAIRINGS = ("pooled", "paired")
ABSENT = ("skip", "zero")
MASKS = ("hard", "soft")


def check_switches(**switches: str) -> None:
    """Raise a ValueError naming the first switch (``reduction``, ``resize``, ``pairing``, ``absent``, ``mask``) whose
    value is not one of its readings."""
    allowed = {"reduction": REDUCTIONS, "resize": RESIZE_MODES, "pairing": PAIRINGS, "absent": ABSENT, "mask": MASKS}
    for name, value in switches.items():
        if value not in allowed[name]:
            raise ValueError(f"{name} must be one of {allowed[name]}, got {value!r}")


def representation_distance(
    feat_l: torch.Tensor,
    masks_l: torch.Tensor,
    feat_u: torch.Tensor,
    masks_u: torch.Tensor,
    reduction: str = "sum",
    resize: str = "area",
    pairing: str = "pooled",
    absent: str = "skip",
) -> torch.Tensor:
    """``sum_c d(E_l^c, E_u^c)``: ``d`` the squared distance summed (``"sum"``) or averaged (``"mean"``) over the
    channels; classes present in both halves only (``absent="skip"``) or all (``"zero"``). ``pairing="paired"``
    compares slice i of one half with slice i of the other and averages over the pairs (the halves' first
    ``min(n_l, n_u)`` slices)."""
    check_switches(reduction=reduction, resize=resize, pairing=pairing, absent=absent)
    per_slice = pairing == "paired"
    if per_slice:
        k = min(feat_l.shape[0], feat_u.shape[0])
        feat_l, masks_l, feat_u, masks_u = feat_l[:k], masks_l[:k], feat_u[:k], masks_u[:k]
    e_l, p_l = class_representations(feat_l, masks_l, resize=resize, per_slice=per_slice)
    e_u, p_u = class_representations(feat_u, masks_u, resize=resize, per_slice=per_slice)
    squared = (e_l - e_u) ** 2
    d = squared.mean(dim=-1) if reduction == "mean" else squared.sum(dim=-1)  # (C,) or (B, C)
    if absent == "skip":
        d = d * (p_l & p_u).to(d.dtype)
    d = d.sum(dim=-1)
    return d.mean() if per_slice else d


class TaskAffinityConsistency(nn.Module):
    """TAC's unpaired consistency loss ``R`` between the labeled and unlabeled halves of a batch.

    Args:
        network: the :class:`scripts.training.networks.StructureEnhancedUNet` being trained (hooks are
            registered on its enhancement layers).
        num_classes: ``C``, background included.
        tau_context: ``tau1``, weight of the contextual term (1 for 2D in the paper).
        tau_structure: ``tau2``, weight of the structural term (1 for 2D).
        layers: enhancement layers to use (default: all four skips).
        reduction: ``"sum"`` or ``"mean"`` over the channels (module docstring).
        mask: ``"hard"`` (detached one-hot argmax) or ``"soft"`` (softmax, with gradient) on the unlabeled half.
        resize: ``"area"`` or ``"nearest"`` for the masks at coarse scales.
        pairing: ``"pooled"`` or ``"paired"``.
        absent: ``"skip"`` or ``"zero"``.

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
        reduction: str = "sum",
        mask: str = "hard",
        resize: str = "area",
        pairing: str = "pooled",
        absent: str = "skip",
    ) -> None:
        super().__init__()
        if float(tau_context) < 0 or float(tau_structure) < 0:
            raise ValueError(f"tau_context and tau_structure must be >= 0, got {tau_context!r}, {tau_structure!r}")
        check_switches(reduction=reduction, mask=mask, resize=resize, pairing=pairing, absent=absent)  # before training
        self.num_classes = int(num_classes)
        self.tau_context, self.tau_structure = float(tau_context), float(tau_structure)
        self.reduction, self.mask, self.resize, self.pairing, self.absent = reduction, mask, resize, pairing, absent
        self.tap = SkipFeatureTap(network, layers)

    def masks(self, logits: torch.Tensor, label: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of the labeled half (one-hot ground truth) and of the unlabeled half (``mask``)."""
        masks_l = one_hot(label.long(), self.num_classes, dim=1).float()
        if self.mask == "soft":
            return masks_l, torch.softmax(logits[n:].float(), dim=1)
        masks_u = one_hot(logits[n:].detach().argmax(dim=1, keepdim=True), self.num_classes, dim=1).float()
        return masks_l, masks_u

    def forward(self, logits: torch.Tensor, label: torch.Tensor, n: int) -> torch.Tensor:
        if not 0 < n < logits.shape[0]:
            raise ValueError(
                f"TAC needs labeled and unlabeled slices in the batch, got {n} labeled of {logits.shape[0]}"
            )
        masks_l, masks_u = self.masks(logits, label, n)
        switches = (self.reduction, self.resize, self.pairing, self.absent)
        context = structure = logits.new_zeros((), dtype=torch.float32)
        b = logits.shape[0]  # the pass may have run more views after these slices (batched weak-to-strong)
        for x, x_hat in self.tap.features():
            x, x_hat = x.float(), x_hat.float()
            context = context + representation_distance(x[:n], masks_l, x[n:b], masks_u, *switches)
            structure = structure + representation_distance(x_hat[:n], masks_l, x_hat[n:b], masks_u, *switches)
        return (self.tau_context * context + self.tau_structure * structure) / self.num_classes
