"""Whole-volume inference with a 2D network: slice by slice, resized to the patch size and back.

Training resizes every 2D slice to the patch size, so inference does the same: each slice of the
volume (along its through-plane axis, read from the geometry) is resized to ``patch_size``, run
through the network, and its logits are resized back to the slice's own size with bilinear
interpolation. The output has exactly the input's spatial shape, so the prediction lives on the
input's voxel grid and keeps its affine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

from scripts.data.slicing import resolve_slice_axis


class SliceResizeInferer(Inferer):
    """Run a 2D network over every slice of ``(B, C, X, Y, Z)`` volumes.

    Args:
        patch_size: the 2D size the network was trained on.
        slice_axis: ``"auto"`` (largest voxel spacing, from the input's MetaTensor affine) or 0/1/2.
        sw_batch_size: slices per forward pass (bounds memory for long CT stacks).
        flip_tta: test-time augmentation: also run every slice mirrored along each in-plane axis and
            along both, and average the four logit maps (mirrored back). Only for a model trained with
            mirror flips (``flip_augmentation``); 4x the network time.
    """

    def __init__(
        self, patch_size: Sequence[int], slice_axis: int | str = "auto", sw_batch_size: int = 16, flip_tta: bool = False
    ):
        super().__init__()
        if len(patch_size) != 2:
            raise ValueError(f"patch_size must be 2D, got {patch_size!r}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.slice_axis = slice_axis
        self.sw_batch_size = int(sw_batch_size)
        self.flip_tta = bool(flip_tta)

    def _run(self, network: Callable[..., torch.Tensor], chunk: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.flip_tta:
            return network(chunk, *args, **kwargs)
        out = None
        for dims in ((), (2,), (3,), (2, 3)):
            x = torch.flip(chunk, dims) if dims else chunk
            y = network(x, *args, **kwargs)
            y = torch.flip(y, dims) if dims else y
            out = y if out is None else out + y
        return out / 4.0

    def _axis(self, inputs: torch.Tensor) -> int:
        affine = np.eye(4)
        if isinstance(inputs, MetaTensor):
            affine = inputs.affine
            if affine.ndim == 3:  # batched affines: the volumes of one batch share the slice axis
                affine = affine[0]
        return resolve_slice_axis(self.slice_axis, affine)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(f"SliceResizeInferer expects (B, C, X, Y, Z) volumes, got shape {tuple(inputs.shape)}")
        axis = self._axis(inputs)
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        b, c = x.shape[:2]
        # (B, C, X, Y, Z) -> (B, S, C, H, W) with S the slice axis
        x = x.movedim(2 + axis, 1)
        n_slices, in_plane = x.shape[1], x.shape[3:]
        slices = x.reshape(b * n_slices, c, *in_plane)
        outputs = []
        for start in range(0, slices.shape[0], self.sw_batch_size):
            chunk = slices[start : start + self.sw_batch_size]
            if tuple(chunk.shape[2:]) != self.patch_size:
                chunk = F.interpolate(chunk, size=self.patch_size, mode="bilinear", align_corners=False)
            logits = self._run(network, chunk, *args, **kwargs)
            if tuple(logits.shape[2:]) != tuple(in_plane):
                logits = F.interpolate(logits, size=tuple(in_plane), mode="bilinear", align_corners=False)
            outputs.append(logits)
        out = torch.cat(outputs, 0)
        out = out.reshape(b, n_slices, out.shape[1], *in_plane).movedim(1, 2 + axis)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return out
