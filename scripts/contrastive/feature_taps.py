"""Decoder feature maps of the segmentation networks, read through forward hooks.

The contrastive terms of CCT-R (SCL, REPS, MCSC) work on decoder features at full resolution and at
a coarse scale (1/8: 28x28 at patch 224). :class:`FeatureTap` registers forward hooks on two decoder
blocks of a network and keeps their outputs of the last forward pass; the network itself, its
output and its ``state_dict`` are untouched, so checkpoints stay loadable by the inference configs.

Tapped layers (:data:`DEFAULT_LAYERS`):

* ``BasicUNet`` (and its subclass :class:`scripts.training.networks.StructureEnhancedUNet`): the convolutions
  of ``upcat_1`` (full resolution, ``features[5]`` channels) and of ``upcat_4`` (1/8, ``features[3]`` channels),
  whose output is the block's, whichever forward runs the block (MONAI's, the capture-friendly one, the enhanced
  U-Net's own);
* :class:`scripts.training.networks.SSL4MISUNet`: ``up4`` (full, ``features[0]``) and ``up1`` (1/8,
  ``features[3]``);
* ``SwinUNETR`` / :class:`scripts.training.networks.SwinUNETR2D`: ``decoder1`` (full, ``feature_size``) and
  ``decoder4`` (1/8, ``4 * feature_size``). ``SwinUNETR2D`` pads its input to a multiple of 32; the
  tapped maps are cropped back to the input's extent (exactly: the padding is a multiple of the
  stride, or resampled over the exact region otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, SwinUNETR
from torch import nn

from scripts.training.mean_teacher import unwrap
from scripts.training.networks import SSL4MISUNet, SwinUNETR2D

__all__ = ["SCALES", "DEFAULT_LAYERS", "FeatureTapError", "FeatureTap", "feature_channels"]

#: Scale name -> downsampling factor of the tapped feature map relative to the input slice.
SCALES = {"full": 1, "coarse": 8}

#: Network class -> {scale: name of the submodule whose output is tapped}.
DEFAULT_LAYERS: dict[type, dict[str, str]] = {
    BasicUNet: {"full": "upcat_1.convs", "coarse": "upcat_4.convs"},
    SSL4MISUNet: {"full": "up4", "coarse": "up1"},
    SwinUNETR: {"full": "decoder1", "coarse": "decoder4"},
}


class FeatureTapError(ValueError):
    """A network cannot be tapped (unknown architecture, missing layer) or no features were captured."""


def _default_layers(net: nn.Module) -> dict[str, str]:
    for cls, layers in DEFAULT_LAYERS.items():
        if isinstance(net, cls):
            return dict(layers)
    raise FeatureTapError(
        f"no default decoder layers for {type(net).__name__}; pass layers={{'full': name, 'coarse': name}} "
        f"(known: {[c.__name__ for c in DEFAULT_LAYERS]})"
    )


class FeatureTap:
    """Keep the decoder feature maps of a network's last forward pass.

    Args:
        network: the segmentation network (DDP / ``EnsembleNet`` members are unwrapped).
        scales: the scales to tap, names of :data:`SCALES`.
        layers: ``{scale: submodule name}``; default from :data:`DEFAULT_LAYERS`.

    After ``network(x)``, :meth:`features` returns ``{scale: (B, C_s, H / s, W / s)}`` aligned with
    ``x`` (``H, W`` of the input, sides divided by the stride and rounded down). The tapped tensors
    keep their autograd graph (the contrastive loss trains the decoder).
    """

    def __init__(
        self, network: nn.Module, scales: tuple[str, ...] = ("full", "coarse"), layers: Mapping[str, str] | None = None
    ):
        self.network = unwrap(network)
        unknown = [s for s in scales if s not in SCALES]
        if unknown or not scales:
            raise FeatureTapError(f"scales must be a non-empty subset of {list(SCALES)}, got {list(scales)}")
        self.scales = tuple(scales)
        layers = dict(_default_layers(self.network) if layers is None else layers)
        modules = dict(self.network.named_modules())
        self._captured: dict[str, torch.Tensor] = {}
        self._input_hw: tuple[int, int] | None = None
        self._handles = []
        for scale in self.scales:
            name = layers.get(scale)
            if name not in modules:
                raise FeatureTapError(f"{type(self.network).__name__} has no submodule {name!r} for scale {scale!r}")
            self._handles.append(modules[name].register_forward_hook(self._hook(scale)))
        self._handles.append(self.network.register_forward_pre_hook(self._record_input))

    def _hook(self, scale: str):
        def hook(module, args, output):
            self._captured[scale] = output

        return hook

    def _record_input(self, module, args) -> None:
        self._captured = {}
        self._input_hw = tuple(args[0].shape[-2:])

    def remove(self) -> None:
        """Remove the hooks (the network is then exactly as before)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def features(self) -> dict[str, torch.Tensor]:
        """``{scale: feature map}`` of the last forward pass, cropped to the input's extent."""
        if self._input_hw is None or set(self._captured) != set(self.scales):
            raise FeatureTapError(f"no features captured from {type(self.network).__name__}: run a forward pass first")
        h, w = self._input_hw
        out = {}
        for scale in self.scales:
            out[scale] = self._crop(self._captured[scale], h, w, SCALES[scale])
        return out

    def _crop(self, feat: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
        """Crop a map of the (possibly padded) network input back to the ``h x w`` input region."""
        if isinstance(self.network, SwinUNETR2D):
            hp, wp = self.network._padded(h), self.network._padded(w)
        else:
            hp, wp = h, w
        top, left = (hp - h) // 2, (wp - w) // 2
        oh, ow = h // stride, w // stride
        if top % stride == 0 and left % stride == 0 and feat.shape[-2] * stride == hp and feat.shape[-1] * stride == wp:
            t, l = top // stride, left // stride
            return feat[..., t : t + oh, l : l + ow]
        # general case: bilinear resampling of the exact input region (pixel-centre convention)
        b = feat.shape[0]
        theta = torch.zeros((b, 2, 3), dtype=feat.dtype, device=feat.device)
        theta[:, 0, 0], theta[:, 1, 1] = w / wp, h / hp
        theta[:, 0, 2] = (2 * left + w) / wp - 1
        theta[:, 1, 2] = (2 * top + h) / hp - 1
        grid = F.affine_grid(theta, [b, feat.shape[1], oh, ow], align_corners=False)
        return F.grid_sample(feat, grid, mode="bilinear", align_corners=False)


@torch.no_grad()
def feature_channels(
    network: nn.Module,
    in_channels: int = 1,
    scales: tuple[str, ...] = ("full", "coarse"),
    layers: Mapping[str, str] | None = None,
    size: int = 64,
) -> dict[str, int]:
    """``{scale: channels}`` of the tapped maps, found with one small forward pass (in eval mode)."""
    net = unwrap(network)
    tap = FeatureTap(net, scales, layers)
    was_training = net.training
    try:
        net.eval()
        p = next(net.parameters())
        net(torch.zeros((1, in_channels, size, size), dtype=p.dtype, device=p.device))
        return {s: int(f.shape[1]) for s, f in tap.features().items()}
    finally:
        tap.remove()
        net.train(was_training)
