"""Synthetic cardiac short-axis MR phantom: the dataset the bundle trains on when none is configured.

Anatomy is defined analytically in a *canonical* physical frame (millimetres):

* canonical ``z`` is the long axis of the left ventricle, base at ``+z``, apex at ``-z``; the origin is
  the middle of the heart's long-axis extent, on the LV axis;
* canonical ``x`` points to the patient's left, ``y`` posterior (so the RV, which lies anterior and to
  the patient's right of the LV, sits at an angle of about 195-230 degrees in the ``x-y`` plane).

The heart is a truncated LV cavity ellipsoid (label 3, bright blood, with two dark papillary muscles
that are labelled LV as in ACDC) inside an epicardial ellipsoid (myocardium, label 2), and an RV cavity
ellipsoid (label 1) clipped by the epicardium so that it wraps the septum as a crescent, with a thin
dark RV free wall and some bright epicardial fat (both label 0); above the base plane sit the atria
(bright blood, label 0).  Both ventricles narrow toward the
apex; the RV ends before the LV apex.  Around the heart (all label 0): an elliptic-cylinder body with
bright subcutaneous fat, a darker chest-wall muscle ring, mediastinal soft tissue, two dark lungs,
a liver in the inferior (apical) slices, a vertebral body with a bright spinal canal and a bright
descending aorta.  Outside the body is air.

Each subject has its own anatomy parameters, a pose ``canonical_to_world`` (4x4, canonical mm ->
RAS world mm: a fixed oblique short-axis orientation, a random rotation mostly about the long axis, a
few degrees of tilt, mild isotropic/anisotropic scale and a translation) and an oblique acquisition
grid ``grid_affine`` (the NIfTI affine: voxel ijk -> RAS world mm, anisotropic spacing, slice axis 2,
slice 0 at the base as in ACDC) placed so that the heart is inside the field of view.

A voxel is rendered by mapping its centre (label, nearest sampling) and 8 sub-voxel points spread
over its footprint (image, partial volume) to the canonical frame with
``inv(canonical_to_world) @ grid_affine`` and evaluating the tissue there.  The image then gets an
in-plane point-spread blur, per-subject tissue intensities and contrast, a smooth multiplicative bias
field, a faint smooth tissue texture and Rician noise, and is min-max scaled to [0, 1] float32.  Since the anatomy lives in the
canonical frame, two subjects with equal anatomy are related in world space exactly by
``true_transform(src, dst) = dst.canonical_to_world @ inv(src.canonical_to_world)``.

``ensure_phantom_dataset(root)`` writes a MONAI decathlon-style datalist plus NIfTI files and
``phantom.json`` (poses, grids, parameters); it is deterministic in ``seed`` and a no-op when the
dataset on disk already matches the requested settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from scripts.data.atomic_io import save_nifti, write_json
from scripts.user_errors import BundleInputError

__all__ = [
    "PHANTOM_VERSION",
    "LABEL_NAMES",
    "PhantomDatasetError",
    "PhantomSubject",
    "sample_subject",
    "sample_subjects",
    "render_subject",
    "write_subject",
    "true_transform",
    "with_pose",
    "load_phantom_subjects",
    "ensure_phantom_dataset",
]

#: Bump whenever the generated data would change for the same seed; stale datasets are regenerated.
PHANTOM_VERSION = 1

LABEL_NAMES: dict[str, str] = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}

# Tissue classes used while rendering; several map to the same label.
_AIR, _FAT, _MUSCLE, _SOFT, _LUNG, _LIVER, _BONE, _CSF, _AORTA, _ATRIUM, _RV_WALL, _RV, _MYO, _LV, _PAPILLARY = range(
    15
)
_TISSUE_TO_LABEL = np.zeros(15, dtype=np.uint8)
_TISSUE_TO_LABEL[[_RV, _MYO, _LV, _PAPILLARY]] = [1, 2, 3, 3]
# Appearance key giving each tissue's mean intensity (papillary muscle and RV wall look like myocardium,
# atrial blood like LV blood).
_TISSUE_MEAN_KEY = (
    "mean_air",
    "mean_fat",
    "mean_muscle",
    "mean_soft_tissue",
    "mean_lung",
    "mean_liver",
    "mean_bone",
    "mean_csf",
    "mean_aorta",
    "mean_lv_blood",
    "mean_myocardium",
    "mean_rv_blood",
    "mean_myocardium",
    "mean_lv_blood",
    "mean_myocardium",
)

# Fixed oblique orientation of the short-axis frame in the scanner (world) frame; per-subject pose and
# grid rotations are small perturbations of it, so inter-subject world transforms stay registrable.
_SHORT_AXIS_ORIENTATION = Rotation.from_euler("zxy", [30.0, -55.0, 20.0], degrees=True).as_matrix()
# World position the heart centres are scattered around (mm).
_HEART_WORLD_CENTRE = np.array([15.0, -20.0, 40.0])
# Voxel axes of an unperturbed grid in canonical terms (a proper rotation): i -> posterior (+y),
# j -> patient's left (+x), k -> apex (-z).  Slice 0 is the base, as in ACDC, and ``image[:, :, k]``
# shown with rows = i reads like a radiological short-axis view (anterior up, patient's right on the left).
_GRID_AXES = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])

# Sub-voxel sample offsets (in voxels) spread over the voxel footprint, for partial-volume intensities.
_SUBVOXEL_OFFSETS = np.array([[di, dj, dk] for di in (-0.25, 0.25) for dj in (-0.25, 0.25) for dk in (-0.25, 0.25)])

# Anatomy parameter ranges (mm unless noted), sampled uniformly.
_ANATOMY_RANGES: dict[str, tuple[float, float]] = {
    "lv_radius": (16.0, 24.0),  # endocardial in-plane semi-axis along canonical x
    "lv_ellipticity": (0.85, 1.0),  # y / x semi-axis ratio of the LV
    "lv_half_length": (50.0, 68.0),  # long-axis semi-axis of the LV cavity ellipsoid
    "base_fraction": (0.1, 0.35),  # base plane height above the ellipsoid equator, in lv_half_length
    "wall_thickness": (6.0, 11.0),
    "papillary_radius": (2.0, 3.5),
    "rv_angle": (np.deg2rad(195.0), np.deg2rad(230.0)),  # radians, direction LV -> RV centre
    "rv_offset": (0.55, 0.75),  # RV ellipsoid centre distance, in epicardial radii
    "rv_radial": (0.85, 1.15),  # RV semi-axis along rv_angle, in epicardial radii
    "rv_tangential": (1.25, 1.6),  # RV semi-axis across rv_angle, in epicardial radii
    "rv_length_fraction": (0.7, 0.9),  # RV long semi-axis, in LV cavity lengths
    "rv_wall_thickness": (2.0, 3.5),
    "epicardial_fat": (1.0, 4.0),
    "body_half_width": (105.0, 140.0),
    "body_half_depth": (75.0, 95.0),
    "body_offset_x": (-32.0, -15.0),  # body centre relative to the LV axis
    "body_offset_y": (15.0, 35.0),
    "subcutaneous_fat": (6.0, 14.0),
    "chest_wall": (6.0, 12.0),
    "lung_scale": (0.85, 1.1),
    "liver_drop": (0.0, 25.0),  # liver centre below the epicardial apex
    "liver_half_height": (40.0, 60.0),
    "spine_radius": (12.0, 16.0),
    "aorta_radius": (9.0, 13.0),
}

# Appearance ranges: tissue means (before contrast, bias and noise) and acquisition effects.
_APPEARANCE_RANGES: dict[str, tuple[float, float]] = {
    "mean_air": (0.0, 0.02),
    "mean_fat": (0.7, 0.95),
    "mean_muscle": (0.18, 0.3),
    "mean_soft_tissue": (0.25, 0.4),
    "mean_lung": (0.03, 0.1),
    "mean_liver": (0.3, 0.45),
    "mean_bone": (0.3, 0.45),
    "mean_csf": (0.7, 0.9),
    "mean_aorta": (0.75, 1.0),
    "mean_lv_blood": (0.8, 1.0),
    "rv_blood_ratio": (0.85, 1.0),  # RV blood mean relative to LV blood
    "mean_myocardium": (0.18, 0.32),
    "gamma": (0.8, 1.25),  # contrast curve applied to the clean image
    "psf_sigma": (0.3, 0.6),  # in-plane Gaussian blur, voxels
    "texture": (0.03, 0.08),  # amplitude of smooth multiplicative tissue texture
    "noise_sigma": (0.01, 0.035),  # Rician noise, relative to the clean image's maximum
    "bias_x": (-0.2, 0.2),  # log bias field coefficients on normalised grid coordinates
    "bias_y": (-0.2, 0.2),
    "bias_z": (-0.1, 0.1),
    "bias_xx": (-0.15, 0.15),
    "bias_yy": (-0.15, 0.15),
    "bias_xy": (-0.15, 0.15),
}


class PhantomDatasetError(BundleInputError):
    """A phantom dataset folder or its settings cannot be used."""


@dataclasses.dataclass
class PhantomSubject:
    """Everything needed to render one phantom volume (deterministically)."""

    id: str
    anatomy: dict[str, float]
    canonical_to_world: np.ndarray  # 4x4, canonical mm -> RAS world mm
    grid_affine: np.ndarray  # 4x4, voxel ijk -> RAS world mm (the NIfTI affine)
    shape: tuple[int, int, int]
    appearance: dict[str, float]
    noise_seed: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) of the acquisition grid, per voxel axis."""
        return tuple(float(s) for s in np.linalg.norm(self.grid_affine[:3, :3], axis=0))

    def to_record(self) -> dict[str, Any]:
        """JSON-serialisable description (the ``phantom.json`` entry of this subject)."""
        return {
            "canonical_to_world": self.canonical_to_world.tolist(),
            "grid_affine": self.grid_affine.tolist(),
            "shape": list(self.shape),
            "anatomy": dict(self.anatomy),
            "appearance": dict(self.appearance),
            "noise_seed": int(self.noise_seed),
        }

    @classmethod
    def from_record(cls, subject_id: str, record: dict[str, Any]) -> "PhantomSubject":
        """Inverse of :meth:`to_record`."""
        return cls(
            id=subject_id,
            anatomy={k: float(v) for k, v in record["anatomy"].items()},
            canonical_to_world=np.asarray(record["canonical_to_world"], dtype=np.float64),
            grid_affine=np.asarray(record["grid_affine"], dtype=np.float64),
            shape=tuple(int(n) for n in record["shape"]),
            appearance={k: float(v) for k, v in record["appearance"].items()},
            noise_seed=int(record["noise_seed"]),
        )


