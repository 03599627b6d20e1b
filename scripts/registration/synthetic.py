"""Analytic cardiac-like volumes with a known world transform, for tests and timing benchmarks.

The anatomy is defined in world millimetres (body, spine, RV, myocardium, LV; labels as ACDC) and
sampled at the voxel centres of any grid, so a pair rendered with ``true_transform`` T_ij has
exactly known correspondences: image j at world point y shows the anatomy at ``inv(T_ij) y``.
"""

from __future__ import annotations

import numpy as np

from .geometry import apply_affine, check_affine


def _ellipsoid(points: np.ndarray, centre, radii, softness: float = 1.5) -> np.ndarray:
    """Soft indicator (sigmoid of a scaled distance, about ``softness`` mm wide edges)."""
    r = np.asarray(radii, dtype=np.float64)
    q = np.sqrt(np.sum(((points - np.asarray(centre)) / r) ** 2, axis=-1))
    return 1.0 / (1.0 + np.exp((q - 1.0) * r.min() / softness))


def anatomy(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity in [0, 1] and label (0 bg, 1 RV, 2 myo, 3 LV) at world points ``(N, 3)``."""
    body = _ellipsoid(points, (0, 0, 0), (110, 85, 200))
    spine = _ellipsoid(points, (0, 60, 0), (14, 14, 200))
    rv = _ellipsoid(points, (-38, -8, 0), (24, 34, 45))
    myo = _ellipsoid(points, (12, -4, 0), (34, 32, 45))
    lv = _ellipsoid(points, (12, -4, 0), (24, 22, 38))
    intensity = 0.25 * body + 0.3 * spine + 0.45 * rv * (1 - myo) + 0.15 * myo + 0.5 * lv
    label = np.zeros(points.shape[0], dtype=np.uint8)
    label[rv > 0.5] = 1
    label[myo > 0.5] = 2
    label[lv > 0.5] = 3
    return np.clip(intensity, 0, 1).astype(np.float32), label


def grid_points(shape, affine: np.ndarray) -> np.ndarray:
    """World positions ``(prod(shape), 3)`` of all voxel centres, C order over (i, j, k)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return apply_affine(check_affine(affine), idx.astype(np.float64))


def render(shape, affine: np.ndarray, world_to_anatomy: np.ndarray | None = None):
    """Image and label on the grid ``(shape, affine)``; anatomy seen through ``world_to_anatomy``.

    For volume j of a pair with known ``T_ij``, pass ``world_to_anatomy = inv(T_ij)``.
    """
    pts = grid_points(shape, affine)
    if world_to_anatomy is not None:
        pts = apply_affine(world_to_anatomy, pts)
    image, label = anatomy(pts)
    return image.reshape(shape), label.reshape(shape)


def oblique_affine(spacing=(2.0, 2.0, 8.0), shape=(64, 64, 10), angles_deg=(10.0, -8.0, 5.0), centre=(0, 0, 0)):
    """A voxel->RAS affine with the given spacing and direction (Euler angles), centred at ``centre``."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def known_affine(rotation_deg=(0.0, 0.0, 8.0), scale=(1.05, 0.95, 1.0), translation=(6.0, -4.0, 3.0)) -> np.ndarray:
    """A moderate world affine T (rotation about the origin, scaling, translation) for test pairs."""
    rz = np.radians(rotation_deg[2])
    rot = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    t = np.eye(4)
    t[:3, :3] = rot @ np.diag(scale)
    t[:3, 3] = translation
    return t
