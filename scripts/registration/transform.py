"""One pairwise spatial transform ``T_ij`` (fixed i -> moving j), the bundle's single representation.

``T(x) = A (x + v(x))`` in RAS world millimetres, where ``A`` is a 4x4 affine and ``v`` an optional
coarse displacement field (RAS mm) sampled on a control grid that covers the fixed volume, with
trilinear interpolation between control points (zero displacement outside the grid).  This is
exactly a SimpleITK ``CompositeTransform([Affine, DisplacementField])`` (ITK applies the last-added
transform first), so both engines export to, and downstream code reads, one representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: SimpleITK is imported where it is used
    import SimpleITK as sitk

from .geometry import (
    GeometryError,
    affine_ras_to_lps,
    affine_to_sitk,
    apply_affine,
    check_affine,
    sitk_image_affine,
    sitk_to_affine,
    spacing_of,
)


@dataclass
class PairTransform:
    """``T_ij``: affine ``matrix`` (RAS 4x4) after an optional displacement ``field`` on the fixed side.

    ``field`` has shape ``(3, gi, gj, gk)`` (RAS mm per control point) and ``field_affine`` maps
    control-grid indices to RAS world (mm); both are ``None`` for a purely affine transform.
    """

    matrix: np.ndarray
    field: np.ndarray | None = None
    field_affine: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.matrix = check_affine(self.matrix, "transform matrix")
        if (self.field is None) != (self.field_affine is None):
            raise GeometryError("field and field_affine must be given together")
        if self.field is not None:
            self.field = np.asarray(self.field, dtype=np.float32)
            if self.field.ndim != 4 or self.field.shape[0] != 3:
                raise GeometryError(f"field must have shape (3, gi, gj, gk), got {self.field.shape}")
            self.field_affine = check_affine(self.field_affine, "field_affine")

    @property
    def is_affine(self) -> bool:
        """True when there is no displacement field."""
        return self.field is None

    def displacement(self, points):
        """Field displacement ``v(x)`` (RAS mm) at world points ``(N, 3)``; zeros if affine-only."""
        is_torch = isinstance(points, torch.Tensor)
        pts = points if is_torch else torch.as_tensor(np.asarray(points, dtype=np.float64))
        if self.field is None:
            out = torch.zeros_like(pts)
        else:
            vox = apply_affine(np.linalg.inv(self.field_affine), pts.to(torch.float64))
            out = sample_field(torch.as_tensor(self.field, dtype=torch.float64), vox)
            out = out.to(pts.dtype)
        return out if is_torch else out.numpy()

    def map_points(self, points):
        """World points of the fixed volume ``(N, 3)`` -> world points of the moving volume."""
        if self.field is None:
            return apply_affine(self.matrix, points)
        return apply_affine(self.matrix, points + self.displacement(points))

    def to_sitk(self) -> sitk.Transform:
        """Equivalent SimpleITK transform (LPS): affine, or composite affine o displacement field."""
        import SimpleITK as sitk  # only the SimpleITK engine and conversions need it

        affine = affine_to_sitk(self.matrix)
        if self.field is None:
            return affine
        lps_aff = affine_ras_to_lps(self.field_affine)
        sp = spacing_of(lps_aff)
        vec = self.field.astype(np.float64).copy()
        vec[:2] *= -1.0  # RAS -> LPS vector components
        img = sitk.GetImageFromArray(np.ascontiguousarray(vec.transpose(3, 2, 1, 0)), isVector=True)
        img.SetSpacing(sp.tolist())
        img.SetOrigin(lps_aff[:3, 3].tolist())
        img.SetDirection((lps_aff[:3, :3] / sp[None, :]).ravel().tolist())
        disp = sitk.DisplacementFieldTransform(img)
        return sitk.CompositeTransform([affine, disp])

    @classmethod
    def from_sitk(cls, transform: sitk.Transform) -> "PairTransform":
        """Read back an affine-family transform or a composite ``[affine, displacement field]``."""
        import SimpleITK as sitk  # only the SimpleITK engine and conversions need it

        if transform.GetName() == "CompositeTransform":
            comp = sitk.CompositeTransform(transform)
            parts = [comp.GetNthTransform(n) for n in range(comp.GetNumberOfTransforms())]
            if parts and parts[-1].GetName() == "DisplacementFieldTransform":
                disp = sitk.DisplacementFieldTransform(parts[-1])
                field_img = disp.GetDisplacementField()
                vec = sitk.GetArrayFromImage(field_img).transpose(3, 2, 1, 0).astype(np.float32)
                vec[:2] *= -1.0
                head = sitk.CompositeTransform(parts[:-1]) if len(parts) > 1 else sitk.Transform()
                return cls(sitk_to_affine(head), vec, sitk_image_affine(field_img))
        return cls(sitk_to_affine(transform))


def sample_field(field: torch.Tensor, vox: torch.Tensor) -> torch.Tensor:
    """Trilinear sample of ``field`` ``(3, gi, gj, gk)`` at control-grid voxel coords ``(N, 3)``.

    Points more than half a control spacing outside the grid get zero displacement (ITK's rule);
    inside that margin the border value is used.
    """
    shape = torch.as_tensor(field.shape[1:], dtype=vox.dtype, device=vox.device)
    norm = 2 * vox / torch.clamp(shape - 1, min=1) - 1
    grid = norm.flip(-1).reshape(1, 1, 1, -1, 3).to(field.dtype)
    out = F.grid_sample(field[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    out = out.reshape(3, -1).T
    inside = ((vox >= -0.5) & (vox <= shape - 0.5)).all(dim=-1, keepdim=True)
    return out * inside