# ----------------------------------------------------------------------------------------- sampling


def _uniform(rng: np.random.Generator, ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {key: float(rng.uniform(lo, hi)) for key, (lo, hi) in ranges.items()}


def _heart_extent(anatomy: dict[str, float]) -> tuple[float, float, float]:
    """(z of the LV cavity ellipsoid centre, z of the base plane, z of the epicardial apex), canonical mm.

    Chosen so that the heart's long-axis extent [apex, base] is centred on canonical z = 0.
    """
    half_length = anatomy["lv_half_length"]
    length = (1.0 + anatomy["base_fraction"]) * half_length + anatomy["wall_thickness"]
    z_base = 0.5 * length
    z_centre = z_base - anatomy["base_fraction"] * half_length
    return z_centre, z_base, z_base - length


def _affine(linear: np.ndarray, translation: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = translation
    return out


def sample_subject(rng: np.random.Generator, subject_id: str) -> PhantomSubject:
    """Draw anatomy, pose, acquisition grid and appearance of one subject from ``rng``."""
    anatomy = _uniform(rng, _ANATOMY_RANGES)
    appearance = _uniform(rng, _APPEARANCE_RANGES)

    # Pose: short-axis orientation, rotation mostly about the long axis plus a few degrees of tilt,
    # mild isotropic and anisotropic scale, translation.
    spin = rng.uniform(-25.0, 25.0)
    tilt = np.clip(rng.normal(0.0, 3.0, size=2), -6.0, 6.0)
    rotation = _SHORT_AXIS_ORIENTATION @ Rotation.from_euler("zxy", [spin, *tilt], degrees=True).as_matrix()
    scale = rng.uniform(0.9, 1.1) * (1.0 + rng.uniform(-0.05, 0.05, size=3))
    translation = _HEART_WORLD_CENTRE + rng.uniform(-20.0, 20.0, size=3)
    canonical_to_world = _affine(rotation * scale, translation)

    # Grid: oblique short-axis stack, slice axis nearly along the long axis, base first.
    spacing_xy = rng.uniform(1.3, 2.0) * np.array([1.0, rng.uniform(0.95, 1.05)])
    fov = rng.uniform(150.0, 220.0, size=2)
    in_plane = np.clip(8 * np.round(fov / spacing_xy / 8), 96, 128).astype(int)
    slice_spacing = rng.uniform(6.5, 10.0)
    _, z_base, z_apex = _heart_extent(anatomy)
    heart_length = (z_base - z_apex) * float(np.mean(scale))
    margin = rng.uniform(-0.5, 1.5) * slice_spacing
    n_slices = int(np.clip(np.round((heart_length + margin) / slice_spacing), 6, 12))
    grid_rotation = (
        _SHORT_AXIS_ORIENTATION
        @ Rotation.from_euler(
            "zxy", [rng.uniform(-15.0, 15.0), *rng.uniform(-2.0, 2.0, size=2)], degrees=True
        ).as_matrix()
        @ _GRID_AXES
    )
    spacing = np.array([*spacing_xy, slice_spacing])
    linear = grid_rotation * spacing
    shape = (int(in_plane[0]), int(in_plane[1]), n_slices)
    centre_voxel = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
    # Field-of-view centre: the heart centre moved part of the way toward the body centre (so more of
    # the chest is in view and the heart is off-centre, as in real scans), plus in-plane jitter.
    toward_body = rng.uniform(0.2, 0.5) * np.array([anatomy["body_offset_x"], anatomy["body_offset_y"], 0.0])
    fov_centre = canonical_to_world @ np.append(toward_body, 1.0)
    offset_voxels = np.array([*rng.uniform(-8.0, 8.0, size=2) / spacing_xy, rng.uniform(-0.25, 0.25)])
    origin = fov_centre[:3] - linear @ (centre_voxel + offset_voxels)
    # NIfTI stores the affine as float32: keep it exactly representable so it round-trips bit-exactly.
    grid_affine = _affine(linear, origin).astype(np.float32).astype(np.float64)

    noise_seed = int(rng.integers(0, 2**31 - 1))
    return PhantomSubject(
        id=subject_id,
        anatomy=anatomy,
        canonical_to_world=canonical_to_world,
        grid_affine=grid_affine,
        shape=shape,
        appearance=appearance,
        noise_seed=noise_seed,
    )


def sample_subjects(seed: int, count: int, prefix: str = "phantom") -> list[PhantomSubject]:
    """Subjects ``<prefix>_000`` ... of a dataset; subject ``i`` depends only on ``(seed, i)``."""
    return [sample_subject(np.random.default_rng([seed, i]), f"{prefix}_{i:03d}") for i in range(count)]


# ---------------------------------------------------------------------------------------- rendering


def _inside_ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Points (u, v) inside the axis-aligned ellipse with semi-axes (a, b)."""
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _inside_ellipsoid(u: np.ndarray, v: np.ndarray, w: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """Points (u, v, w) inside the axis-aligned ellipsoid with semi-axes (a, b, c)."""
    return (u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2 <= 1.0


def _tissue_map(x: np.ndarray, y: np.ndarray, z: np.ndarray, anatomy: dict[str, float]) -> np.ndarray:
    """Tissue class (``_AIR`` ... ``_PAPILLARY``) at canonical points (mm); later tissues paint over earlier ones."""
    a = anatomy
    tissue = np.zeros(x.shape, dtype=np.uint8)

    # Body: subcutaneous fat, chest-wall muscle, mediastinal soft tissue.
    bx, by = x - a["body_offset_x"], y - a["body_offset_y"]
    half_w, half_d = a["body_half_width"], a["body_half_depth"]
    tissue[_inside_ellipse(bx, by, half_w, half_d)] = _FAT
    fat = a["subcutaneous_fat"]
    tissue[_inside_ellipse(bx, by, half_w - fat, half_d - fat)] = _MUSCLE
    inner_w, inner_d = half_w - fat - a["chest_wall"], half_d - fat - a["chest_wall"]
    thorax = _inside_ellipse(bx, by, inner_w, inner_d)
    tissue[thorax] = _SOFT

    # Lungs: left one lateral to the heart, right one posterior-lateral to the RV.
    s = a["lung_scale"]
    right_lung = _inside_ellipse(bx + 0.5 * inner_w, by - 0.1 * inner_d, 0.4 * s * inner_w, 0.62 * s * inner_d)
    left_lung = _inside_ellipse(bx - 0.55 * inner_w, by - 0.15 * inner_d, 0.36 * s * inner_w, 0.58 * s * inner_d)
    tissue[thorax & (right_lung | left_lung)] = _LUNG

    # Liver: below the apex, on the patient's right.
    _, z_base, z_apex = _heart_extent(a)
    liver_z = z - (z_apex - a["liver_drop"])
    liver = _inside_ellipsoid(
        bx + 0.25 * inner_w, by - 0.1 * inner_d, liver_z, 0.6 * inner_w, 0.6 * inner_d, a["liver_half_height"]
    )
    tissue[thorax & liver] = _LIVER

    # Spine (vertebral body, spinal canal) at the posterior midline; descending aorta beside it.
    spine_y = inner_d - 1.1 * a["spine_radius"]
    tissue[_inside_ellipse(bx, by - spine_y, a["spine_radius"], 0.9 * a["spine_radius"])] = _BONE
    tissue[
        _inside_ellipse(bx, by - spine_y - 1.25 * a["spine_radius"], 0.45 * a["spine_radius"], 0.4 * a["spine_radius"])
    ] = _CSF
    aorta_r = a["aorta_radius"]
    tissue[_inside_ellipse(bx - 1.4 * a["spine_radius"], by - spine_y + 1.6 * a["spine_radius"], aorta_r, aorta_r)] = (
        _AORTA
    )

    # Heart.
    z_centre, z_base, _ = _heart_extent(a)
    below_base = z <= z_base
    r_x = a["lv_radius"]
    r_y = r_x * a["lv_ellipticity"]
    half_len = a["lv_half_length"]
    wall = a["wall_thickness"]
    dz = z - z_centre
    cavity = below_base & _inside_ellipsoid(x, y, dz, r_x, r_y, half_len)
    epicardium = below_base & _inside_ellipsoid(x, y, dz, r_x + wall, r_y + wall, half_len + wall)

    epi_radius = r_x + wall
    cos_t, sin_t = np.cos(a["rv_angle"]), np.sin(a["rv_angle"])
    u = x * cos_t + y * sin_t - a["rv_offset"] * epi_radius
    v = -x * sin_t + y * cos_t
    rv_radial, rv_tangential = a["rv_radial"] * epi_radius, a["rv_tangential"] * epi_radius
    rv_half_len = a["rv_length_fraction"] * (z_base - (z_centre - half_len))
    rv_dz = z - (z_base - 0.15 * rv_half_len)

    def rv_ellipsoid(grow: float) -> np.ndarray:
        return _inside_ellipsoid(u, v, rv_dz, rv_radial + grow, rv_tangential + grow, rv_half_len + grow)

    rv_wall = a["rv_wall_thickness"]
    fat_layer = a["epicardial_fat"]
    grow = wall + fat_layer
    envelope = below_base & (
        rv_ellipsoid(rv_wall + fat_layer) | _inside_ellipsoid(x, y, dz, r_x + grow, r_y + grow, half_len + grow)
    )
    tissue[envelope] = _FAT
    # Atria above the base plane (blood, unlabelled as in ACDC): basal slices that cross the
    # oblique base plane show partial-volume atrial blood, so the base is not a trivial cut.
    atrium_z = z - (z_base + 0.6 * epi_radius)
    e = epi_radius
    left_atrium = _inside_ellipsoid(x, y - 0.3 * e, atrium_z, 0.8 * e, 0.7 * e, 0.9 * e)
    ra_x, ra_y = 1.2 * e * cos_t, 1.2 * e * sin_t + 0.3 * e
    right_atrium = _inside_ellipsoid(x - ra_x, y - ra_y, atrium_z, 0.75 * e, 0.7 * e, 0.9 * e)
    tissue[(z > z_base) & (left_atrium | right_atrium)] = _ATRIUM
    tissue[below_base & rv_ellipsoid(rv_wall)] = _RV_WALL
    tissue[below_base & rv_ellipsoid(0.0)] = _RV
    tissue[epicardium] = _MYO
    tissue[cavity] = _LV

    # Two papillary muscles inside the LV cavity, mid-ventricular to apical (labelled LV, as in ACDC).
    pap_r = a["papillary_radius"]
    pap_z = (dz > -0.6 * half_len) & (z < z_base - 0.35 * half_len)
    for angle in (np.deg2rad(60.0), np.deg2rad(150.0)):  # anterolateral and posteromedial
        px, py = 0.6 * r_x * np.cos(angle), 0.6 * r_y * np.sin(angle)
        tissue[cavity & pap_z & _inside_ellipse(x - px, y - py, pap_r, pap_r)] = _PAPILLARY
    return tissue


def _voxel_to_canonical(subject: PhantomSubject) -> np.ndarray:
    return np.linalg.inv(subject.canonical_to_world) @ subject.grid_affine


def _canonical_coordinates(matrix: np.ndarray, shape: tuple[int, int, int], offset: np.ndarray) -> list[np.ndarray]:
    """Canonical (x, y, z) of voxel points ``ijk + offset`` for the whole grid, as float32 arrays of ``shape``."""
    axes = [np.arange(n, dtype=np.float64) + d for n, d in zip(shape, offset)]
    coordinates = []
    for row in matrix[:3]:
        c = row[3] + row[0] * axes[0][:, None, None] + row[1] * axes[1][None, :, None] + row[2] * axes[2][None, None, :]
        coordinates.append(c.astype(np.float32))
    return coordinates


def _bias_field(shape: tuple[int, int, int], appearance: dict[str, float]) -> np.ndarray:
    """Smooth multiplicative field exp(polynomial) over normalised grid coordinates in [-1, 1]."""
    u, v, w = (np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape)
    u, v, w = u[:, None, None], v[None, :, None], w[None, None, :]
    log_field = (
        appearance["bias_x"] * u
        + appearance["bias_y"] * v
        + appearance["bias_z"] * w
        + appearance["bias_xx"] * u**2
        + appearance["bias_yy"] * v**2
        + appearance["bias_xy"] * u * v
    )
    return np.exp(log_field)


def render_subject(subject: PhantomSubject) -> tuple[np.ndarray, np.ndarray]:
    """Render ``(image, label)`` of shape ``subject.shape``: image float32 in [0, 1], label uint8 in {0..3}."""
    matrix = _voxel_to_canonical(subject)
    shape = tuple(subject.shape)

    label = _TISSUE_TO_LABEL[_tissue_map(*_canonical_coordinates(matrix, shape, np.zeros(3)), subject.anatomy)]

    appearance = dict(subject.appearance)
    appearance["mean_rv_blood"] = appearance["mean_lv_blood"] * appearance["rv_blood_ratio"]
    tissue_means = np.array([appearance[key] for key in _TISSUE_MEAN_KEY], dtype=np.float64)
    clean = np.zeros(shape, dtype=np.float64)
    for offset in _SUBVOXEL_OFFSETS:
        clean += tissue_means[_tissue_map(*_canonical_coordinates(matrix, shape, offset), subject.anatomy)]
    clean /= len(_SUBVOXEL_OFFSETS)
    clean = gaussian_filter(clean, sigma=(appearance["psf_sigma"], appearance["psf_sigma"], 0.0), mode="nearest")
    clean = np.clip(clean, 0.0, None) ** appearance["gamma"]
    clean *= _bias_field(shape, appearance)

    rng = np.random.default_rng(subject.noise_seed)
    texture = gaussian_filter(rng.normal(0.0, 1.0, shape), sigma=(2.0, 2.0, 0.0), mode="wrap")
    clean *= 1.0 + appearance["texture"] * texture / max(float(texture.std()), 1e-12)
    sigma = appearance["noise_sigma"] * float(clean.max())
    noisy = np.hypot(clean + rng.normal(0.0, sigma, shape), rng.normal(0.0, sigma, shape))
    low, high = float(noisy.min()), float(noisy.max())
    image = np.clip((noisy - low) / max(high - low, np.finfo(np.float64).tiny), 0.0, 1.0).astype(np.float32)
    return image, label


def write_subject(subject: PhantomSubject, image_path: str | os.PathLike, label_path: str | os.PathLike) -> None:
    """Render ``subject`` and save image (float32) and label (uint8) NIfTI files with ``subject.grid_affine``."""
    image, label = render_subject(subject)
    save_nifti(image, subject.grid_affine, image_path, dtype=np.float32)
    save_nifti(label, subject.grid_affine, label_path, dtype=np.uint8)


# ------------------------------------------------------------------------------------------ geometry


def true_transform(src: PhantomSubject, dst: PhantomSubject) -> np.ndarray:
    """4x4 world map sending world points of ``src`` to the corresponding world points of ``dst``.

    ``dst.canonical_to_world @ inv(src.canonical_to_world)``; exact when both have the same anatomy,
    an approximation of the anatomical correspondence otherwise.
    """
    return dst.canonical_to_world @ np.linalg.inv(src.canonical_to_world)


def with_pose(
    subject: PhantomSubject,
    canonical_to_world: np.ndarray,
    grid_affine: np.ndarray | None = None,
    shape: tuple[int, int, int] | None = None,
) -> PhantomSubject:
    """Copy of ``subject`` (same id, anatomy, appearance, noise seed) with another pose.

    ``grid_affine`` and ``shape`` default to the subject's grid (the same field of view in the world;
    the anatomy moves inside it); pass another subject's to render on its grid.  Raises
    ``ValueError`` if a matrix is not a finite, invertible 4x4 affine or the shape is not 3 positive ints.
    """
    canonical_to_world = _checked_affine(canonical_to_world, "canonical_to_world")
    grid = subject.grid_affine if grid_affine is None else _checked_affine(grid_affine, "grid_affine")
    shape = tuple(subject.shape if shape is None else shape)
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise ValueError(f"shape must be 3 positive integers, got {shape!r}")
    return dataclasses.replace(
        subject,
        anatomy=dict(subject.anatomy),
        appearance=dict(subject.appearance),
        canonical_to_world=canonical_to_world,
        grid_affine=np.array(grid, dtype=np.float64),
        shape=tuple(int(n) for n in shape),
    )


def _checked_affine(matrix: np.ndarray, name: str) -> np.ndarray:
    matrix = np.array(matrix, dtype=np.float64)
    if (
        matrix.shape != (4, 4)
        or not np.all(np.isfinite(matrix))
        or not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0])
        or abs(np.linalg.det(matrix[:3, :3])) < 1e-9
    ):
        raise ValueError(
            f"{name} must be a finite invertible 4x4 affine with last row [0, 0, 0, 1], got {matrix.tolist()}"
        )
    return matrix


# ------------------------------------------------------------------------------------------- dataset


def _generator_settings(seed: int, n_labeled: int, n_unlabeled: int, n_validation: int, n_test: int) -> dict[str, Any]:
    return {
        "name": "scripts.data.phantom",
        "version": PHANTOM_VERSION,
        "seed": seed,
        "n_labeled": n_labeled,
        "n_unlabeled": n_unlabeled,
        "n_validation": n_validation,
        "n_test": n_test,
    }


def _is_up_to_date(root: Path, settings: dict[str, Any]) -> bool:
    """True when ``root/datalist.json`` was written with ``settings`` and every file it names exists."""
    try:
        datalist = json.loads((root / "datalist.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(datalist, dict) or datalist.get("generator") != settings:
        return False
    if not (root / "phantom.json").is_file():
        return False
    for section in ("training", "unlabeled", "validation", "test"):
        for item in datalist.get(section, []):
            for key in ("image", "label", "true_label"):
                if key in item and not (root / item[key]).is_file():
                    return False
    return True


def _looks_like_phantom_folder(root: Path) -> bool:
    """True for an empty folder or one this module generated (safe to replace)."""
    if not any(root.iterdir()):
        return True
    try:
        return (
            json.loads((root / "datalist.json").read_text()).get("generator", {}).get("name") == "scripts.data.phantom"
        )
    except (OSError, ValueError, AttributeError):
        return (root / "phantom.json").is_file()


def _write_dataset(folder: Path, subjects: list[PhantomSubject], sections: list[str], settings: dict[str, Any]) -> None:
    """Write images, labels, ``phantom.json`` and, last, ``datalist.json`` into ``folder``."""
    datalist: dict[str, Any] = {
        "name": "phantom",
        "description": "Synthetic cardiac short-axis MR phantom generated by scripts.data.phantom",
        "modality": "MRI",
        "labels": dict(LABEL_NAMES),
        "generator": settings,
        "training": [],
        "unlabeled": [],
        "validation": [],
        "test": [],
    }
    for subject, section in zip(subjects, sections):
        image = f"imagesTr/{subject.id}.nii.gz"
        label = f"labelsTr/{subject.id}.nii.gz"
        write_subject(subject, folder / image, folder / label)
        label_key = "true_label" if section == "unlabeled" else "label"
        datalist[section].append({"id": subject.id, "image": image, label_key: label})
    write_json(
        folder / "phantom.json",
        {
            "seed": settings["seed"],
            "version": PHANTOM_VERSION,
            "settings": settings,
            "subjects": {s.id: s.to_record() for s in subjects},
        },
    )
    write_json(folder / "datalist.json", datalist)


def load_phantom_subjects(root: str | os.PathLike) -> dict[str, PhantomSubject]:
    """Subjects recorded in ``root/phantom.json`` (poses, grids, parameters), by id."""
    path = Path(root) / "phantom.json"
    try:
        record = json.loads(path.read_text())
        return {sid: PhantomSubject.from_record(sid, r) for sid, r in record["subjects"].items()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no phantom description; generate it with ensure_phantom_dataset") from None
    except (ValueError, KeyError, TypeError) as error:
        raise PhantomDatasetError(f"{path}: malformed phantom description ({error!r})") from error


def ensure_phantom_dataset(
    root: str | os.PathLike,
    n_labeled: int = 4,
    n_unlabeled: int = 12,
    n_validation: int = 4,
    n_test: int = 4,
    seed: int = 0,
) -> str:
    """Generate the phantom dataset into ``root`` unless it is already there; return ``root/datalist.json``.

    Subjects ``phantom_000`` ... are assigned in order to the labeled ("training"), "unlabeled"
    (with "true_label" for monitoring only), "validation" and "test" sections.  Files:
    ``imagesTr/<id>.nii.gz``, ``labelsTr/<id>.nii.gz``, ``phantom.json`` and ``datalist.json``
    (paths relative to ``root``).  If ``datalist.json`` records the same seed, counts and generator
    version and its files exist, nothing is done.  Otherwise the dataset is generated in a temporary
    sibling folder which then replaces ``root``, so an interrupted run leaves either the previous
    dataset or none, never a datalist naming missing files.  A non-empty ``root`` that this module did
    not generate is never replaced (``PhantomDatasetError``).
    """
    counts = {"n_labeled": n_labeled, "n_unlabeled": n_unlabeled, "n_validation": n_validation, "n_test": n_test}
    for name, value in {**counts, "seed": seed}.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise PhantomDatasetError(f"ensure_phantom_dataset: {name} must be an integer, got {value!r}")
    if any(int(v) < 0 for v in counts.values()) or int(n_labeled) < 1 or int(seed) < 0:
        raise PhantomDatasetError(
            f"ensure_phantom_dataset: need n_labeled >= 1, other counts >= 0, seed >= 0; got {counts}, seed={seed}"
        )
    settings = _generator_settings(int(seed), *(int(v) for v in counts.values()))

    root = Path(root).absolute()
    datalist_path = root / "datalist.json"
    if _is_up_to_date(root, settings):
        return str(datalist_path)
    if root.exists() and not (root.is_dir() and _looks_like_phantom_folder(root)):
        raise PhantomDatasetError(f"{root}: exists and is not a phantom dataset folder; refusing to overwrite it")

    sections = (
        ["training"] * n_labeled + ["unlabeled"] * n_unlabeled + ["validation"] * n_validation + ["test"] * n_test
    )
    subjects = sample_subjects(int(seed), len(sections))
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_dataset(staging, subjects, sections, settings)
        if _is_up_to_date(root, settings):  # a concurrent run finished first
            return str(datalist_path)
        _replace_folder(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(datalist_path)


def _replace_folder(new: Path, target: Path) -> None:
    """Move folder ``new`` onto ``target``, deleting the previous ``target`` (if any) afterwards."""
    if not target.exists():
        os.rename(new, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, retired / target.name)
    try:
        os.rename(new, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(retired / target.name, target)  # put the previous dataset back
        raise
    finally:
        if target.exists():
            shutil.rmtree(retired, ignore_errors=True)


if __name__ == "__main__":
    import fire

    fire.Fire(ensure_phantom_dataset)
