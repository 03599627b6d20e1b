"""Training slices drawn and augmented in batch on the training device (the device data pipeline).

The MONAI pipeline of ``configs/train.yaml`` (``device_sampling: false``) slices, crops, rotates, flips and
resizes every training slice with per-sample transforms in the loader workers. Here the volumes, after the
deterministic transforms (load, orientation, intensity, labels), are kept as one flat buffer per key on the
training device, and each batch is drawn and augmented at once:

* **Slices**: a volume uniformly with replacement (as ``RandomSampler(replacement=True)`` over volumes),
  then a slice uniformly within it (as :class:`scripts.data.slicing.RandSliced`), along the through-plane
  axis (:func:`scripts.data.slicing.resolve_slice_axis`); the in-plane axes stay in increasing order.
* **Augmentation**: the distribution of the MONAI chain ``RandScaleCropd`` (each side an integer in
  ``[ceil(s * n), n]``, the offset uniform), then ``OneOf`` with weights 0.5 / 0.25 / 0.25 of
  (``RandRotate90d`` with k in 1..3 + ``RandAxisFlipd`` over one of the two axes), ``RandRotated`` (an angle
  uniform in +-``max_angle`` about the crop's centre, zero outside the crop) and the identity, then
  ``Resized`` to the patch (``align_corners=False``). The composition is one affine map per slice from
  patch pixel ``(row, col)`` to slice voxel ``(u, v)``, :meth:`SliceAugmentation.draw`.
* **Sampling**: one gather per key from the flat buffers: bilinear for images, the centre-aligned nearest
  rule for labels (as ``nearest-exact``), zero outside the crop. The MONAI chain interpolates twice
  for a rotation (rotate, then resize), this once: the same geometry, slightly less smoothing.
* **REPS**: the same affine maps are the patch-to-slice frames (``slice_frames``), exact, where the MONAI
  pipeline carries coordinate maps through the augmentation and fits them by least squares.

Random draws come from a host ``torch.Generator`` (seeded by the run and the process rank, saved with the
training state): the indices and the small per-slice matrices are made on the host and copied to the
device without waiting, and nothing is read back from the device. CPU and GPU run this same code. Volumes
larger than ``max_device_gib`` in all stay in host memory (pinned on CUDA): the gathers then run on the
host and the patches are copied to the device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from monai.data import MetaTensor

from scripts.data.semi_supervised_data import REGISTERED_LABEL, REGISTERED_VALID, REGISTERED_WEIGHT
from scripts.data.slicing import resolve_slice_axis
from scripts.user_errors import BundleInputError

logger = logging.getLogger(__name__)

__all__ = ["SliceStack", "SliceAugmentation", "sample_patches", "DeviceSliceLoader"]

#: Keys sampled with the nearest rule (stored as uint8 class indices).
LABEL_KEYS = ("label", REGISTERED_LABEL)


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class SliceStack:
    """Every slice of a list of volumes, one flat buffer per key, with the slices' extents and origins.

    Args:
        items: dicts of channel-first 3D volumes ``(C, X, Y, Z)`` (MetaTensors: their affine picks the slice
            axis) with ``"id"``; a label key missing from an item is a blank label (its ``valid`` is 0).
        keys: the keys to keep; ``"image"`` first. Labels (``LABEL_KEYS``) are stored as uint8.
        slice_axis: 0, 1, 2 or ``"auto"`` (the axis of largest spacing).
        device: where the buffers live.

    Attributes (host tensors): ``start`` (slices,) pixel offset of each slice in the buffers, ``height`` /
    ``width`` (slices,), ``volume`` / ``index`` (slices,) its volume and slice index, ``first`` / ``depth``
    (volumes,) each volume's first slice and number of slices, ``valid`` / ``weight`` (volumes,) the
    registered label's flag and RSL weight; ``ids`` the volume ids; ``buffers`` ``{key: (C, pixels)}``.
    """

    def __init__(self, items: Sequence[dict], keys: Sequence[str], slice_axis="auto", device="cpu") -> None:
        if not items:
            raise ValueError("SliceStack: no volumes")
        self.keys = [k for k in keys if k == "image" or any(k in item for item in items)]
        self.ids: list[str] = []
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}
        starts, heights, widths, volumes, indices, firsts, depths, valid, weight = ([] for _ in range(9))
        offset = n_slices = 0
        for v, item in enumerate(items):
            name = str(item.get("id", v))
            image = item["image"]
            affine = image.affine if isinstance(image, MetaTensor) else torch.eye(4)
            if image.ndim != 4:
                raise BundleInputError(
                    f"volume {name!r}: expected a channel-first 3D image, got shape {tuple(image.shape)}"
                )
            axis = resolve_slice_axis(slice_axis, affine)
            stacked = _plain(image).movedim(axis + 1, 0).float()  # (S, C, H, W): in-plane axes in increasing order
            s, _, h, w = stacked.shape
            for key in self.keys:
                if key == "image":
                    vol = stacked
                elif item.get(key) is None:
                    vol = torch.zeros((s, 1, h, w), dtype=torch.uint8)
                else:
                    raw = _plain(item[key])
                    if tuple(raw.shape[1:]) != tuple(image.shape[1:]):
                        raise BundleInputError(
                            f"volume {name!r}: {key} has shape {tuple(raw.shape[1:])}, the image {tuple(image.shape[1:])}"
                            " (they must share the voxel grid)"
                        )
                    vol = raw.movedim(axis + 1, 0).round().clamp(0, 255).to(torch.uint8)
                # (C, S * H * W): slice j of this volume starts at offset + j * H * W
                parts[key].append(vol.permute(1, 0, 2, 3).reshape(vol.shape[1], -1))
            starts.append(offset + torch.arange(s, dtype=torch.int64) * (h * w))
            heights.append(torch.full((s,), h, dtype=torch.int64))
            widths.append(torch.full((s,), w, dtype=torch.int64))
            volumes.append(torch.full((s,), v, dtype=torch.int64))
            indices.append(torch.arange(s, dtype=torch.int64))
            firsts.append(n_slices)
            depths.append(s)
            valid.append(1.0 if item.get(REGISTERED_LABEL) is not None else 0.0)
            weight.append(float(item.get(REGISTERED_WEIGHT, 1.0)))
            self.ids.append(name)
            offset += s * h * w
            n_slices += s
        self.start, self.height, self.width = torch.cat(starts), torch.cat(heights), torch.cat(widths)
        self.volume, self.index = torch.cat(volumes), torch.cat(indices)
        self.first, self.depth = torch.tensor(firsts), torch.tensor(depths)
        self.valid, self.weight = torch.tensor(valid), torch.tensor(weight)
        self.buffers = {key: torch.cat(chunks, dim=1) for key, chunks in parts.items()}
        self.to(device)

    def to(self, device, pin: bool = False) -> SliceStack:
        """Move the buffers (``pin``: keep them in page-locked host memory, for copies to a GPU)."""
        self.device = torch.device(device)
        self.buffers = {k: (b.pin_memory() if pin else b.to(self.device)) for k, b in self.buffers.items()}
        return self

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SliceAugmentation:
    """The augmentation distribution of ``configs/train.yaml``'s MONAI chain, as one affine map per slice.

    Args:
        patch_size: ``(P_h, P_w)`` of the network input.
        crop_min_scale: the smallest crop side as a fraction of the slice's (``None``: no crop).
        flips: the rot90 branch also flips one axis (``flip_augmentation``).
        weights: of the rot90(+flip), rotation and identity branches.
        max_angle: the rotation branch's angle range, radians (+-).
    """

    patch_size: Sequence[int] = (128, 128)
    crop_min_scale: float | None = 0.8
    flips: bool = True
    weights: Sequence[float] = (0.5, 0.25, 0.25)
    max_angle: float = 0.3490658503988659

    def draw(self, height: torch.Tensor, width: torch.Tensor, generator: torch.Generator):
        """Affine maps for slices of ``height`` x ``width`` (host int64 tensors ``(B,)``).

        Returns ``(frames (B, 2, 3) float64, crop (B, 4) float64)``: ``frames @ (row, col, 1)`` is the slice voxel
        ``(u, v)`` a patch pixel samples; ``crop`` is ``(u0, v0, h_c, w_c)``, the crop outside which a patch is zero.
        """
        b = height.shape[0]
        h, w = height.double(), width.double()

        def uniform(n: int = b) -> torch.Tensor:
            return torch.rand(n, generator=generator, dtype=torch.float64)

        if self.crop_min_scale is None:
            hc, wc, u0, v0 = h, w, torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
        else:
            lo_h = torch.ceil(float(self.crop_min_scale) * h)
            lo_w = torch.ceil(float(self.crop_min_scale) * w)
            hc = lo_h + torch.floor(uniform() * (h - lo_h + 1))
            wc = lo_w + torch.floor(uniform() * (w - lo_w + 1))
            u0 = torch.floor(uniform() * (h - hc + 1))
            v0 = torch.floor(uniform() * (w - wc + 1))
        weights = torch.tensor([float(x) for x in self.weights], dtype=torch.float64)
        branch = torch.multinomial(weights, b, replacement=True, generator=generator)  # 0 rot90, 1 rotate, 2 none
        k = 1 + torch.floor(uniform() * 3).long()  # rot90 turns
        flip_axis = torch.floor(uniform() * 2).long()
        angle = (2 * uniform() - 1) * float(self.max_angle)
        rot90 = branch == 0
        odd = rot90 & (k % 2 == 1)
        h2, w2 = torch.where(odd, wc, hc), torch.where(odd, hc, wc)  # the augmented crop, before the resize
        ph, pw = (float(p) for p in self.patch_size)
        # patch pixel -> augmented crop (Resized, align_corners=False)
        resize = _affine(b, [[h2 / ph, 0, 0.5 * h2 / ph - 0.5], [0, w2 / pw, 0.5 * w2 / pw - 0.5]])
        # augmented crop -> crop: undo the flip, then the k quarter turns (torch.rot90: out[i, j] = in[j, W - 1 - i])
        eye = _affine(b, [[1, 0, 0], [0, 1, 0]])
        flip = torch.where(
            (rot90 & self.flips & (flip_axis == 0))[:, None, None],
            _affine(b, [[-1, 0, h2 - 1], [0, 1, 0]]),
            torch.where(
                (rot90 & self.flips & (flip_axis == 1))[:, None, None], _affine(b, [[1, 0, 0], [0, -1, w2 - 1]]), eye
            ),
        )
        turn = eye.clone()
        size_h, size_w = h2.clone(), w2.clone()  # the image the next undone turn maps from
        for step in range(3):
            active = rot90 & (k > step)
            # source (of the image before this turn, size (size_w, size_h)) of pixel (i, j): (j, size_h - 1 - i)
            undo = _affine(b, [[0, 1, 0], [-1, 0, size_h - 1]])
            turn = torch.where(active[:, None, None], undo @ turn, turn)
            size_h, size_w = torch.where(active, size_w, size_h), torch.where(active, size_h, size_w)
        cos, sin = torch.cos(angle), torch.sin(angle)
        ch, cw = (hc - 1) / 2, (wc - 1) / 2
        rotate = _affine(b, [[cos, -sin, ch - cos * ch + sin * cw], [sin, cos, cw - sin * ch - cos * cw]])
        aug = torch.where(rot90[:, None, None], turn @ flip, torch.where((branch == 1)[:, None, None], rotate, eye))
        shift = _affine(b, [[1, 0, u0], [0, 1, v0]])
        frames = (shift @ aug @ resize)[:, :2]
        return frames, torch.stack([u0, v0, hc, wc], dim=1)


def _affine(b: int, rows: list[list]) -> torch.Tensor:
    """``(B, 3, 3)`` float64 matrices from two rows of scalars or ``(B,)`` tensors (last row ``0 0 1``)."""
    out = torch.zeros(b, 3, 3, dtype=torch.float64)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            out[:, i, j] = value
    out[:, 2, 2] = 1.0
    return out


def sample_patches(
    buffer: torch.Tensor,
    start: torch.Tensor,
    width: torch.Tensor,
    frames: torch.Tensor,
    crop: torch.Tensor,
    patch_size: Sequence[int],
    mode: str,
) -> torch.Tensor:
    """Patches ``(B, C, P_h, P_w)`` from a flat ``(C, pixels)`` buffer, on the buffer's device.

    ``start`` / ``width`` ``(B,)``: the slices' offsets and widths; ``frames`` ``(B, 2, 3)``; ``crop`` ``(B, 4)``
    (:meth:`SliceAugmentation.draw`), all on the buffer's device. ``mode``: ``"bilinear"`` (float32 out) or
    ``"nearest"`` (the centre-aligned rule; float32 class indices out). Pixels outside the crop (a rotated crop's
    corners) are 0; within half a pixel of its border the edge value is used (as a resize does).
    """
    dev = buffer.device
    ph, pw = (int(p) for p in patch_size)
    frames, crop = frames.float(), crop.float()
    r = torch.arange(ph, device=dev, dtype=torch.float32).view(1, ph, 1)
    c = torch.arange(pw, device=dev, dtype=torch.float32).view(1, 1, pw)
    f = frames[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    u = f[:, 0, 0] * r + f[:, 0, 1] * c + f[:, 0, 2]  # (B, P_h, P_w)
    v = f[:, 1, 0] * r + f[:, 1, 1] * c + f[:, 1, 2]
    u0, v0, hc, wc = (crop[:, i, None, None] for i in range(4))
    u_hi, v_hi = u0 + hc - 1, v0 + wc - 1
    inside = (u >= u0 - 0.5) & (u <= u_hi + 0.5) & (v >= v0 - 0.5) & (v <= v_hi + 0.5)
    u = torch.minimum(torch.maximum(u, u0), u_hi)
    v = torch.minimum(torch.maximum(v, v0), v_hi)
    base = start[:, None, None]
    row = width[:, None, None]
    channels = buffer.shape[0]

    def gather(ui: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        idx = base + ui.long() * row + vi.long()
        return buffer.index_select(1, idx.reshape(-1)).reshape(channels, *idx.shape).float()

    if mode == "nearest":
        out = gather(torch.floor(u + 0.5).clamp(max=u_hi), torch.floor(v + 0.5).clamp(max=v_hi))
    elif mode == "bilinear":
        uf, vf = torch.floor(u), torch.floor(v)
        du, dv = u - uf, v - vf
        u1, v1 = torch.minimum(uf + 1, u_hi), torch.minimum(vf + 1, v_hi)
        out = (
            gather(uf, vf) * ((1 - du) * (1 - dv))
            + gather(uf, v1) * ((1 - du) * dv)
            + gather(u1, vf) * (du * (1 - dv))
            + gather(u1, v1) * (du * dv)
        )
    else:
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return (out * inside.to(out.dtype)).permute(1, 0, 2, 3).contiguous()


class DeviceSliceLoader:
    """Batches of augmented slices drawn on the device: the semi-supervised loader of ``device_sampling``.

    Args:
        labeled: a dataset of labeled volumes (the deterministic transforms only; ``"image"``, ``"label"``).
        unlabeled: a dataset of unlabeled volumes (``"image"``, optional ``"registered_label"`` and its weight),
            or ``None``: batches of labeled slices only, ``{"image", "label"}`` (the supervised trainers).
        epoch_length: batches per pass (one validation interval).
        labeled_batch_size, unlabeled_batch_size: the halves' sizes.
        augmentation: the :class:`SliceAugmentation`.
        device: the training device.
        slice_axis: as :class:`scripts.data.slicing.RandSliced`.
        seed: of the host generator (the process rank is added).
        max_device_gib: volumes larger than this in all stay in host memory.
        num_workers: threads that read the volumes when the first batch is drawn.

    Yields ``{"labeled": {...}, "unlabeled": {...}, "slice_frames": (L + U, 2, 3)}`` with per half ``image``
    ``(n, C, P_h, P_w)``, ``label`` / ``registered_label`` ``(n, 1, P_h, P_w)`` (float class indices),
    ``registered_label_valid`` / ``registered_label_weight`` ``(n,)``, ``id`` (host strings) and ``slice_index``.
    """

    def __init__(
        self,
        labeled,
        unlabeled,
        epoch_length: int,
        labeled_batch_size: int,
        unlabeled_batch_size: int = 0,
        augmentation: SliceAugmentation | None = None,
        device="cpu",
        slice_axis="auto",
        seed: int = 0,
        max_device_gib: float = 4.0,
        num_workers: int = 1,
    ) -> None:
        if int(epoch_length) < 1:
            raise ValueError(f"DeviceSliceLoader: epoch_length must be >= 1, got {epoch_length!r}")
        self.labeled, self.unlabeled = labeled, unlabeled
        self.epoch_length = int(epoch_length)
        self.sizes = (int(labeled_batch_size), int(unlabeled_batch_size))
        self.augmentation = SliceAugmentation() if augmentation is None else augmentation
        self.device = torch.device(device)
        self.slice_axis = slice_axis
        self.max_device_gib = float(max_device_gib)
        self.num_workers = max(1, int(num_workers))
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        self.generator = torch.Generator().manual_seed(int(seed) + 1000003 * rank)
        self.stacks: tuple[SliceStack, SliceStack | None] | None = None

    def __len__(self) -> int:
        return self.epoch_length

    # ------------------------------------------------------------------ the volumes
    def _items(self, dataset) -> list[dict]:
        len(dataset)  # a deferred dataset builds its entries here (scripts.data.deferred_dataset)
        with ThreadPoolExecutor(self.num_workers) as pool:
            return list(pool.map(dataset.__getitem__, range(len(dataset))))

    def build(self) -> tuple[SliceStack, SliceStack | None]:
        """Read the volumes and place the stacks (once; on the device unless they exceed ``max_device_gib``)."""
        if self.stacks is not None:
            return self.stacks
        halves = [(self.labeled, ("image", "label"))]
        if self.unlabeled is not None:
            halves.append((self.unlabeled, ("image", REGISTERED_LABEL)))
        stacks = [SliceStack(self._items(ds), keys, self.slice_axis, "cpu") for ds, keys in halves]
        gib = sum(s.nbytes for s in stacks) / 2**30
        if gib <= self.max_device_gib:
            stacks = [s.to(self.device) for s in stacks]
        elif self.device.type == "cuda":  # too large for the device: gathered on the host, copied without waiting
            stacks = [s.to("cpu", pin=True) for s in stacks]
        logger.info(
            "training slices drawn on %s: %s volumes, %.2f GiB kept on %s",
            self.device,
            " + ".join(str(len(s)) for s in stacks),
            gib,
            stacks[0].device,
        )
        self.stacks = (stacks[0], stacks[1] if len(stacks) > 1 else None)
        return self.stacks

    # ------------------------------------------------------------------ the batches
    def _half(self, stack: SliceStack, n: int) -> tuple[dict, torch.Tensor]:
        g = self.generator
        vol = torch.randint(len(stack), (n,), generator=g)
        within = torch.floor(torch.rand(n, generator=g, dtype=torch.float64) * stack.depth[vol]).long()
        sl = stack.first[vol] + within
        frames, crop = self.augmentation.draw(stack.height[sl], stack.width[sl], g)
        dev, store = self.device, stack.device
        start, width = _to(stack.start[sl], store), _to(stack.width[sl], store)
        frames_s, crop_s = _to(frames.float(), store), _to(crop.float(), store)
        out: dict = {}
        for key, buf in stack.buffers.items():
            mode = "nearest" if key in LABEL_KEYS else "bilinear"
            patch = sample_patches(buf, start, width, frames_s, crop_s, self.augmentation.patch_size, mode)
            out[key] = _to(patch, dev)
        if REGISTERED_LABEL in stack.buffers:
            out[REGISTERED_VALID] = _to(stack.valid[vol].float(), dev)
            out[REGISTERED_WEIGHT] = _to(stack.weight[vol].float(), dev)
        out["id"] = [stack.ids[i] for i in vol.tolist()]  # host tensors: no device read
        out["slice_index"] = within
        return out, frames

    def __iter__(self) -> Iterator[dict]:
        labeled, unlabeled = self.build()
        for _ in range(self.epoch_length):
            first, frames_l = self._half(labeled, self.sizes[0])
            if unlabeled is None:
                yield first
                continue
            second, frames_u = self._half(unlabeled, self.sizes[1])
            frames = _to(torch.cat([frames_l, frames_u]), self.device)
            yield {"labeled": first, "unlabeled": second, "slice_frames": frames}

    # ------------------------------------------------------------------ resumable draws
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait: a host tensor bound for a GPU goes through pinned memory."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
