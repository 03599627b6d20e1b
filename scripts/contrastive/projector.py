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
            raise ValueError(
                f"ProjectionHead channels must be positive, got {(in_channels, hidden_channels, out_channels)}"
            )
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)

    def project_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """The same head on gathered pixel features: ``(P, C) -> (P, out_channels)``, unit norm.

        Identical to :meth:`forward` at those pixels (the 1x1 convolutions as linear layers), so
        a loss that uses a few thousand sampled pixels need not project the whole map.
        """
        first, last = self.net[0], self.net[2]
        h = F.relu(F.linear(x, first.weight.flatten(1), first.bias))
        return F.normalize(F.linear(h, last.weight.flatten(1), last.bias), dim=1)


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

    def project_pixels(self, scale: str, feature: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        """Embeddings of the pixels ``flat_index`` (``(b, h, w)`` order) of a ``(B, C, H, W)`` map: ``(P, out)``."""
        b, _, h, w = feature.shape
        flat_index = flat_index.to(feature.device)
        gathered = feature.flatten(2)[flat_index // (h * w), :, flat_index % (h * w)]  # (P, C)
        return self[scale].project_vectors(gathered)
