"""Loading volumes for registration and preparing them at a reduced in-plane resolution."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .geometry import check_affine, slice_axis, spacing_of


class VolumeError(ValueError):
    """A volume file is missing, unreadable or not a 3D image."""


@dataclass
class Volume:
    """A 3D array in (i, j, k) order with its voxel -> RAS world affine."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def load_volume(path: str | os.PathLike, dtype=np.float32) -> Volume:
    """Read a 3D NIfTI (a trailing singleton 4th axis is dropped) with nibabel."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeError(f"{path}: file not found") from FileNotFoundError(path)
    try:
        img = nib.load(path)
        arr = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read as NIfTI ({exc})") from exc
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    try:
        affine = check_affine(img.affine, f"{path} affine")
    except ValueError as exc:
        raise VolumeError(str(exc)) from exc
    return Volume(arr, affine)


def normalise_intensity(array: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Robustly rescale to [0, 1]: percentiles ``lower``/``upper`` map to 0/1, then clip."""
    lo, hi = np.percentile(array, [lower, upper])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def shrink_in_plane(volume: Volume, target_spacing: float) -> Volume:
    """Block-average the two in-plane axes by the integer factor closest to ``target_spacing``.

    Like ``sitk.BinShrink`` (not ``sitk.Shrink``): the new voxel centre is the mean of the block's
    centres, so the affine stays exact (no half-voxel shift).  The slice axis is never shrunk.
    """
    sp = spacing_of(volume.affine)
    ax = slice_axis(volume.affine)
    factors = [1, 1, 1]
    for a in range(3):
        if a != ax:
            factors[a] = max(1, int(round(target_spacing / sp[a])))
    if factors == [1, 1, 1]:
        return volume
    shape = [max(1, s // f) for s, f in zip(volume.shape, factors)]
    arr = volume.array[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    t = torch.as_tensor(np.ascontiguousarray(arr), dtype=torch.float32)[None, None]
    out = F.avg_pool3d(t, kernel_size=factors, stride=factors)[0, 0].numpy()
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] * np.asarray(factors, dtype=np.float64)[None, :]
    affine[:3, 3] = volume.affine[:3, :3] @ ((np.asarray(factors) - 1) / 2.0) + volume.affine[:3, 3]
    return Volume(out, affine)


class VolumeCache:
    """A bounded LRU cache of prepared volumes, keyed by path.

    On a miss the file is read once and shrunk to every spacing in ``spacings`` (plus the one
    asked for), so a pyramid never reads a file twice; at most ``max_items`` paths are kept, and
    at most ``max_full`` full-resolution volumes (those can be large, e.g. CT).
    """

    def __init__(self, max_items: int = 64, spacings: tuple[float, ...] = (), max_full: int = 2) -> None:
        self.max_items = max(1, int(max_items))
        self.max_full = max(1, int(max_full))
        self.spacings = tuple(float(s) for s in spacings)
        self._items: OrderedDict[str, dict[float, Volume]] = OrderedDict()
        self._full: OrderedDict[str, Volume] = OrderedDict()

    def _load(self, path: str) -> Volume:
        vol = load_volume(path)
        return Volume(normalise_intensity(vol.array), vol.affine)

    def full(self, path: str) -> Volume:
        """The intensity-normalised full-resolution volume."""
        if path in self._full:
            self._full.move_to_end(path)
            return self._full[path]
        vol = self._load(path)
        self._full[path] = vol
        while len(self._full) > self.max_full:
            self._full.popitem(last=False)
        return vol

    def get(self, path: str, spacing: float) -> Volume:
        """The volume at ``path``, intensity-normalised and shrunk in-plane to about ``spacing`` mm."""
        spacing = float(spacing)
        entry = self._items.get(path)
        if entry is not None and spacing in entry:
            self._items.move_to_end(path)
            return entry[spacing]
        full = self._full[path] if path in self._full else self._load(path)
        entry = entry or {}
        for s in set(self.spacings) | {spacing}:
            if s not in entry:
                entry[s] = shrink_in_plane(full, s)
        self._items[path] = entry
        self._items.move_to_end(path)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return entry[spacing]
