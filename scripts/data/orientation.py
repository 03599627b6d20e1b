"""One canonical orientation for the networks: volumes are reoriented before they are sliced.

The same anatomy can be stored in many array orders: scanners, DICOM converters and ITK-based tools
write LPS, others RAS, some permute the axes. A 2D network sees the stored array, so without a
canonical orientation it sees a mirrored heart for one file and not for another, and for abdominal
CT (trained without mirror flips) it calls the left kidney right. Training, validation, the
pseudo-label monitor, inference and evaluation therefore reorient every volume to one orientation
(``"RAS"`` by default, recorded in ``models/model_config.json``) before slicing, with MONAI's
``Orientationd``: a permutation and flips of the voxel array, the affine updated so that every voxel
keeps its place in the world. Nothing is resampled: an oblique volume is brought to the *closest*
canonical axes (nibabel's ``io_orientation``), so its in-plane directions are within 45 degrees of
the canonical ones, not equal to them. The through-plane axis is then chosen from the reoriented
spacing as before (``scripts.data.slicing``). Inference writes each prediction back in its input's
own array order, shape and affine (MONAI's ``Invertd``).

``None`` (``orientation: null``) keeps the stored array order: what bundles before 0.6.0 did, and
what a ``model_config.json`` without an ``orientation`` entry gets, so older models segment as they
were trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from monai.transforms import Identityd, Orientationd

__all__ = ["CANONICAL", "checked_orientation", "orientation_transform", "oriented_geometry", "model_orientation"]

#: The networks' orientation unless a config says otherwise (MONAI's and NIfTI's world convention).
CANONICAL = "RAS"
_AXES = ({"L", "R"}, {"A", "P"}, {"S", "I"})
#: The world convention of the affines the bundle reads (nibabel's, MONAI's NIfTI reader): RAS+.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def checked_orientation(axcodes: str | None) -> str | None:
    """``axcodes`` upper-cased if it names one of the 48 orientations (e.g. ``RAS``, ``LPS``); ``None`` stays ``None``."""
    if axcodes is None or (isinstance(axcodes, str) and axcodes.lower() in ("", "none", "null")):
        return None
    codes = str(axcodes).upper()
    axes = [next((i for i, axis in enumerate(_AXES) if c in axis), -1) for c in codes]
    if len(codes) != 3 or sorted(axes) != [0, 1, 2]:
        raise ValueError(
            f"orientation {axcodes!r}: three letters, one of L/R, one of A/P and one of S/I (e.g. 'RAS'), or null"
        )
    return codes


def orientation_transform(keys: Sequence[str] | str, axcodes: str | None, allow_missing_keys: bool = True):
    """``Orientationd`` to ``axcodes`` for ``keys`` (place it right after ``LoadImaged``); ``Identityd`` for ``None``."""
    codes = checked_orientation(axcodes)
    if codes is None:
        return Identityd(keys=keys, allow_missing_keys=allow_missing_keys)
    return Orientationd(keys=keys, axcodes=codes, labels=RAS_LABELS, allow_missing_keys=allow_missing_keys)


def oriented_geometry(affine, shape: Sequence[int], axcodes: str | None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The affine and 3D shape a volume has after :func:`orientation_transform` (what the networks see).

    Same rule as MONAI's ``Orientation`` (nibabel's closest-axes orientation), computed from the header
    alone: REPS maps registered points between volumes in these voxel coordinates.
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape[:3])
    codes = checked_orientation(axcodes)
    if codes is None:
        return affine, shape
    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(codes))
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
    new_shape = tuple(shape[int(i)] for i in np.argsort(transform[:, 0]))
    return new_affine, new_shape  # type: ignore[return-value]


def model_orientation(model_config) -> str | None:
    """The orientation a trained model expects: its recorded one; ``None`` (stored order) for models
    written before orientations were recorded."""
    return checked_orientation(model_config.get("orientation"))
