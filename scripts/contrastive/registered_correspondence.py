"""Corresponding points of all training volumes through the stored registrations (for REPS).

:class:`RegisteredCorrespondence` holds, for ``V`` volumes, their voxel->RAS affines and the affine
``T_ij`` (world points of i -> world points of j, see docs/registration.md) of every registered
pair, precomposed into voxel maps ``M_ij = inv(A_j) @ T_ij @ A_i``. :meth:`map_slice_points` maps
many slice points of many volumes to every other volume in one batched product: the vectorised
counterpart of :func:`scripts.registration.map_slice_points`.

A transform with a displacement field (``T(x) = A (x + v(x))``, affine + deformable registration)
is applied in full: the field is sampled at each point (trilinear, as
:meth:`scripts.registration.transform.PairTransform.map_points`) and its displacement added after the
affine voxel map, ``vox_j = M_ij vox + inv(A_j)[:3, :3] A[:3, :3] v(A_i vox)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch

from scripts.data.datalist import load_datalist
from scripts.data.orientation import oriented_geometry
from scripts.registration.geometry import check_affine, slice_axis
from scripts.registration.store import TransformStore
from scripts.registration.transform import PairTransform, sample_field

__all__ = ["RegisteredCorrespondence"]

logger = logging.getLogger(__name__)


class RegisteredCorrespondence:
    """Voxel-to-voxel maps between ``V`` volumes.

    Args:
        ids: volume ids (index order of every tensor here).
        affines: ``(V, 4, 4)`` voxel -> RAS world affines.
        shapes: ``(V, 3)`` voxel grid shapes.
        transforms: ``{(id_i, id_j): T_ij}``: RAS world 4x4 maps, or
            :class:`scripts.registration.transform.PairTransform` s (their displacement fields are
            used); missing pairs are unavailable.
    """

    def __init__(
        self,
        ids: Sequence[str],
        affines,
        shapes,
        transforms: Mapping[tuple[str, str], np.ndarray | PairTransform] | Callable[[], Mapping],
    ):
        self.ids = [str(i) for i in ids]
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("RegisteredCorrespondence: volume ids must be unique")
        self.index = {v: n for n, v in enumerate(self.ids)}
        v = len(self.ids)
        a = (
            np.stack([check_affine(x, f"affine of {i}") for x, i in zip(affines, self.ids)])
            if v
            else np.zeros((0, 4, 4))
        )
        self.shapes = torch.as_tensor(np.asarray(shapes, dtype=np.int64).reshape(v, 3))
        self.axes = torch.tensor([slice_axis(x) for x in a], dtype=torch.long)
        self._affines = a
        self._max_slices = int(self.shapes.gather(1, self.axes[:, None]).max()) if v else 0
        self._planes = torch.tensor([[1, 2], [0, 2], [0, 1]])
        self._pending = transforms if callable(transforms) else None
        if self._pending is None:
            self._set_transforms(transforms)

    def resolve(self) -> "RegisteredCorrespondence":
        """Load the transforms if they were given as a function (on first use: see :meth:`from_datalist`)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._set_transforms(pending())
        return self

    def _set_transforms(self, transforms: Mapping) -> None:
        a, v = self._affines, len(self.ids)
        maps = np.tile(np.eye(4), (v, v, 1, 1))
        ok = np.zeros((v, v), dtype=bool)
        inv = np.linalg.inv(a) if v else a
        # (i, j) -> (field (3, gi, gj, gk), voxel of i -> control grid 4x4, RAS mm -> voxel of j 3x3)
        self.fields: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for (i, j), t in transforms.items():
            if i not in self.index or j not in self.index or i == j:
                continue
            field = None
            if isinstance(t, PairTransform):
                field, field_affine, t = t.field, t.field_affine, t.matrix
            t = np.asarray(t, dtype=np.float64)
            if t.shape != (4, 4) or not np.all(np.isfinite(t)):
                continue
            ii, jj = self.index[i], self.index[j]
            maps[ii, jj] = inv[jj] @ t @ a[ii]
            ok[ii, jj] = True
            if field is not None:
                self.fields[(ii, jj)] = (
                    torch.as_tensor(np.asarray(field), dtype=torch.float64),
                    torch.as_tensor(np.linalg.inv(field_affine) @ a[ii]),
                    torch.as_tensor(inv[jj][:3, :3] @ t[:3, :3]),
                )
        self.voxel_maps = torch.as_tensor(maps)  # (V, V, 4, 4) float64
        self.available = torch.as_tensor(ok)  # (V, V)
        # registered partners of each volume as a padded (V, P) table (P: the most partners of any volume), so
        # that mapping anchors to their partners has a fixed size: A anchors -> A * P rows, no host read
        counts = ok.sum(1).astype(np.int64) if v else np.zeros(0, dtype=np.int64)
        width = max(int(counts.max()) if v else 0, 1)
        table = np.zeros((v, width), dtype=np.int64)
        for n in range(v):
            table[n, : counts[n]] = np.nonzero(ok[n])[0]
        self.partner_table = torch.as_tensor(table)
        self.partner_mask = torch.as_tensor(np.arange(width)[None, :] < counts[:, None])

    def to(self, device: torch.device | str) -> "RegisteredCorrespondence":
        """Keep the tables on ``device`` (the training device: the look-ups then never leave it); returns self."""
        self.resolve()
        for name in ("shapes", "axes", "voxel_maps", "available", "partner_table", "partner_mask", "_planes"):
            setattr(self, name, getattr(self, name).to(device))
        self.fields = {k: tuple(t.to(device) for t in f) for k, f in self.fields.items()}
        return self

    @property
    def device(self) -> torch.device:
        return self.resolve().voxel_maps.device

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_slices(self) -> int:
        """The largest number of slices of any volume."""
        return self._max_slices

    def num_slices(self) -> torch.Tensor:
        """``(V,)`` slices per volume."""
        return self.shapes.gather(1, self.axes[:, None])[:, 0]

    def map_slice_points(
        self, volume: torch.Tensor, slice_index: torch.Tensor, uv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Map ``A`` slice points to every volume.

        Args:
            volume: ``(A,)`` volume indices ``i``; slice_index: ``(A,)`` slice ``z`` of each point;
            uv: ``(A, 2)`` in-plane voxel coordinates (non-slice axes in increasing order).

        Returns:
            ``(slice_j (A, V) long, uv_j (A, V, 2) float64, ok (A, V) bool)``: the nearest slice of
            volume ``j`` and the in-plane coordinates there; ``ok`` where ``T_ij`` exists and the
            point falls inside ``j``'s slice range (in-plane bounds are checked by the look-up).
        """
        dev = self.device
        volume = volume.long().to(dev)
        n, v = volume.shape[0], len(self)
        rows = torch.arange(n, device=dev).repeat_interleave(v)
        z, uv_j, ok = self._map_pairs(
            volume[rows], slice_index.long().to(dev)[rows], uv.to(dev)[rows], torch.arange(v, device=dev).repeat(n)
        )
        return z.reshape(n, v), uv_j.reshape(n, v, 2), ok.reshape(n, v)

    def map_to_partners(
        self, volume: torch.Tensor, slice_index: torch.Tensor, uv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`map_slice_points` restricted to the registered partners of each point's volume.

        Returns flat ``(point (E,), volume_j (E,), slice_j (E,), uv_j (E, 2), ok (E,))`` with ``E = A * P``
        rows, ``P`` partners per point (padded: ``ok`` is False on padding rows): with a few partners per
        volume (``reps_partners``) a small fraction of the work of mapping every point to every volume,
        in a fixed size (no host read).
        """
        dev = self.device
        volume = volume.long().to(dev)
        width = self.partner_table.shape[1]
        rows = torch.arange(volume.shape[0], device=dev).repeat_interleave(width)
        targets = self.partner_table[volume].reshape(-1)
        real = self.partner_mask[volume].reshape(-1)
        z, uv_j, ok = self._map_pairs(volume[rows], slice_index.long().to(dev)[rows], uv.to(dev)[rows], targets)
        return rows, targets, z, uv_j, ok & real

    def _map_pairs(
        self, volume: torch.Tensor, slice_index: torch.Tensor, uv: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Points of slices ``(volume, slice_index)`` at ``uv`` (all ``(N,)`` / ``(N, 2)``) -> volumes ``targets (N,)``."""
        uv = uv.to(torch.float64)
        n = volume.shape[0]
        axes_i = self.axes[volume]  # (N,)
        vox = torch.empty((n, 3), dtype=torch.float64, device=uv.device)
        plane = self._planes[axes_i]  # in-plane axes per point
        vox.scatter_(1, plane, uv)
        vox.scatter_(1, axes_i[:, None], slice_index[:, None].to(torch.float64))
        m = self.voxel_maps[volume, targets]  # (N, 4, 4)
        vox_j = (m[:, :3, :3] @ vox[..., None])[..., 0] + m[:, :3, 3]  # (N, 3)
        # displacement fields (deformable pairs): every field over every point, masked to its pair; fixed sizes
        for (i, j), (field, to_grid, to_vox_j) in self.fields.items():
            if n == 0:
                break
            sel = ((volume == i) & (targets == j))[:, None]
            grid = (to_grid[:3, :3] @ vox[..., None])[..., 0] + to_grid[:3, 3]
            vox_j = vox_j + torch.where(
                sel, sample_field(field, grid) @ to_vox_j.T, 0.0
            )  # displacement (RAS mm) -> voxels of j
        axes_j = self.axes[targets]  # (N,)
        z = vox_j.gather(1, axes_j[:, None])[:, 0].round().long()
        plane_j = self._planes[axes_j]  # (N, 2)
        uv_j = vox_j.gather(1, plane_j)
        ok = self.available[volume, targets] & (z >= 0) & (z < self.num_slices()[targets])
        return z.clamp(0, max(self.max_slices - 1, 0)), uv_j, ok

    @classmethod
    def from_datalist(
        cls,
        datalist: str | os.PathLike,
        registration_dir: str | os.PathLike | Callable[[], str],
        sections: Sequence[str] = ("training", "unlabeled"),
        orientation: str | None = None,
    ) -> "RegisteredCorrespondence":
        """Volumes of ``sections`` of ``datalist`` (geometry read from the image headers) and the transforms
        stored in ``registration_dir`` (a :class:`scripts.registration.TransformStore` folder), with
        their displacement fields where the registration was deformable.

        ``orientation``: the networks' orientation (``train.yaml``'s ``orientation``): voxel coordinates are
        those of each volume reoriented to it, as the training slices are (the world transforms are unchanged).

        ``registration_dir`` may be a function that returns the folder: the volumes are then read now and the
        transforms on first use (training's config passes the registration step's folder so, so that building
        the trainer does not register the volumes; the registration's datalist has the same volumes as
        ``datalist``).
        """
        entries = []
        for section in sections:
            try:
                entries += load_datalist(datalist, section)
            except KeyError:
                continue
        if not entries:
            raise ValueError(f"datalist {datalist}: no entries in sections {list(sections)} for REPS")
        ids, affines, shapes = [], [], []
        for e in entries:
            if not e.get("id"):
                raise ValueError(
                    f"datalist {datalist}: entry {e.get('image')} has no 'id'; REPS keys the memory bank by volume id"
                )
            try:
                header = nib.load(e["image"])
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"datalist {datalist}: image {e['image']} of {e['id']!r} does not exist"
                ) from None
            affine, shape = oriented_geometry(header.affine, header.shape[:3], orientation)
            ids.append(e["id"])
            affines.append(affine)
            shapes.append(shape)
        if callable(registration_dir):
            return cls(ids, affines, shapes, lambda: _stored_transforms(datalist, registration_dir(), ids))
        return cls(ids, affines, shapes, _stored_transforms(datalist, registration_dir, ids))


def _stored_transforms(datalist, registration_dir, ids: list[str]) -> dict:
    """The successful transforms between ``ids`` stored in ``registration_dir`` (an error if there are none)."""
    if not os.path.isdir(registration_dir):
        raise FileNotFoundError(
            f"REPS registration folder {registration_dir} does not exist (run the registration step first)"
        )
    table = TransformStore(registration_dir).load()
    known = set(ids)
    transforms = {
        (f, m): table.get(f, m)
        for f, m, s in zip(table.fixed_ids, table.moving_ids, table.status)
        if s == "ok" and f in known and m in known
    }
    if not transforms:
        from scripts.registration.in_training import RegistrationSetupError

        raise RegistrationSetupError(
            f"REPS: {registration_dir} holds no registration between the training volumes of {datalist}, so no anchor "
            "would find a registered positive (REPS would silently be SCL). Let training register (no --registration_dir), "
            "or rerun 'run registration' with --reps_partners 2"
        )
    with_partner = {v for pair in transforms for v in pair}
    deformable = sum(not t.is_affine for t in transforms.values())
    logger.info(
        "REPS: %d of %d training volumes have registered partners (%d transforms, %d with a displacement field)",
        len(with_partner),
        len(ids),
        len(transforms),
        deformable,
    )
    return transforms
