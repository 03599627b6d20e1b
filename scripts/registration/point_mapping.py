"""Point correspondences between volumes through stored transforms (for the contrastive module)."""

from __future__ import annotations

import numpy as np
import torch

from .geometry import GeometryError, apply_affine, check_affine, slice_axis
from .transform import PairTransform


def map_slice_points(transform, affine_i, affine_j, z: int, pixel_coords, axis: int | None = None):
    """Map pixels of slice ``z`` of volume i to (continuous) voxel coordinates of volume j.

    Args:
        transform: ``T_ij`` as a RAS world 4x4 (numpy or torch) or a :class:`PairTransform`.
        affine_i, affine_j: voxel -> RAS world affines of volumes i and j.
        z: slice index along the through-plane ``axis`` of volume i.
        pixel_coords: ``(N, 2)`` in-plane voxel coordinates, the two non-slice axes in increasing
            order (``(i, j)`` when the slice axis is 2).  Numpy or torch.
        axis: slice axis of volume i; default: the axis with the largest spacing.

    Returns:
        ``(N, 3)`` voxel coordinates ``(i, j, k)`` in volume j; a torch tensor if ``pixel_coords``
        is one (same dtype/device), else a float64 numpy array.
    """
    a_i = check_affine(np.asarray(affine_i.cpu() if isinstance(affine_i, torch.Tensor) else affine_i), "affine_i")
    a_j = check_affine(np.asarray(affine_j.cpu() if isinstance(affine_j, torch.Tensor) else affine_j), "affine_j")
    ax = slice_axis(a_i) if axis is None else int(axis)
    is_torch = isinstance(pixel_coords, torch.Tensor)
    pix = pixel_coords if is_torch else torch.as_tensor(np.asarray(pixel_coords, dtype=np.float64))
    if pix.ndim != 2 or pix.shape[1] != 2:
        raise GeometryError(f"pixel_coords must have shape (N, 2), got {tuple(pix.shape)}")
    work = pix.to(torch.float64).cpu()
    in_plane = [a for a in range(3) if a != ax]
    vox_i = torch.empty((work.shape[0], 3), dtype=torch.float64)
    vox_i[:, in_plane[0]] = work[:, 0]
    vox_i[:, in_plane[1]] = work[:, 1]
    vox_i[:, ax] = float(z)
    world_i = apply_affine(a_i, vox_i)
    if isinstance(transform, PairTransform):
        world_j = transform.map_points(world_i)
    else:
        t = np.asarray(transform.detach().cpu() if isinstance(transform, torch.Tensor) else transform)
        world_j = apply_affine(check_affine(t, "transform"), world_i)
    vox_j = apply_affine(np.linalg.inv(a_j), world_j)
    if is_torch:
        return vox_j.to(dtype=pix.dtype if pix.is_floating_point() else torch.float32, device=pix.device)
    return vox_j.numpy()
