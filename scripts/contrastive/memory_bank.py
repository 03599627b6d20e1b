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

The bank lives on the training device as fixed-size tensors (maps, frames, the (volume, slice) ->
slot table, each slot's key and the iteration it was last written); a push assigns slots by
scatter and ``argmin`` of the write times, and a look-up reads every point with masks, so neither
ever reads a device value on the host (a GPU step does not wait for them).
"""

from __future__ import annotations

import math

import torch

from scripts.contrastive.registered_correspondence import RegisteredCorrespondence

__all__ = ["bank_capacity", "SliceFeatureBank", "registered_positives"]


def bank_capacity(
    labeled_slices: int, unlabeled_slices: int, fraction: float = 0.2, max_slices: int | None = None
) -> int:
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

    def __init__(
        self,
        capacity: int,
        channels: int,
        height: int,
        width: int,
        num_volumes: int,
        max_slices: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if min(capacity, channels, height, width, num_volumes, max_slices) < 1:
            raise ValueError(
                f"SliceFeatureBank: capacity, channels, height, width, num_volumes and max_slices must be >= 1, got "
                f"{(capacity, channels, height, width, num_volumes, max_slices)}"
            )
        self.capacity, self.channels, self.height, self.width = int(capacity), int(channels), int(height), int(width)
        self.features = torch.zeros((self.capacity, self.height, self.width, self.channels), dtype=dtype, device=device)
        self.frames = torch.full((self.capacity, 2, 3), float("nan"), dtype=torch.float64, device=device)
        self.slot_of = torch.full((int(num_volumes), int(max_slices)), -1, dtype=torch.long, device=device)
        self.slot_key = torch.full(
            (self.capacity, 2), -1, dtype=torch.long, device=device
        )  # (volume, slice) of each slot
        # when each slot was last written (pushes count up from 0); free slots sort first, lowest slot first
        self.written = torch.arange(self.capacity, dtype=torch.long, device=device) - self.capacity
        self.clock = torch.zeros((), dtype=torch.long, device=device)

    def __len__(self) -> int:
        return int((self.slot_key[:, 0] >= 0).sum())

    def _fifo_slots(self) -> torch.Tensor:
        """Occupied slots, oldest first (a host read: checkpoints and inspection only)."""
        used = torch.nonzero(self.slot_key[:, 0] >= 0)[:, 0]
        return used[torch.argsort(self.written[used])]

    def state(self) -> dict:
        """Everything needed to rebuild this bank (a checkpoint entry): shape, stored maps and frames,
        and the FIFO order. Only the occupied slots' maps are kept."""
        slots = self._fifo_slots()
        return {
            "capacity": self.capacity,
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "num_volumes": int(self.slot_of.shape[0]),
            "max_slices": int(self.slot_of.shape[1]),
            "dtype": str(self.features.dtype).removeprefix("torch."),
            "keys": self.slot_key[slots].tolist(),
            "features": self.features[slots].cpu(),
            "frames": self.frames[slots].cpu(),
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "SliceFeatureBank":
        """The bank :meth:`state` describes, its slices in the same FIFO order."""
        bank = cls(
            state["capacity"],
            state["channels"],
            state["height"],
            state["width"],
            state["num_volumes"],
            state["max_slices"],
            dtype=getattr(torch, state["dtype"]),
            device=device,
        )
        keys = [tuple(int(x) for x in k) for k in state["keys"]]
        if len(keys) > bank.capacity or len(state["features"]) != len(keys):
            raise ValueError(f"bank state: {len(keys)} keys, {len(state['features'])} maps, capacity {bank.capacity}")
        for slot, key in enumerate(keys):  # slots 0, 1, ... in FIFO order
            bank._check_key(key)
            bank.slot_of[key] = slot
            bank.slot_key[slot] = torch.tensor(key)
            bank.written[slot] = slot
        bank.clock.fill_(len(keys))
        if keys:
            bank.features[: len(keys)] = state["features"].to(bank.features)
            bank.frames[: len(keys)] = state["frames"].to(bank.frames)
        return bank

    def to(self, device: torch.device | str) -> "SliceFeatureBank":
        """Move the stored maps (in place); returns the bank."""
        for name in ("features", "frames", "slot_of", "slot_key", "written", "clock"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def keys(self) -> list[tuple[int, int]]:
        """Stored ``(volume, slice)`` keys, oldest first (a host read)."""
        return [tuple(k) for k in self.slot_key[self._fifo_slots()].tolist()]

    @property
    def bytes_per_slice(self) -> int:
        """Storage of one slice: its feature map and its frame."""
        return (
            self.features[0].numel() * self.features.element_size()
            + self.frames[0].numel() * self.frames.element_size()
        )

    @property
    def nbytes(self) -> int:
        """Storage of the whole bank (preallocated) including the key tables."""
        return (
            self.capacity * self.bytes_per_slice
            + (self.slot_of.numel() + self.slot_key.numel() + self.written.numel()) * 8
        )

    def _check_key(self, key: tuple[int, int]) -> None:
        if not (0 <= key[0] < self.slot_of.shape[0] and 0 <= key[1] < self.slot_of.shape[1]):
            raise ValueError(f"bank key (volume, slice) = {key} outside the key space {tuple(self.slot_of.shape)}")

    @torch.no_grad()
    def push(
        self,
        volume: torch.Tensor,
        slice_index: torch.Tensor,
        features: torch.Tensor,
        frames: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Store ``(B, D, h, w)`` ``features`` of slices ``(volume[b], slice_index[b])`` with their
        ``(B, 2, 3)`` frames (original ``(u, v, 1)`` -> map pixel ``(row, col)``). Samples with a
        non-finite frame, or ``keep`` False, are skipped. A stored slice is overwritten in place and
        becomes the newest; otherwise the oldest slot is reused. Later duplicates in one push win.
        Fixed-size device work (one small step per sample), no host read."""
        if features.shape[1:] != (self.channels, self.height, self.width):
            raise ValueError(
                f"bank stores ({self.channels}, {self.height}, {self.width}) maps, got {tuple(features.shape[1:])}"
            )
        dev = self.features.device
        volume, slice_index = volume.long().to(dev), slice_index.long().to(dev)
        frames = frames.detach().to(dev, self.frames.dtype)
        ok = torch.isfinite(frames).reshape(frames.shape[0], -1).all(1)
        if keep is not None:
            ok = ok & keep.to(dev)
        ok = (
            ok
            & (volume >= 0)
            & (volume < self.slot_of.shape[0])
            & (slice_index >= 0)
            & (slice_index < self.slot_of.shape[1])
        )
        v, s = volume.clamp(0, self.slot_of.shape[0] - 1), slice_index.clamp(0, self.slot_of.shape[1] - 1)
        maps = features.detach().permute(0, 2, 3, 1).to(dev, self.features.dtype)
        for b in range(features.shape[0]):  # 1-element index tensors: advanced indexing, never a host read
            vb, sb, okb = v[b : b + 1], s[b : b + 1], ok[b : b + 1]
            existing = self.slot_of[vb, sb]
            slot = torch.where(existing >= 0, existing, torch.argmin(self.written).reshape(1))
            old = self.slot_key[slot]  # (1, 2): the slot's previous key forgets it (a no-op for the same slice)
            ov, os_ = old[:, 0].clamp_min(0), old[:, 1].clamp_min(0)
            self.slot_of[ov, os_] = torch.where(okb & (old[:, 0] >= 0), -1, self.slot_of[ov, os_])
            self.slot_of[vb, sb] = torch.where(okb, slot, self.slot_of[vb, sb])
            self.slot_key[slot] = torch.where(okb[:, None], torch.stack([vb, sb], 1), old)
            self.written[slot] = torch.where(okb, self.clock.reshape(1), self.written[slot])
            self.features[slot] = torch.where(okb[:, None, None, None], maps[b : b + 1], self.features[slot])
            self.frames[slot] = torch.where(okb[:, None, None], frames[b : b + 1], self.frames[slot])
            self.clock += okb.long().sum()

    def locate(
        self, volume: torch.Tensor, slice_index: torch.Tensor, uv: torch.Tensor, ok: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where original in-plane points ``uv (n, 2)`` of slices ``(volume, slice_index)`` lie in the bank:
        ``(slot (n,), map pixel (n, 2), found (n,))``; ``found`` where ``ok``, the slice is stored and the
        point lies inside its map. Cheap (no feature is read); every point, masked."""
        dev = self.features.device
        vol, sl = volume.reshape(-1).long().to(dev), slice_index.reshape(-1).long().to(dev)
        slot = self.slot_of[vol.clamp(0, self.slot_of.shape[0] - 1), sl.clamp(0, self.slot_of.shape[1] - 1)]
        found = ok.reshape(-1).to(dev) & (slot >= 0)
        frame = self.frames[slot.clamp_min(0)]  # (n, 2, 3)
        p = uv.reshape(-1, 2).to(dev, torch.float64)
        rc = (frame[..., :2] @ p[..., None])[..., 0] + frame[..., 2]  # (n, 2) map pixel coordinates
        inside = torch.isfinite(rc).all(1)
        rc = torch.nan_to_num(rc, nan=-10.0, posinf=-10.0, neginf=-10.0)
        inside &= (
            (rc[:, 0] >= -0.5) & (rc[:, 0] <= self.height - 0.5) & (rc[:, 1] >= -0.5) & (rc[:, 1] <= self.width - 0.5)
        )
        return slot.clamp_min(0), rc, found & inside

    def sample(self, slot: torch.Tensor, rc: torch.Tensor) -> torch.Tensor:
        """Bilinear features ``(n, D)`` of stored maps ``slot (n,)`` at map pixels ``rc (n, 2)``."""
        r = rc[:, 0].clamp(0, self.height - 1)
        c = rc[:, 1].clamp(0, self.width - 1)
        r0 = r.floor().long().clamp(max=self.height - 2 if self.height > 1 else 0)
        c0 = c.floor().long().clamp(max=self.width - 2 if self.width > 1 else 0)
        r1, c1 = (r0 + 1).clamp(max=self.height - 1), (c0 + 1).clamp(max=self.width - 1)
        fr, fc = (r - r0).to(self.features.dtype)[:, None], (c - c0).to(self.features.dtype)[:, None]
        f, s = self.features, slot
        return (
            f[s, r0, c0] * (1 - fr) * (1 - fc)
            + f[s, r0, c1] * (1 - fr) * fc
            + f[s, r1, c0] * fr * (1 - fc)
            + f[s, r1, c1] * fr * fc
        )

    def lookup(
        self, volume: torch.Tensor, slice_index: torch.Tensor, uv: torch.Tensor, ok: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear features at original in-plane points ``uv (..., 2)`` of slices ``(volume, slice_index)``.

        Returns ``(features (..., D), found (...))``; ``found`` where ``ok``, the slice is stored and
        the point lies inside the stored map (features there are 0 elsewhere).
        """
        shape = volume.shape
        slot, rc, found = self.locate(volume, slice_index, uv, ok)
        out = torch.where(
            found[:, None], self.sample(slot, rc), torch.zeros((), dtype=self.features.dtype, device=slot.device)
        )
        return out.reshape(*shape, self.channels), found.reshape(shape)


#: Registered look-ups read per anchor, on average, at most (a fixed budget: a labeled volume is a partner of
#: every unlabeled one, so its anchors map to ~all volumes, of which the bank holds a fifth). Points found in the
#: bank beyond the budget are dropped at random: each anchor's positive is then the mean over a random subset of
#: its found partners.
MAX_LOOKUPS_PER_ANCHOR = 8


def registered_positives(
    correspondence: RegisteredCorrespondence,
    bank: SliceFeatureBank,
    volume: torch.Tensor,
    slice_index: torch.Tensor,
    uv: torch.Tensor,
    layers: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    dev = bank.features.device
    if volume.numel() == 0:
        return torch.zeros((0, bank.channels), dtype=bank.features.dtype, device=dev), torch.zeros(
            0, dtype=torch.bool, device=dev
        )
    rows, targets, z, uv_j, ok = correspondence.map_to_partners(volume, slice_index, uv)
    n, v = volume.shape[0], len(correspondence)
    rows = rows.to(dev)
    total = torch.zeros((n, bank.channels), dtype=bank.features.dtype, device=dev)
    count = torch.zeros(n, dtype=torch.long, device=dev)
    budget = min(rows.shape[0], MAX_LOOKUPS_PER_ANCHOR * n)
    for layer in range(int(layers)):
        slot, rc, found = bank.locate(targets + layer * v, z, uv_j, ok)  # one row per (anchor, registered partner)
        # read features only for a fixed number of rows: the found ones first (random order among them)
        pick = torch.topk(found.to(torch.float32) + 0.5 * torch.rand(found.shape, device=dev), budget).indices
        hit = found[pick]
        feats = bank.sample(slot[pick], rc[pick]) * hit[:, None].to(bank.features.dtype)
        total.index_add_(0, rows[pick], feats)
        count.index_add_(0, rows[pick], hit.long())
    mean = total / count.clamp_min(1)[:, None].to(total.dtype)
    return mean, count > 0
