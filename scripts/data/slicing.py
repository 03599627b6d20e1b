"""2D slices of 3D volumes: which axis is the slice axis, and random slice sampling for training.

CCT-R trains 2D networks on slices of 3D volumes. The slice (through-plane) axis is a property of
the acquisition, read from the file's geometry: it is the voxel axis with the largest spacing
(short-axis cine MRI: ~5-10 mm between slices against ~1.5 mm in-plane; axial CT likewise). When
spacings tie (isotropic data) the last axis is used, which is the NIfTI convention for stacks.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, SpatialCrop, SqueezeDim

#: Relative tolerance under which two spacings count as equal when choosing the slice axis.
SPACING_TIE_RTOL = 1e-3


def voxel_spacing(affine) -> np.ndarray:
    """Voxel spacing (mm) of a 4x4 (or 3x3 spatial) affine: the norms of its first three columns."""
    a = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    return np.linalg.norm(a[:3, :3], axis=0)


def through_plane_axis(affine) -> int:
    """The voxel axis (0, 1 or 2) along which a volume is a stack of 2D slices.

    It is the axis of largest spacing; ties (within ``SPACING_TIE_RTOL``) resolve to the highest
    axis, so isotropic volumes are sliced along axis 2.
    """
    spacing = voxel_spacing(affine)
    top = spacing.max()
    candidates = np.flatnonzero(spacing >= top * (1.0 - SPACING_TIE_RTOL))
    return int(candidates[-1])


def resolve_slice_axis(slice_axis: int | str | None, affine) -> int:
    """Return ``slice_axis`` as an int: a fixed 0/1/2, or ``"auto"``/``None`` to read it from ``affine``."""
    if slice_axis is None or slice_axis == "auto":
        return through_plane_axis(affine)
    axis = int(slice_axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1, 2 or 'auto', got {slice_axis!r}")
    return axis


class RandSliced(Randomizable, MapTransform):
    """Pick one random slice of channel-first 3D volumes ``(C, X, Y, Z)``; return ``(C, H, W)``.

    All ``keys`` get the same slice index (image, label and any registered label stay aligned).
    The slice's geometry is kept: the MetaTensor affine is cropped with MONAI's ``SpatialCrop``
    before the singleton axis is squeezed. The chosen index and axis are stored in the output
    under ``"slice_index"`` and ``"slice_axis"`` (later losses map slice pixels between volumes).

    Args:
        keys: keys of the volumes to slice; the first present key's geometry decides the axis.
        slice_axis: ``"auto"`` (largest spacing, see :func:`through_plane_axis`) or 0/1/2.
    """

    def __init__(self, keys: KeysCollection, slice_axis: int | str = "auto", allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.slice_axis = slice_axis
        self._index = 0

    def randomize(self, data: int) -> None:  # data: the number of slices
        self._index = int(self.R.randint(0, data))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        ref = d[keys[0]]
        if ref.ndim != 4:
            raise ValueError(f"RandSliced expects channel-first 3D volumes (C, X, Y, Z), got shape {tuple(ref.shape)}")
        affine = ref.affine if isinstance(ref, MetaTensor) else np.eye(4)
        axis = resolve_slice_axis(self.slice_axis, affine)
        self.randomize(ref.shape[axis + 1])
        d.update(extract_slice(d, keys, axis, self._index))
        d["slice_index"] = self._index
        d["slice_axis"] = axis
        return d


def extract_slice(data: Mapping, keys: Sequence[Hashable], axis: int, index: int) -> dict:
    """Slice ``index`` along spatial ``axis`` of each channel-first volume ``data[k]`` as ``(C, H, W)``."""
    out = {}
    for k in keys:
        vol = data[k]
        if vol.ndim != 4:
            raise ValueError(f"key {k!r}: expected a channel-first 3D volume, got shape {tuple(vol.shape)}")
        start = [0, 0, 0]
        end = list(vol.shape[1:])
        start[axis], end[axis] = index, index + 1
        cropped = SpatialCrop(roi_start=start, roi_end=end)(vol)
        out[k] = SqueezeDim(dim=axis + 1)(cropped)
    return out
