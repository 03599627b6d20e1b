"""Where each training-patch pixel came from: in-plane coordinates of the un-augmented slice.

REPS looks up features at registered points, which are points of the original volumes, while the
networks see augmented, resized patches. :class:`SliceCoordinatesd` (placed right after
:class:`scripts.data.slicing.RandSliced`) adds a 3-channel map ``slice_coords`` = ``(u, v, 1)``: the two
in-plane voxel indices of every pixel (the non-slice axes in increasing order, as
:func:`scripts.registration.map_slice_points` takes them) and a validity channel. Listed among the
transform keys with ``bilinear`` interpolation, it is rotated, flipped and resized with the image;
zero padding shows up as validity < 1.

Every augmentation of the pipeline is affine in the plane, so :func:`fit_patch_frames` recovers, per
sample, the 2x3 map from patch pixel ``(row, col)`` to slice ``(u, v)`` by least squares over the
valid interior pixels (bilinear interpolation of a linear ramp is exact away from the borders).

:class:`ContrastivePrepareBatch` extends :class:`scripts.data.semi_supervised_data.SemiSupervisedPrepareBatch`
with what the contrastive terms need: volume ids, slice indices and the coordinate maps of both halves.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.data.semi_supervised_data import SemiSupervisedBatch, SemiSupervisedPrepareBatch

__all__ = ["SLICE_COORDS", "SliceCoordinatesd", "fit_patch_frames", "ContrastiveBatch", "ContrastivePrepareBatch"]

#: Data key of the coordinate map.
SLICE_COORDS = "slice_coords"


class SliceCoordinatesd(MapTransform):
    """Add ``(3, H, W)`` ``(u, v, 1)`` coordinates of the ``(C, H, W)`` slice under ``reference``.

    The map is a MetaTensor with the reference's metadata, so spatial transforms treat it like the image.
    """

    def __init__(self, keys: str = SLICE_COORDS, reference: str = "image"):
        super().__init__(keys)
        self.reference = reference

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = d.get(self.reference)
        if ref is None or ref.ndim != 3:
            got = None if ref is None else tuple(ref.shape)
            raise ValueError(
                f"SliceCoordinatesd: {self.reference!r} must be a (C, H, W) slice (place it after RandSliced), got {got}"
            )
        h, w = ref.shape[-2:]
        u, v = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        coords = torch.stack([u, v, torch.ones_like(u)])
        for key in self.keys:
            if isinstance(ref, MetaTensor):
                d[key] = MetaTensor(
                    coords, affine=ref.affine.clone(), meta={k: v for k, v in ref.meta.items() if k != "affine"}
                )
            else:
                d[key] = coords
        return d


def fit_patch_frames(coords: torch.Tensor, erode: int = 2, min_pixels: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample affine ``(row, col, 1) -> (u, v)`` from ``(B, 3, H, W)`` augmented coordinate maps.

    Returns ``(frames (B, 2, 3) float64, ok (B,) bool)``; ``ok`` is False (frame NaN) where fewer than
    ``min_pixels`` valid pixels remain after eroding the validity mask by ``erode`` pixels.
    """
    if coords.ndim != 4 or coords.shape[1] != 3:
        raise ValueError(f"coordinate maps must be (B, 3, H, W), got {tuple(coords.shape)}")
    c = coords.detach().to(torch.float64)
    valid = (c[:, 2:3] > 0.999).to(torch.float64)
    if erode > 0:
        valid = -F.max_pool2d(-valid, kernel_size=2 * erode + 1, stride=1, padding=erode)
    b, _, h, w = c.shape
    r, col = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    x = torch.stack([r, col, torch.ones_like(r)], dim=-1).reshape(1, -1, 3).to(c.device)  # (1, P, 3)
    wgt = valid.reshape(b, -1, 1)
    y = (c[:, :2] / c[:, 2:3].clamp_min(1e-6)).permute(0, 2, 3, 1).reshape(b, -1, 2)  # (B, P, 2)
    xtx = (x * wgt).transpose(1, 2) @ x  # (B, 3, 3)
    xty = (x * wgt).transpose(1, 2) @ y  # (B, 3, 2)
    ok = wgt.sum((1, 2)) >= min_pixels
    eye = torch.eye(3, dtype=torch.float64, device=c.device)
    beta = torch.linalg.solve_ex(
        torch.where(ok[:, None, None], xtx, eye), xty
    ).result  # (B, 3, 2); no error check: no host read
    frames = beta.transpose(1, 2)
    ok = ok & torch.isfinite(frames).reshape(b, -1).all(1)
    frames = torch.where(ok[:, None, None], frames, float("nan"))
    return frames, ok


@dataclass
class ContrastiveBatch(SemiSupervisedBatch):
    """A :class:`SemiSupervisedBatch` plus, for labeled then unlabeled samples, ``ids`` (volume ids),
    ``slice_index`` ``(L + U,)`` and either ``slice_coords`` ``(L + U, 3, H, W)`` (the MONAI pipeline's coordinate
    maps, fitted by :func:`fit_patch_frames`) or ``slice_frames`` ``(L + U, 2, 3)`` (the device sampler's exact
    maps, :mod:`scripts.data.device_slices`); ``None`` where the data has neither."""

    ids: list[str] | None = None
    slice_index: torch.Tensor | None = None
    slice_coords: torch.Tensor | None = None
    slice_frames: torch.Tensor | None = None  # (L + U, 2, 3) exact patch -> slice maps (device sampling)


def _ids(x) -> list[str]:
    """A half's volume ids (the loader collates them into a list; one id alone stays one)."""
    return [str(i) for i in ([x] if isinstance(x, str) else x)]


class ContrastivePrepareBatch(SemiSupervisedPrepareBatch):
    """``prepare_batch`` giving :class:`ContrastiveBatch` es (ids, slice indices, coordinate maps)."""

    def __init__(self, coords_key: str = SLICE_COORDS, id_key: str = "id", slice_key: str = "slice_index", **kwargs):
        super().__init__(**kwargs)
        self.coords_key, self.id_key, self.slice_key = coords_key, id_key, slice_key

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs) -> ContrastiveBatch:
        base = super().__call__(batchdata, device, non_blocking, **kwargs)
        halves = (batchdata["labeled"], batchdata["unlabeled"])
        out = ContrastiveBatch(**vars(base))
        if all(self.id_key in h and self.slice_key in h for h in halves):
            out.ids = [i for h in halves for i in _ids(h[self.id_key])]
            # host tensors from the loader, joined without reading them element by element
            out.slice_index = torch.cat([torch.as_tensor(h[self.slice_key]).reshape(-1).long() for h in halves])
        if batchdata.get("slice_frames") is not None:
            out.slice_frames = torch.as_tensor(batchdata["slice_frames"]).to(
                device if device is not None else "cpu", non_blocking=non_blocking
            )
        if all(self.coords_key in h for h in halves):
            out.slice_coords = torch.cat(
                [
                    torch.as_tensor(
                        h[self.coords_key].as_tensor()
                        if isinstance(h[self.coords_key], MetaTensor)
                        else h[self.coords_key]
                    )
                    for h in halves
                ]
            ).to(device if device is not None else "cpu")
        return out
