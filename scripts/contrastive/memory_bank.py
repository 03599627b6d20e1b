"""REPS memory bank: recent slice feature maps keyed by (volume, slice), and registered positives.

:class:`SliceFeatureBank` is a FIFO of at most ``capacity`` slice embeddings (one scale, detached),
keyed by ``(volume index, slice index)``. Pushing a slice that is already stored overwrites it in
place and makes it the newest; when the bank is full the oldest slice leaves first. Each entry keeps
its *frame*: the 2x3 map from the slice's original in-plane voxel coordinates ``(u, v)`` (before
augmentation) to the stored map's pixel coordinates, so a point of the original volume can be
looked up whatever augmentation the stored patch went through.

:func:`bank_capacity` is REPS's ``(M + K) / 5`` (M unlabeled, K labeled slices) with a memory cap.

:func:`registered_positives` is Eq. 12: for anchors at points ``p`` of volumes ``i``, map ``p``
through ``T_ij`` to every other volume ``j`` (:class:`scripts.contrastive.registered_correspondence.RegisteredCorrespondence`),
read the bank at ``p_j`` (bilinear) where slice ``(j, z_j)`` is stored and ``p_j`` lies inside its
map, and average over the available ``j``. All anchors and volumes at once: no loop over anchors.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from scripts.contrastive.registered_correspondence import RegisteredCorrespondence

__all__ = ["bank_capacity", "SliceFeatureBank", "registered_positives"]


def bank_capacity(labeled_slices: int, unlabeled_slices: int, fraction: float = 0.2, max_slices: int | None = None) -> int:
    """``ceil(fraction * (M + K))`` slices (REPS: a fifth), at most ``max_slices``, at least 1."""
    n = max(1, math.ceil(fraction * (int(labeled_slices) + int(unlabeled_slices))))
    return n if max_slices is None else max(1, min(n, int(max_slices)))


class SliceFeatureBank:
    """FIFO bank of ``(D, h, w)`` slice feature maps (module docstring).

    Args:
        capacity: the most slices kept.
        channels, height, width: the stored maps' shape (``D, h, w``).
        num_volumes, max_slices: the key space (volume indices ``0..V-1``, slices ``0..S-1``).
        dtype: storage dtype (``float16`` halves the memory).
        device: storage device.
    """

    def __init__(self, capacity: int, channels: int, height: int, width: int, num_volumes: int, max_slices: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if min(capacity, channels, height, width, num_volumes, max_slices) < 1:
            raise ValueError(
                f"SliceFeatureBank: capacity, channels, height, width, num_volumes and max_slices must be >= 1, got "
                f"{(capacity, channels, height, width, num_volumes, max_slices)}"
            )
        self.capacity, self.channels, self.height, self.width = int(capacity), int(channels), int(height), int(width)
        self.features = torch.zeros((self.capacity, self.height, self.width, self.channels), dtype=dtype, device=device)
        self.frames = torch.full((self.capacity, 2, 3), float("nan"), dtype=torch.float64, device=device)
        self.slot_of = torch.full((int(num_volumes), int(max_slices)), -1, dtype=torch.long, device=device)
        self._order: OrderedDict[tuple[int, int], int] = OrderedDict()  # key -> slot, oldest first

    def __len__(self) -> int:
        return len(self._order)

    def state(self) -> dict:
        """Everything needed to rebuild this bank (a checkpoint entry): shape, stored maps and frames,
        and the FIFO order. Only the occupied slots' maps are kept."""
        slots = torch.tensor(list(self._order.values()), dtype=torch.long, device=self.features.device)
        return {
            "capacity": self.capacity, "channels": self.channels, "height": self.height, "width": self.width,
            "num_volumes": int(self.slot_of.shape[0]), "max_slices": int(self.slot_of.shape[1]),
            "dtype": str(self.features.dtype).removeprefix("torch."),
            "keys": [list(k) for k in self._order], "features": self.features[slots].cpu(), "frames": self.frames[slots].cpu(),
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "SliceFeatureBank":
        """The bank :meth:`state` describes, its slices in the same FIFO order."""
        bank = cls(state["capacity"], state["channels"], state["height"], state["width"], state["num_volumes"],
                   state["max_slices"], dtype=getattr(torch, state["dtype"]), device=device)
        keys = [tuple(int(x) for x in k) for k in state["keys"]]
        if len(keys) > bank.capacity or len(state["features"]) != len(keys):
            raise ValueError(f"bank state: {len(keys)} keys, {len(state['features'])} maps, capacity {bank.capacity}")
        for key in keys:   # fills slots 0, 1, ... in FIFO order
            bank._slot_for(key)
        if keys:
            bank.features[: len(keys)] = state["features"].to(bank.features)
            bank.frames[: len(keys)] = state["frames"].to(bank.frames)
        return bank

    def to(self, device: torch.device | str) -> "SliceFeatureBank":
        """Move the stored maps (in place); returns the bank."""
        self.features, self.frames, self.slot_of = self.features.to(device), self.frames.to(device), self.slot_of.to(device)
        return self

    def keys(self) -> list[tuple[int, int]]:
        """Stored ``(volume, slice)`` keys, oldest first."""
        return list(self._order)

    @property
    def bytes_per_slice(self) -> int:
        """Storage of one slice: its feature map and its frame."""
        return self.features[0].numel() * self.features.element_size() + self.frames[0].numel() * self.frames.element_size()

    @property
    def nbytes(self) -> int:
        """Storage of the whole bank (preallocated) including the key table."""
        return self.capacity * self.bytes_per_slice + self.slot_of.numel() * self.slot_of.element_size()

    def _slot_for(self, key: tuple[int, int]) -> int:
        if not (0 <= key[0] < self.slot_of.shape[0] and 0 <= key[1] < self.slot_of.shape[1]):
            raise ValueError(f"bank key (volume, slice) = {key} outside the key space {tuple(self.slot_of.shape)}")
        if key in self._order:
            self._order.move_to_end(key)
            return self._order[key]
        if len(self._order) < self.capacity:
            slot = len(self._order)
        else:
            old, slot = self._order.popitem(last=False)
            self.slot_of[old] = -1
        self._order[key] = slot
        self.slot_of[key] = slot
        return slot

    @torch.no_grad()
    def push(self, volume: torch.Tensor, slice_index: torch.Tensor, features: torch.Tensor, frames: torch.Tensor) -> None:
        """Store ``(B, D, h, w)`` ``features`` of slices ``(volume[b], slice_index[b])`` with their
        ``(B, 2, 3)`` frames (original ``(u, v, 1)`` -> map pixel ``(row, col)``). Samples with a
        non-finite frame are skipped. Later duplicates in one push win."""
        if features.shape[1:] != (self.channels, self.height, self.width):
            raise ValueError(f"bank stores ({self.channels}, {self.height}, {self.width}) maps, got {tuple(features.shape[1:])}")
        keep = torch.isfinite(frames).reshape(frames.shape[0], -1).all(1).tolist()
        slots, rows = [], []
        for b, (v, s) in enumerate(zip(volume.tolist(), slice_index.tolist())):
            if keep[b]:
                slot = self._slot_for((int(v), int(s)))
                if slot in slots:  # the same slice twice in a batch: the later sample wins
                    rows[slots.index(slot)] = b
                else:
                    slots.append(slot)
                    rows.append(b)
        if slots:
            slot_t = torch.tensor(slots, dtype=torch.long, device=self.features.device)
            rows_t = torch.tensor(rows, dtype=torch.long)  # indexes the features and the frames, each on its own device
            self.features[slot_t] = features.detach()[rows_t.to(features.device)].permute(0, 2, 3, 1).to(self.features)
            self.frames[slot_t] = frames.detach()[rows_t.to(frames.device)].to(self.frames)

    def lookup(self, volume: torch.Tensor, slice_index: torch.Tensor, uv: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear features at original in-plane points ``uv (..., 2)`` of slices ``(volume, slice_index)``.

        Returns ``(features (..., D), found (...))``; ``found`` where ``ok``, the slice is stored and
        the point lies inside the stored map (features there are 0 elsewhere).
        """
        shape = volume.shape
        vol, sl = volume.reshape(-1).long(), slice_index.reshape(-1).long()
        dev = self.features.device
        vol, sl = vol.to(dev), sl.to(dev)
        slot = self.slot_of[vol.clamp(0, self.slot_of.shape[0] - 1), sl.clamp(0, self.slot_of.shape[1] - 1)]
        found = ok.reshape(-1).to(dev) & (slot >= 0)
        out = torch.zeros((found.shape[0], self.channels), dtype=self.features.dtype, device=dev)
        cand = found.nonzero()[:, 0]  # work only on points whose slice is stored (usually few)
        frame = self.frames[slot[cand]]  # (n, 2, 3)
        p = uv.reshape(-1, 2)[cand.to(uv.device)].to(torch.float64).to(dev)
        rc = (frame[..., :2] @ p[..., None])[..., 0] + frame[..., 2]  # (n, 2) map pixel coordinates
        inside = torch.isfinite(rc).all(1)
        rc = torch.nan_to_num(rc, nan=-10.0)
        inside &= (rc[:, 0] >= -0.5) & (rc[:, 0] <= self.height - 0.5) & (rc[:, 1] >= -0.5) & (rc[:, 1] <= self.width - 0.5)
        found[cand[~inside]] = False
        hit, rc = cand[inside], rc[inside]
        if hit.numel():
            r = rc[:, 0].clamp(0, self.height - 1)
            c = rc[:, 1].clamp(0, self.width - 1)
            r0 = r.floor().long().clamp(max=self.height - 2 if self.height > 1 else 0)
            c0 = c.floor().long().clamp(max=self.width - 2 if self.width > 1 else 0)
            r1, c1 = (r0 + 1).clamp(max=self.height - 1), (c0 + 1).clamp(max=self.width - 1)
            fr, fc = (r - r0).to(self.features.dtype)[:, None], (c - c0).to(self.features.dtype)[:, None]
            f, s = self.features, slot[hit]
            out[hit] = (f[s, r0, c0] * (1 - fr) * (1 - fc) + f[s, r0, c1] * (1 - fr) * fc
                        + f[s, r1, c0] * fr * (1 - fc) + f[s, r1, c1] * fr * fc)
        return out.reshape(*shape, self.channels), found.reshape(shape)


def registered_positives(correspondence: RegisteredCorrespondence, bank: SliceFeatureBank, volume: torch.Tensor,
                         slice_index: torch.Tensor, uv: torch.Tensor, layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 12: mean bank feature at the registered points of ``A`` anchors in every other volume.

    Args:
        volume, slice_index: ``(A,)`` volume indices and slices of the anchors.
        uv: ``(A, 2)`` original in-plane voxel coordinates of the anchors.
        layers: the bank holds this many feature maps per slice, layer ``l`` of volume ``j`` under
            volume key ``j + l * V`` (the joint space of two networks: ``layers=2``, one map per
            network); the mean is over every layer found.

    Returns:
        ``(a_reg (A, D), available (A,) bool)``; ``a_reg`` is 0 where no registered feature was found.
    """
    if volume.numel() == 0:
        return torch.zeros((0, bank.channels), dtype=bank.features.dtype, device=bank.features.device), torch.zeros(0, dtype=torch.bool)
    rows, targets, z, uv_j, ok = correspondence.map_to_partners(volume, slice_index, uv)
    n, v = volume.shape[0], len(correspondence)
    dev = bank.features.device
    rows = rows.to(dev)
    total = torch.zeros((n, bank.channels), dtype=bank.features.dtype, device=dev)
    count = torch.zeros(n, dtype=torch.long, device=dev)
    for layer in range(int(layers)):
        feats, found = bank.lookup(targets + layer * v, z, uv_j, ok)  # one row per (anchor, registered partner)
        total.index_add_(0, rows[found], feats[found])
        count.index_add_(0, rows[found], torch.ones_like(rows[found]))
    mean = total / count.clamp_min(1)[:, None].to(total.dtype)
    return mean, count > 0
