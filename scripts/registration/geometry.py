"""World/voxel geometry shared by every registration component.

Conventions (fixed for the whole bundle):

* A volume is an array indexed ``(i, j, k)`` (NIfTI voxel axes, nibabel/MONAI order) plus its
  4x4 ``affine`` mapping voxel indices to RAS+ world millimetres (nibabel convention).
* A spatial transform ``T_ij`` maps *physical points of volume i* to *physical points of volume j*
  (registration with fixed = i, moving = j; the ITK/elastix/ANTs convention).  Affine ``T_ij`` are
  stored as RAS world 4x4 matrices.
* SimpleITK works in LPS world coordinates; moving between the two flips the first two world axes:
  ``T_lps = F @ T_ras @ F`` with ``F = diag(-1, -1, 1, 1)``.
* The through-plane (slice) axis of a volume is the voxel axis with the largest spacing (ties go to
  axis 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: SimpleITK is imported where it is used
    import SimpleITK as sitk
import torch

#: Flip between RAS and LPS world coordinates (its own inverse).
RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryError(ValueError):
    """A matrix, affine or coordinate array does not have the expected form."""


def check_affine(affine: np.ndarray, what: str = "affine") -> np.ndarray:
    """Return ``affine`` as a float64 4x4 array, or raise :class:`GeometryError` naming ``what``."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise GeometryError(f"{what}: expected a finite 4x4 matrix, got shape {a.shape}")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise GeometryError(f"{what}: last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise GeometryError(f"{what}: the 3x3 part is singular")
    return a


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each voxel axis: the column norms of the 3x3 part."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def slice_axis(affine: np.ndarray) -> int:
    """The through-plane voxel axis: largest spacing, ties resolved towards axis 2."""
    sp = spacing_of(affine)
    best = 2
    for ax in (1, 0):
        if sp[ax] > sp[best] * (1 + 1e-6):
            best = ax
    return best


def ras_to_lps(matrix: np.ndarray) -> np.ndarray:
    """Convert a RAS world->world 4x4 transform to LPS: ``F @ T @ F`` (and back: it is an involution).

    A voxel->world affine only has a world side; convert it with :func:`affine_ras_to_lps`.
    """
    return RAS_LPS_FLIP @ np.asarray(matrix, dtype=np.float64) @ RAS_LPS_FLIP


lps_to_ras = ras_to_lps  # the flip is an involution


def affine_ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """Voxel->RAS affine to voxel->LPS affine."""
    return RAS_LPS_FLIP @ np.asarray(affine, dtype=np.float64)


def sitk_image_affine(image: sitk.Image) -> np.ndarray:
    """Voxel (i, j, k) -> RAS world 4x4 affine of a SimpleITK image.

    SimpleITK's index order (x, y, z) is the NIfTI voxel order (i, j, k), so an array obtained
    with ``sitk.GetArrayFromImage(img).transpose(2, 1, 0)`` pairs with this affine.
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing())[None, :]
    lps[:3, 3] = image.GetOrigin()
    return RAS_LPS_FLIP @ lps


def sitk_image_from_array(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """Build a SimpleITK image from an (i, j, k) array and its voxel->RAS affine."""
    import SimpleITK as sitk  # only the SimpleITK engine and conversions need it

    affine = check_affine(affine)
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise GeometryError(f"expected a 3D array, got shape {arr.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    lps = affine_ras_to_lps(affine)
    sp = spacing_of(lps)
    img.SetSpacing(sp.tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    img.SetDirection((lps[:3, :3] / sp[None, :]).ravel().tolist())
    return img


def affine_to_sitk(transform_ras: np.ndarray) -> sitk.AffineTransform:
    """RAS world 4x4 ``T_ij`` -> ``sitk.AffineTransform`` (LPS, centre 0), same point mapping."""
    import SimpleITK as sitk  # only the SimpleITK engine and conversions need it

    t = ras_to_lps(check_affine(transform_ras, "transform"))
    out = sitk.AffineTransform(3)
    out.SetMatrix(t[:3, :3].ravel().tolist())
    out.SetTranslation(t[:3, 3].tolist())
    return out


def sitk_to_affine(transform: sitk.Transform) -> np.ndarray:
    """An affine-family SimpleITK transform (Euler, Similarity, Affine, Composite of those) -> RAS 4x4.

    ITK maps ``p -> M (p - c) + c + t`` in LPS; this returns the equivalent RAS world matrix.
    """
    import SimpleITK as sitk  # only the SimpleITK engine and conversions need it

    if transform.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(transform)
        total = np.eye(4)
        # ITK composite applies the last-added transform first.
        for n in range(comp.GetNumberOfTransforms()):
            total = total @ sitk_to_affine(comp.GetNthTransform(n))
        return total
    if transform.GetName() == "IdentityTransform":
        return np.eye(4)
    try:
        tx = sitk.AffineTransform(transform)  # works for all MatrixOffsetTransformBase subclasses
    except Exception:  # pragma: no cover - depends on SimpleITK's cast support
        raise GeometryError(f"{transform.GetName()} is not an affine-family transform") from None
    m = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=np.float64)
    t = np.asarray(tx.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = t + c - m @ c
    return lps_to_ras(lps)


def voxel_transform(transform_ras: np.ndarray, affine_i: np.ndarray, affine_j: np.ndarray) -> np.ndarray:
    """Voxel-of-i -> voxel-of-j matrix ``inv(A_j) @ T_ij @ A_i`` for an affine ``T_ij``."""
    return (
        np.linalg.inv(check_affine(affine_j, "affine_j"))
        @ np.asarray(transform_ras)
        @ check_affine(affine_i, "affine_i")
    )


def apply_affine(matrix, points):
    """Apply a 4x4 (numpy or torch, optionally batched ``(..., 4, 4)``) to points ``(..., N, 3)``."""
    if isinstance(points, torch.Tensor):
        m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
        return points @ m[..., :3, :3].transpose(-1, -2) + m[..., None, :3, 3]
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ np.swapaxes(m[..., :3, :3], -1, -2) + m[..., None, :3, 3]


def grid_moments(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (3,) and covariance (3, 3) of the world positions of all voxel centres of a grid.

    Closed form: voxel indices along an axis of ``n`` points are uniform on ``0..n-1`` with mean
    ``(n-1)/2`` and variance ``(n^2-1)/12``; the axes are independent.
    """
    a = check_affine(affine)
    n = np.asarray(shape[:3], dtype=np.float64)
    mean_idx = (n - 1) / 2
    var_idx = (n**2 - 1) / 12
    lin = a[:3, :3]
    return lin @ mean_idx + a[:3, 3], lin @ np.diag(var_idx) @ lin.T


def affine_rmse(matrix: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """RMS displacement ``sqrt(E||M x - x||^2)`` of an affine over points with given mean/covariance.

    With ``d(x) = B x + b`` (``B = M[:3,:3] - I``, ``b = M[:3,3]``):
    ``E||d||^2 = ||B mu + b||^2 + tr(B Sigma B^T)``.  ``matrix`` may be batched ``(..., 4, 4)``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    b_lin = m[..., :3, :3] - np.eye(3)
    b = m[..., :3, 3]
    mean_disp = np.einsum("...ij,j->...i", b_lin, mean) + b
    quad = np.einsum("...ij,jk,...ik->...", b_lin, cov, b_lin)
    return np.sqrt(np.maximum(np.sum(mean_disp**2, axis=-1) + quad, 0.0))
