"""Projector heads of the contrastive terms: per-pixel embeddings of decoder feature maps.

A :class:`ProjectionHead` is two linear layers applied at every pixel (1x1 convolutions) to 256 then
128 channels, with a ReLU between them, and L2-normalises the result over channels. One head per
tapped scale (:class:`ScaleProjectors`). The heads live outside the segmentation networks (their
parameters join the networks' optimizers), so the networks' ``state_dict`` s are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProjectionHead", "ScaleProjectors"]


class ProjectionHead(nn.Module):
    """``(B, C, H, W) -> (B, out_channels, H, W)``, unit L2 norm over channels at every pixel.

    Args:
        in_channels: channels of the feature map.
        hidden_channels: width of the first 1x1 convolution (256).
        out_channels: embedding size (128).
    """

    def __init__(self, in_channels: int, hidden_channels: int = 256, out_channels: int = 128):
        super().__init__()
        if min(in_channels, hidden_channels, out_channels) < 1:
            raise ValueError(f"ProjectionHead channels must be positive, got {(in_channels, hidden_channels, out_channels)}")
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class ScaleProjectors(nn.ModuleDict):
    """One :class:`ProjectionHead` per scale: ``{scale: in_channels}`` -> ``{scale: head}``.

    Calling it on ``{scale: feature map}`` returns ``{scale: embedding}`` for the scales it has.
    """

    def __init__(self, channels: Mapping[str, int], hidden_channels: int = 256, out_channels: int = 128):
        super().__init__({s: ProjectionHead(int(c), hidden_channels, out_channels) for s, c in channels.items()})
        self.out_channels = int(out_channels)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        missing = [s for s in self.keys() if s not in features]
        if missing:
            raise KeyError(f"ScaleProjectors: no feature map for scales {missing} (got {list(features)})")
        return {s: head(features[s]) for s, head in self.items()}
