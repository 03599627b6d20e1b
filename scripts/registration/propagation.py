"""Label propagation: a labeled volume's label warped onto another volume's voxel grid.

For target j and labeled partner q the registered label is ``r(x) = y_q(T_jq(x))`` for every voxel
centre x of j (``T_jq``: fixed = j, moving = q), by nearest neighbour or by linear interpolation
of the one-hot label followed by argmax.  The result lies on j's grid (same shape and affine as
j's image), so in training it is loaded like ``label`` (``LoadImaged(keys=["image", "label",
"registered_label"])``) and goes through the same slice sampling and augmentation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Hashable, Mapping

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..data.atomic_io import save_nifti
from .geometry import apply_affine
from .store import TransformStore, TransformTable
from .transform import PairTransform
from .volumes import VolumeError, load_volume


class PropagationError(ValueError):
    """A label cannot be propagated (missing transform, partner or file)."""


def warp_to_grid(
    source: np.ndarray,
    source_affine: np.ndarray,
    target_shape,
    target_affine: np.ndarray,
    transform: PairTransform,
    mode: str = "nearest",
    num_classes: int | None = None,
    chunk: int = 2_000_000,
) -> np.ndarray:
    """Resample ``source`` (on its grid) at ``T(x)`` for every voxel centre x of the target grid.

    ``transform`` maps target world points to source world points (``T_jq``).
    ``mode``: ``"nearest"`` (labels), ``"onehot"`` (labels: linear one-hot then argmax) or
    ``"linear"`` (intensities).  Points outside the source get 0 (background).
    """
    if mode not in ("nearest", "onehot", "linear"):
        raise ValueError(f"mode must be 'nearest', 'onehot' or 'linear', got {mode!r}")
    src = np.asarray(source)
    shape = tuple(int(n) for n in target_shape)
    inv_src = np.linalg.inv(source_affine)
    if mode == "onehot":
        n_cls = int(num_classes) if num_classes is not None else int(src.max()) + 1
        lab = torch.as_tensor(src.astype(np.int64))
        img = F.one_hot(lab.clamp(min=0), n_cls).permute(3, 0, 1, 2)[None].float()
        img[:, 0] += (lab < 0).float()[None]
    else:
        img = torch.as_tensor(src.astype(np.float32))[None, None]
    src_shape = torch.tensor(src.shape, dtype=torch.float64)
    out = np.zeros(int(np.prod(shape)), dtype=np.float32 if mode == "linear" else src.dtype)
    total = out.size
    for start in range(0, total, chunk):
        flat = np.arange(start, min(total, start + chunk))
        idx = np.stack(np.unravel_index(flat, shape), -1).astype(np.float64)
        world = apply_affine(target_affine, idx)
        vox = torch.as_tensor(apply_affine(inv_src, transform.map_points(world)))
        grid = (2 * vox / (src_shape - 1).clamp(min=1) - 1).flip(-1).reshape(1, 1, 1, -1, 3).float()
        interp = "nearest" if mode == "nearest" else "bilinear"
        vals = F.grid_sample(img, grid, mode=interp, padding_mode="zeros", align_corners=True)[0, :, 0, 0]
        if mode == "onehot":
            inside = ((vox >= 0) & (vox <= src_shape - 1)).all(-1)
            vals[0, ~inside] = 1.0  # outside the source: background
            out[start : start + flat.size] = vals.argmax(0).numpy().astype(out.dtype)
        else:
            out[start : start + flat.size] = vals[0].numpy().astype(out.dtype)
    return out.reshape(shape)


def propagate_label(
    label_path: str,
    target_image_path: str,
    transform: PairTransform,
    mode: str = "nearest",
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp the label file onto the target image's grid; returns ``(label array, target affine)``."""
    label = load_volume(label_path, dtype=np.float32)
    lab = np.rint(label.array).astype(np.int16)
    try:
        img = nib.load(target_image_path)
    except FileNotFoundError:
        raise VolumeError(f"{target_image_path}: file not found") from None
    shape = img.shape[:3]
    out = warp_to_grid(lab, label.affine, shape, img.affine, transform, mode=mode, num_classes=num_classes)
    return out.astype(np.uint8), np.asarray(img.affine, dtype=np.float64)


def majority_vote(labels: list[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """Voxel-wise majority over label maps on the same grid (ties go to the earlier-listed map)."""
    if not labels:
        raise ValueError("majority_vote needs at least one label map")
    if len(labels) == 1:  # a vote of one (a single registered partner)
        return np.asarray(labels[0]).astype(np.uint8)
    stack = np.stack([np.asarray(x, dtype=np.int64) for x in labels])
    n_cls = int(num_classes) if num_classes is not None else int(stack.max()) + 1
    counts = np.stack([(stack == c).sum(0) for c in range(n_cls)])
    best = counts.max(0)
    out = np.full(stack.shape[1:], -1, dtype=np.int64)
    for x in stack:  # first-listed (best-ranked) map wins among tied classes
        tied = np.take_along_axis(counts, np.clip(x, 0, n_cls - 1)[None], 0)[0] == best
        take = (out < 0) & tied
        out[take] = x[take]
    return out.astype(np.uint8)


class PropagateLabeld(MapTransform):
    """MONAI map transform: put the path of the registered label (cached NIfTI) under ``keys``.

    Reads ``data[id_key]`` (the target id), ``data[image_key]`` (target image path) and
    ``data[partner_key]`` (labeled partner id, e.g. chosen by BRS); the partner's label path comes
    from ``labels``.  The warped label is computed once and cached as
    ``cache_dir/<id>__from__<partner>.nii.gz``; load it afterwards with ``LoadImaged`` so it
    stays on the image's voxel grid.

    Args:
        keys: output key(s), default ``"registered_label"``.
        transforms: a :class:`TransformTable` or a store folder.
        labels: labeled id -> label path.
        cache_dir: folder of the cached NIfTI files.
        mode: ``"nearest"`` or ``"onehot"``.
    """

    def __init__(
        self,
        keys: KeysCollection = "registered_label",
        transforms: TransformTable | str | os.PathLike | None = None,
        labels: Mapping[str, str] | None = None,
        cache_dir: str | os.PathLike = "registered_labels",
        mode: str = "nearest",
        num_classes: int | None = None,
        id_key: str = "id",
        image_key: str = "image",
        partner_key: str = "partner",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if transforms is None:
            raise PropagationError("PropagateLabeld needs `transforms` (a TransformTable or a store folder)")
        self.table = transforms if isinstance(transforms, TransformTable) else TransformStore(transforms).load()
        self.labels = dict(labels or {})
        self.cache_dir = Path(cache_dir)
        self.mode, self.num_classes = mode, num_classes
        self.id_key, self.image_key, self.partner_key = id_key, image_key, partner_key

    def cache_path(self, target_id: str, partner_id: str) -> Path:
        return self.cache_dir / f"{target_id}__from__{partner_id}.nii.gz"

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        target, partner = str(d[self.id_key]), str(d[self.partner_key])
        path = self.cache_path(target, partner)
        if not path.exists():
            if partner not in self.labels:
                raise PropagationError(f"partner {partner!r} of {target!r} has no label path")
            transform = self.table.get(target, partner)
            if transform is None:
                raise PropagationError(f"no successful transform T_jq for ({target!r} -> {partner!r})")
            label, affine = propagate_label(
                self.labels[partner], str(d[self.image_key]), transform, self.mode, self.num_classes
            )
            save_nifti(label, affine, path, dtype=np.uint8)
        for key in self.keys:  # output keys: created, not read
            d[key] = str(path)
        return d
