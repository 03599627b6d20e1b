"""Registration engine of the CCT-R bundle: pairwise transforms, BRS, label propagation.

Modules: ``geometry`` (RAS/LPS/voxel conventions), ``transform`` (the single ``PairTransform``
representation), ``volumes`` (loading, in-plane pyramid), ``similarity`` (masked MI/NCC),
``torch_engine`` / ``sitk_engine`` (the two engines, chosen with ``engine.make_engine``),
``pairs`` (which pairs), ``store`` (compact crash-safe storage), ``brs`` (best registration
selection), ``propagation`` (label warping, ``PropagateLabeld``), ``point_mapping``
(``map_slice_points``), ``baseline`` (registration-only segmentation), ``runner``
(``RegistrationRunner``, the object the config calls), ``synthetic`` (analytic test volumes).
See docs/registration.md.
"""

from .geometry import RAS_LPS_FLIP, slice_axis
from .point_mapping import map_slice_points
from .store import TransformStore, TransformTable, load_transforms_torch
from .transform import PairTransform

__all__ = [
    "RAS_LPS_FLIP",
    "PairTransform",
    "TransformStore",
    "TransformTable",
    "load_transforms_torch",
    "map_slice_points",
    "slice_axis",
]
