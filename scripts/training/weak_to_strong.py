"""Weak-to-strong consistency inside cross teaching (UniMatch-style perturbations, a peer as the teacher).

The unlabeled slices of a batch, as the data pipeline delivers them, are the *weak* view. Each network's
pseudo-label is its peer's argmax on the weak view, kept where the peer's top-1 probability reaches a
threshold; it supervises the network's own prediction on

* a *strong* view of the same slices (:class:`StrongPerturbation`: brightness / contrast jitter, Gaussian
  blur and CutMix between the unlabeled slices of the batch; pseudo-labels, confidences and registered
  labels are mixed with the same boxes), and
* a *feature-perturbed* pass of the weak view (:func:`feature_dropout`: channel dropout on the
  network's deepest encoder feature, the decoder's input, for that pass only),

with the confident cross-entropy :func:`confident_cross_entropy`. Everything here runs on tensors of
the training device; randomness comes from torch's generator (seeded by the run).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, SwinUNETR
from torch import nn

from scripts.training.mean_teacher import unwrap
from scripts.training.networks import SSL4MISUNet

__all__ = [
    "MixedView",
    "StrongPerturbation",
    "confident_cross_entropy",
    "feature_dropout",
    "has_batch_statistics",
    "BOTTLENECKS",
]

#: Network class -> the submodule whose output (the deepest encoder feature) the feature-perturbed pass drops.
BOTTLENECKS: dict[type, str] = {BasicUNet: "down_4", SSL4MISUNet: "down.3", SwinUNETR: "encoder10"}


@dataclass
class MixedView:
    """A strong view and how it was mixed: ``box`` ``(U, 1, H, W)`` is 1 where slice ``i`` shows slice ``perm[i]``."""

    image: torch.Tensor
    box: torch.Tensor
    perm: torch.Tensor

    def mix(self, t: torch.Tensor) -> torch.Tensor:
        """Apply the same CutMix to a per-pixel tensor ``(U, H, W)`` or ``(U, 1, H, W)`` (labels, confidences)."""
        box = self.box[:, 0] if t.ndim == 3 else self.box
        if t.dtype.is_floating_point:
            box = box.to(t.dtype)
            return box * t[self.perm] + (1 - box) * t
        return torch.where(box.bool(), t[self.perm], t)

    def mix_weight(self, weight: torch.Tensor | None) -> torch.Tensor | None:
        """Per-slice RSL weight ``(U,)`` after mixing: the smaller of the two slices' where a box was pasted."""
        if weight is None:
            return None
        pasted = self.box.flatten(1).any(dim=1)
        return torch.where(pasted, torch.minimum(weight, weight[self.perm]), weight)

    def mix_valid(self, valid: torch.Tensor | None) -> torch.Tensor | None:
        """Per-slice validity ``(U,)`` after mixing: valid where the slice and (if a box was pasted) its partner are."""
        if valid is None:
            return None
        pasted = self.box.flatten(1).any(dim=1)
        return torch.where(pasted, valid * valid[self.perm], valid)


