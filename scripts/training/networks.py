"""The networks of the two-student methods: a 2D SwinUNETR for any slice size, and their ensemble.

* :class:`SwinUNETR2D` — MONAI's ``SwinUNETR(spatial_dims=2)``, whose input sides must be multiples
  of 32; this subclass pads a slice up to the next multiple and crops the logits back, so it takes
  any patch size. Its ``state_dict`` is that of ``SwinUNETR``.
* :class:`SSL4MISUNet` — the 2D U-Net of the SSL4MIS code that CTS, MCSC and CCT-R build on:
  BatchNorm, LeakyReLU, encoder dropout 0.05 / 0.1 / 0.2 / 0.3 / 0.5, features 16-256, bilinear
  upsampling after a 1x1 convolution, built from MONAI's ``Convolution`` blocks
  (``configs/variant_ssl4mis_unet.yaml`` uses it as network A).
* :class:`StructureEnhancedUNet` — MONAI's ``BasicUNet`` whose skip connections pass through a
  :class:`StructuralEnhancement` layer (TAC, Chen et al., IEEE TMI): the encoder feature ``x`` is
  rescaled by ``alpha = sigmoid(f_psi(ReLU(f_xbar(xbar) + f_x(x))))`` computed from ``x`` and the
  upsampled decoder feature ``xbar`` of the same size, and ``alpha * x`` replaces ``x`` in the
  concatenation (``configs/variant_tac.yaml``). Its state_dict is ``BasicUNet``'s plus ``sel_*``.
* :class:`EnsembleNet` — the inference network of CTS / CCT-R / CPS: the mean of the logits of the
  two students (``branch="mean"``), or one student alone (``"a"``: the CNN, ``"b"``: the
  Transformer), as the paper reports all three. Its ``state_dict`` holds both students
  (``net_a.*``, ``net_b.*``), so one ``model.pt`` serves every branch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import BasicUNet, SwinUNETR
from torch import nn

__all__ = ["SwinUNETR2D", "SSL4MISUNet", "StructuralEnhancement", "StructureEnhancedUNet", "EnsembleNet", "BRANCHES"]

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
            ``spatial_dims`` is fixed to 2. ``use_flash_attention`` defaults to ``True`` here: MONAI
            then computes window attention with ``scaled_dot_product_attention`` whenever gradients
            are off (validation, inference; about 1.4x faster on one CPU core, same logits within
            float tolerance); training keeps MONAI's explicit attention (no gain from SDPA measured).
    """

    multiple = 32
    min_size = 64

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 24, **kwargs):
        if kwargs.pop("spatial_dims", 2) != 2:
            raise ValueError("SwinUNETR2D is 2D: spatial_dims must be 2")
        kwargs.setdefault("use_flash_attention", True)
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, spatial_dims=2, **kwargs
        )

    def _padded(self, n: int) -> int:
        return max(self.min_size, -(-n // self.multiple) * self.multiple)

    def _check_input_size(self, spatial_shape) -> None:
        """MONAI's check, in plain Python (its NumPy version splits a compiled graph, ``graph_capture``); the input
        is padded to multiples of 32 before it, so it only fails for a caller that bypasses :meth:`forward`."""
        wrong = [i + 2 for i, n in enumerate(spatial_shape) if int(n) % self.multiple]
        if wrong:
            raise ValueError(f"spatial dimensions {wrong} of input {tuple(spatial_shape)} must be divisible by 32")

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


def _conv_block(in_ch: int, out_ch: int, dropout: float, act) -> nn.Sequential:
    """conv3x3 - BN - LeakyReLU - dropout - conv3x3 - BN - LeakyReLU (SSL4MIS ``ConvBlock``)."""
    first = Convolution(
        2, in_ch, out_ch, kernel_size=3, act=act, norm="batch", dropout=dropout or None, adn_ordering="NAD"
    )
    return nn.Sequential(first, Convolution(2, out_ch, out_ch, kernel_size=3, act=act, norm="batch", adn_ordering="NA"))


class _UpBlock(nn.Module):
    """1x1 conv (deep channels to skip channels), bilinear x2 upsampling, concatenation, conv block."""

    def __init__(self, deep_ch: int, skip_ch: int, out_ch: int, act) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(deep_ch, skip_ch, kernel_size=1)
        self.conv = _conv_block(2 * skip_ch, out_ch, 0.0, act)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(deep), size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class SSL4MISUNet(nn.Module):
    """The SSL4MIS 2D U-Net (the CNN of the CTS / MCSC / CCT-R papers).

    Args:
        in_channels, out_channels: image channels and classes.
        features: channels of the five encoder levels.
        dropout: dropout of each encoder level (after the first convolution of its block).
        negative_slope: of the LeakyReLU.

    Inputs of any size: the decoder upsamples to each skip connection's size (the papers' sizes are
    multiples of 16). Decoder blocks ``up1`` (1/8) ... ``up4`` (full resolution) are what the
    contrastive terms tap.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        f, p = list(features), list(dropout)
        if len(f) != 5 or len(p) != 5:
            raise ValueError(f"SSL4MISUNet needs 5 features and 5 dropout rates, got {f} and {p}")
        act = ("leakyrelu", {"negative_slope": float(negative_slope), "inplace": False})
        self.in_conv = _conv_block(in_channels, f[0], p[0], act)
        self.down = nn.ModuleList([_conv_block(f[i], f[i + 1], p[i + 1], act) for i in range(4)])
        self.up1 = _UpBlock(f[4], f[3], f[3], act)
        self.up2 = _UpBlock(f[3], f[2], f[2], act)
        self.up3 = _UpBlock(f[2], f[1], f[1], act)
        self.up4 = _UpBlock(f[1], f[0], f[0], act)
        self.out_conv = nn.Conv2d(f[0], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.in_conv(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = self.up1(skips[4], skips[3])
        y = self.up2(y, skips[2])
        y = self.up3(y, skips[1])
        y = self.up4(y, skips[0])
        return self.out_conv(y)


class StructuralEnhancement(nn.Module):
    """TAC's structural enhancement layer on one skip connection.

    ``alpha = sigmoid(f_psi(ReLU(f_xbar(xbar) + f_x(x))))`` with 1x1 convolutions ``f_x`` (skip
    channels to ``inter_channels``), ``f_xbar`` (decoder channels to ``inter_channels``) and ``f_psi``
    (to one channel: one weight per pixel, shared by the skip's channels); the output is the
    structural feature ``alpha * x``, of ``x``'s shape.

    Args:
        skip_channels: channels of the encoder feature ``x``.
        decoder_channels: channels of the decoder feature ``xbar`` (same spatial size as ``x``).
        inter_channels: of the hidden map; default ``max(1, skip_channels // 2)``.
    """

    def __init__(self, skip_channels: int, decoder_channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        inter = int(inter_channels) if inter_channels else max(1, int(skip_channels) // 2)
        self.f_x = nn.Conv2d(skip_channels, inter, kernel_size=1)
        self.f_xbar = nn.Conv2d(decoder_channels, inter, kernel_size=1)
        self.f_psi = nn.Conv2d(inter, 1, kernel_size=1)

    def alpha(self, x: torch.Tensor, xbar: torch.Tensor) -> torch.Tensor:
        """The per-pixel weights ``(B, 1, H, W)`` in (0, 1)."""
        return torch.sigmoid(self.f_psi(F.relu(self.f_xbar(xbar) + self.f_x(x))))

    def forward(self, x: torch.Tensor, xbar: torch.Tensor) -> torch.Tensor:
        return self.alpha(x, xbar) * x


class StructureEnhancedUNet(BasicUNet):
    """``BasicUNet`` (2D) with a :class:`StructuralEnhancement` on each of its four skip connections.

    Same constructor as ``BasicUNet`` (``spatial_dims`` must be 2) plus ``inter_channels`` of the
    enhancement layers. Layer ``sel_k`` sits on the skip of decoder block ``upcat_k``: ``sel_4`` at
    1/8 resolution ... ``sel_1`` at full resolution. The TAC loss reads each layer's input ``x`` (the
    contextual feature) and output ``alpha * x`` (the structural feature) through forward hooks
    (:class:`scripts.contrastive.task_affinity.SkipFeatureTap`).
    """

    skip_layers = ("sel_1", "sel_2", "sel_3", "sel_4")

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        inter_channels: int | None = None,
        **kwargs,
    ) -> None:
        if int(spatial_dims) != 2:
            raise ValueError("StructureEnhancedUNet is 2D: spatial_dims must be 2")
        super().__init__(
            spatial_dims=2, in_channels=in_channels, out_channels=out_channels, features=features, **kwargs
        )
        f = [int(v) for v in features]
        # (skip channels, channels of the upsampled decoder feature) of upcat_1 ... upcat_4 (BasicUNet's UpCat)
        shapes = {1: (f[0], f[1]), 2: (f[1], f[2] // 2), 3: (f[2], f[3] // 2), 4: (f[3], f[4] // 2)}
        for k, (skip, dec) in shapes.items():
            setattr(self, f"sel_{k}", StructuralEnhancement(skip, dec, inter_channels))

    @staticmethod
    def _up(upcat: nn.Module, sel: StructuralEnhancement, x: torch.Tensor, x_e: torch.Tensor) -> torch.Tensor:
        """``UpCat.forward`` with the skip ``x_e`` replaced by ``sel(x_e, upsampled x)``."""
        x_0 = upcat.upsample(x)
        if upcat.is_pad:  # odd sizes: as UpCat, pad the upsampled map by one on the far side
            pad = [0, int(x_e.shape[-1] != x_0.shape[-1]), 0, int(x_e.shape[-2] != x_0.shape[-2])]
            if any(pad):
                x_0 = F.pad(x_0, pad, "replicate")
        return upcat.convs(torch.cat([sel(x_e, x_0), x_0], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = self._up(self.upcat_4, self.sel_4, x4, x3)
        u3 = self._up(self.upcat_3, self.sel_3, u4, x2)
        u2 = self._up(self.upcat_2, self.sel_2, u3, x1)
        u1 = self._up(self.upcat_1, self.sel_1, u2, x0)
        return self.final_conv(u1)


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
