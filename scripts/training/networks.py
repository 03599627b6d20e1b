"""The networks of the two-student methods: a 2D SwinUNETR for any slice size, and their ensemble.

* :class:`SwinUNETR2D` — MONAI's ``SwinUNETR(spatial_dims=2)``, whose input sides must be multiples
  of 32; this subclass pads a slice up to the next multiple and crops the logits back, so it takes
  any patch size. Its ``state_dict`` is that of ``SwinUNETR``.
* :class:`EnsembleNet` — the inference network of CTS / CCT-R / CPS: the mean of the logits of the
  two students (``branch="mean"``), or one student alone (``"a"``: the CNN, ``"b"``: the
  Transformer), as the paper reports all three. Its ``state_dict`` holds both students
  (``net_a.*``, ``net_b.*``), so one ``model.pt`` serves every branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import nn

__all__ = ["SwinUNETR2D", "EnsembleNet", "BRANCHES"]

#: ``EnsembleNet`` outputs: the mean of both students' logits, or one student's.
BRANCHES = ("mean", "a", "b")
_BRANCH_ALIASES = {"cnn": "a", "transformer": "b", "ensemble": "mean"}


class SwinUNETR2D(SwinUNETR):
    """``SwinUNETR(spatial_dims=2)`` that accepts any ``(B, C, H, W)`` size.

    The input is zero-padded (symmetrically) to multiples of :attr:`multiple` (32: five 2x
    reductions), and to at least :attr:`min_size` (64: at 32 the deepest features are 1x1, which
    instance normalisation rejects in training); the logits are cropped back to ``(H, W)``. Sizes
    that need neither go straight through.

    Args:
        in_channels, out_channels, feature_size, ...: as :class:`monai.networks.nets.SwinUNETR`;
            ``spatial_dims`` is fixed to 2.
    """

    multiple = 32
    min_size = 64

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 24, **kwargs):
        if kwargs.pop("spatial_dims", 2) != 2:
            raise ValueError("SwinUNETR2D is 2D: spatial_dims must be 2")
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, spatial_dims=2, **kwargs)

    def _padded(self, n: int) -> int:
        return max(self.min_size, -(-n // self.multiple) * self.multiple)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if x_in.ndim != 4:
            raise ValueError(f"SwinUNETR2D expects (B, C, H, W) slices, got shape {tuple(x_in.shape)}")
        h, w = x_in.shape[-2:]
        pad_h, pad_w = (self._padded(n) - n for n in (h, w))
        if not (pad_h or pad_w):
            return super().forward(x_in)
        top, left = pad_h // 2, pad_w // 2
        padded = F.pad(x_in, (left, pad_w - left, top, pad_h - top))
        return super().forward(padded)[..., top : top + h, left : left + w]


def _branch(branch: str) -> str:
    name = _BRANCH_ALIASES.get(str(branch).lower(), str(branch).lower())
    if name not in BRANCHES:
        raise ValueError(f"EnsembleNet branch must be one of {BRANCHES} (or cnn / transformer), got {branch!r}")
    return name


class EnsembleNet(nn.Module):
    """Mean of two segmentation networks' logits, or one of them.

    Args:
        net_a: the first student (the CNN in CTS / CCT-R).
        net_b: the second student (the Transformer in CTS / CCT-R; a second U-Net in CPS).
        branch: ``"mean"`` (default), ``"a"`` / ``"cnn"`` or ``"b"`` / ``"transformer"``; may be
            changed later through :attr:`branch`.
    """

    def __init__(self, net_a: nn.Module, net_b: nn.Module, branch: str = "mean"):
        super().__init__()
        self.net_a = net_a
        self.net_b = net_b
        self.branch = branch

    @property
    def branch(self) -> str:
        return self._branch

    @branch.setter
    def branch(self, value: str) -> None:
        self._branch = _branch(value)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self._branch == "a":
            return self.net_a(image)
        if self._branch == "b":
            return self.net_b(image)
        return 0.5 * (self.net_a(image) + self.net_b(image))