class StrongPerturbation:
    """The strong view: intensity jitter, blur and CutMix of a batch of unlabeled slices.

    Args:
        brightness: additive shift drawn from ``[-b, b]`` (images scaled to [0, 1]).
        contrast: multiplicative factor from ``[1 - c, 1 + c]`` around each slice's mean.
        blur_prob, blur_sigma: probability and sigma range (pixels) of a Gaussian blur per slice.
        cutmix_prob: probability that a slice gets a box pasted from another slice of the batch.
        cutmix_area: range of the box area as a fraction of the slice.
    """

    def __init__(
        self,
        brightness: float = 0.1,
        contrast: float = 0.25,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 1.5),
        cutmix_prob: float = 0.5,
        cutmix_area: tuple[float, float] = (0.02, 0.4),
    ) -> None:
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.blur_prob, self.blur_sigma = float(blur_prob), tuple(float(s) for s in blur_sigma)
        self.cutmix_prob, self.cutmix_area = float(cutmix_prob), tuple(float(a) for a in cutmix_area)

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        u = x.shape[0]
        shape = (u,) + (1,) * (x.ndim - 1)
        c = 1 + (torch.rand(shape, device=x.device) * 2 - 1) * self.contrast
        b = (torch.rand(shape, device=x.device) * 2 - 1) * self.brightness
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        out = (x - mean) * c + mean + b
        # a Gaussian blur of random sigma on a random half of the slices, all slices in one grouped
        # convolution (separable, truncated at 4 sigma of the largest sigma); drawn on the device
        blur = torch.rand(u, device=x.device) < self.blur_prob
        lo, hi = self.blur_sigma
        sigma = lo + (hi - lo) * torch.rand(u, device=x.device)
        radius = max(1, math.ceil(4.0 * hi))
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=out.dtype)
        kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None].to(out.dtype)) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)  # (U, k)
        c = out.shape[1]
        k = kernel.repeat_interleave(c, 0)  # (U * C, k): one kernel per slice and channel
        flat = out.reshape(1, u * c, *out.shape[2:])
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=u * c)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=u * c)
        return torch.where(blur.reshape(shape), flat.reshape(out.shape), out)

    def boxes(self, u: int, h: int, w: int, device) -> torch.Tensor:
        """``(U, 1, H, W)`` CutMix masks: a box of random area and aspect ratio on a random share of the
        slices, drawn on the device in one go."""
        if u < 2:
            return torch.zeros((u, 1, h, w), device=device)
        pasted = torch.rand(u, device=device) < self.cutmix_prob
        a0, a1 = self.cutmix_area
        area = (a0 + (a1 - a0) * torch.rand(u, device=device)) * h * w
        ratio = torch.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * torch.rand(u, device=device))
        bh = torch.round(torch.sqrt(area * ratio)).clamp(1, h)
        bw = torch.round(torch.sqrt(area / ratio)).clamp(1, w)
        top = torch.floor(torch.rand(u, device=device) * (h - bh + 1))
        left = torch.floor(torch.rand(u, device=device) * (w - bw + 1))
        rows = torch.arange(h, device=device, dtype=bh.dtype)[None, :, None]
        cols = torch.arange(w, device=device, dtype=bw.dtype)[None, None, :]
        inside = (
            (rows >= top[:, None, None])
            & (rows < (top + bh)[:, None, None])
            & (cols >= left[:, None, None])
            & (cols < (left + bw)[:, None, None])
        )
        return (inside & pasted[:, None, None])[:, None].float()

    def __call__(self, x: torch.Tensor) -> MixedView:
        u, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        perm = torch.roll(torch.arange(u, device=x.device), 1) if u > 1 else torch.arange(u, device=x.device)
        box = self.boxes(u, h, w, x.device)
        strong = self.intensity(x)
        return MixedView(box * strong[perm] + (1 - box) * strong, box, perm)


def confident_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Mean over *all* pixels of ``CE(logits, target) * [confidence >= threshold]`` (UniMatch's masked loss).

    ``target`` ``(U, H, W)`` int64, ``confidence`` ``(U, H, W)``.
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * (confidence >= threshold).to(ce.dtype)).mean()


def _dropout_hook(module: nn.Module, args, out):
    """The bottleneck's forward hook: passes the output through unless a :func:`feature_dropout` block is open."""
    setting = module.__dict__.get("_w2s_dropout")
    if setting is None:
        return None
    p, last = setting
    if last is None:
        return F.dropout2d(out, p, training=True)
    return torch.cat([out[:-last], F.dropout2d(out[-last:], p, training=True)])


@contextlib.contextmanager
def feature_dropout(network: nn.Module, p: float = 0.5, layer: str | None = None, last: int | None = None):
    """Within the block, the network's bottleneck output goes through ``dropout2d(p)`` (training mode).

    ``last``: only the last ``last`` samples of the batch are dropped (the feature-perturbed view of a batched
    pass that the trainer runs as one batch with the others); ``None``: all of them.

    The hook is registered once per network and stays (outside a block it returns the output unchanged); a block
    only sets the bottleneck's ``_w2s_dropout`` attribute. So a compiled network (``graph_capture``) sees the same
    hook every pass and specialises on the setting, instead of recompiling for a new hook each pass."""
    net = unwrap(network)
    if layer is None:
        layer = next((name for cls, name in BOTTLENECKS.items() if isinstance(net, cls)), None)
        if layer is None:
            raise ValueError(
                f"no bottleneck known for {type(net).__name__}; known: {[c.__name__ for c in BOTTLENECKS]}"
            )
    cache = net.__dict__.setdefault("_w2s_layers", {})  # named_modules() once per network, not per iteration
    if layer not in cache:
        module = dict(net.named_modules())[layer]
        module.__dict__["_w2s_dropout"] = None
        module.register_forward_hook(_dropout_hook)
        cache[layer] = module
    module = cache[layer]
    module.__dict__["_w2s_dropout"] = (float(p), None if last is None else int(last))
    try:
        yield
    finally:
        module.__dict__["_w2s_dropout"] = None


def has_batch_statistics(network: nn.Module) -> bool:
    """Whether a layer of the network normalises with statistics of the whole batch (BatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in unwrap(network).modules())
