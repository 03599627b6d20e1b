"""Batched PyTorch registration: many pairs optimised at once on randomly sampled points.

Per batch of pairs (fixed i, moving j) the engine optimises, in RAS world millimetres,

    T(x) = L (x + v(x) - c_i) + c_i0 + r * t

where ``L`` (3x3) and ``t`` start from an initialisation (volume centres, intensity moments,
optionally several in-plane rotations), ``c_i`` is the fixed volume centre and ``r`` its RMS
radius (so all parameters have comparable scale).  ``v`` is an optional coarse displacement
field (affine first, then the field with a smoothness penalty).  Each iteration samples
``num_points`` voxels of every fixed volume (optionally in a central region of interest), maps
them to the moving volume and evaluates MONAI's Parzen-window mutual information (or a global
NCC) with a validity mask for points that leave the moving volume.  Volumes are shrunk in-plane
(block averaging) to the spacing of each pyramid level; the slice axis is never shrunk.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss

from .engine import INPUT_ERROR, PairResult, PairSpec
from .geometry import grid_moments, slice_axis
from .similarity import masked_mutual_information, masked_ncc
from .transform import PairTransform
from .volumes import Volume, VolumeCache

logger = logging.getLogger(__name__)


def rotation_about(axis: np.ndarray, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about the unit vector ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    th = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(th) * k + (1 - math.cos(th)) * k @ k


def intensity_centroid(vol: Volume, roi_fraction: float = 1.0) -> np.ndarray:
    """World position of the intensity centre of mass (over the central in-plane ROI)."""
    arr = vol.array
    sl = region_slices(vol, roi_fraction)
    sub = arr[sl]
    w = np.clip(sub - np.median(sub), 0, None)
    if w.sum() <= 0:
        w = np.ones_like(sub)
    idx = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij"), -1)
    c = (idx * w[..., None]).reshape(-1, 3).sum(0) / w.sum()
    return vol.affine[:3, :3] @ c + vol.affine[:3, 3]


def region_slices(vol: Volume, roi_fraction: float) -> tuple[slice, slice, slice]:
    """Index ranges of the central ``roi_fraction`` of each in-plane axis (all slices kept)."""
    ax = slice_axis(vol.affine)
    out = []
    for a, n in enumerate(vol.shape):
        if a == ax or roi_fraction >= 1.0:
            out.append(slice(0, n))
        else:
            half = max(1, int(round(n * roi_fraction / 2)))
            lo = max(0, n // 2 - half)
            out.append(slice(lo, min(n, n // 2 + half)))
    return tuple(out)


@dataclass
class _Batch:
    """Padded tensors of one level for a batch of pairs."""

    fixed: torch.Tensor  # (B, 1, I, J, K)
    moving: torch.Tensor  # (B, 1, I, J, K)
    fixed_affine: torch.Tensor  # (B, 4, 4)
    moving_inv: torch.Tensor  # (B, 4, 4)
    fixed_shape: torch.Tensor  # (B, 3)
    moving_shape: torch.Tensor  # (B, 3)
    roi_lo: torch.Tensor  # (B, 3)
    roi_hi: torch.Tensor  # (B, 3)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None``: CUDA when available, else CPU; a CUDA device without a GPU: CPU, with a warning."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logger.warning("registration: device %s requested but CUDA is not available; registering on the CPU", dev)
        return torch.device("cpu")
    return dev


def _pad_stack(arrays: list[np.ndarray]) -> torch.Tensor:
    shape = np.max([a.shape for a in arrays], axis=0)
    out = torch.zeros((len(arrays), 1, *shape.tolist()), dtype=torch.float32)
    for b, a in enumerate(arrays):
        out[b, 0, : a.shape[0], : a.shape[1], : a.shape[2]] = torch.from_numpy(a)
    return out


class TorchRegistrationEngine:
    """Batched affine (+ optional coarse deformable) registration with PyTorch.

    Args:
        levels: in-plane spacings (mm) of the pyramid levels, coarse to fine.
        iterations: Adam iterations per level.
        num_points: sampled fixed voxels per pair and iteration.
        lr: Adam step, in units of the fixed volume's RMS radius (translation) and unitless (matrix).
        metric: ``"mi"`` (Parzen mutual information, MONAI) or ``"ncc"``.
        num_bins: histogram bins for ``"mi"``.
        init: ``"geometry"`` (volume centres), ``"moments"`` (intensity centroids) or ``"identity"``.
        roi_fraction: sample fixed points in this central fraction of each in-plane axis.
        rotations: in-plane start angles (degrees) tried at the coarsest level (multi-start);
            the best-scoring start per pair continues.
        deformable: add a coarse displacement field after the affine stage.
        field_spacing: control-point spacing (mm) of the field, per voxel axis of the fixed volume
            (the slice axis uses ``max`` of the last value and the slice spacing).
        field_iterations, field_lr (mm per step), smoothness: deformable stage settings.
        search_extent, search_step: exhaustive in-plane translation search (mm) before the
            optimisation (``search_extent=0``: off).
        dof: ``"affine"`` (12 parameters) or ``"inplane"`` (2D affine in the fixed slice plane +
            normal scale + 3D translation; see :meth:`_frames`).
        max_log_det: a pair whose |log det L| exceeds this is recorded as diverged.
        min_overlap: a pair with fewer valid points than this fraction is recorded as failed.
        seed: random seed (sampling is deterministic for a given batch).
        cache_size: volumes (all pyramid levels of one file) kept in memory; should exceed the
            number of distinct volumes in a batch.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
            ``"cuda"`` without a GPU falls back to the CPU with a warning. The random point samples
            are drawn on the CPU either way, so both devices optimise the same problem (results
            agree within float tolerance). Not part of :meth:`settings`: the device does not change
            which registration folder a result belongs to.
    """

    name = "torch"

    def __init__(
        self,
        levels: tuple[float, ...] = (6.0, 3.0),
        iterations: tuple[int, ...] = (100, 60),
        num_points: int = 2048,
        lr: float = 0.02,
        metric: str = "mi",
        num_bins: int = 24,
        init: str = "geometry",
        roi_fraction: float = 0.6,
        rotations: tuple[float, ...] = (0.0,),
        deformable: bool = False,
        field_spacing: tuple[float, float, float] = (20.0, 20.0, 20.0),
        field_iterations: int = 60,
        field_lr: float = 0.5,
        smoothness: float = 1.0,
        search_extent: float = 0.0,
        search_step: float = 10.0,
        dof: str = "affine",
        max_log_det: float = 2.0,
        min_overlap: float = 0.1,
        seed: int = 0,
        cache_size: int = 160,
        device: str = "auto",
    ) -> None:
        levels, iterations = tuple(float(x) for x in levels), tuple(int(x) for x in iterations)
        if len(levels) != len(iterations) or not levels:
            raise ValueError(f"levels {levels} and iterations {iterations} must be non-empty and of equal length")
        if metric not in ("mi", "ncc"):
            raise ValueError(f"metric must be 'mi' or 'ncc', got {metric!r}")
        if init not in ("geometry", "moments", "identity"):
            raise ValueError(f"init must be 'geometry', 'moments' or 'identity', got {init!r}")
        if not 0.05 <= float(roi_fraction) <= 1.0:
            raise ValueError(f"roi_fraction must be in [0.05, 1], got {roi_fraction}")
        self.levels, self.iterations = levels, iterations
        self.num_points, self.lr, self.metric, self.num_bins = int(num_points), float(lr), metric, int(num_bins)
        self.init, self.roi_fraction = init, float(roi_fraction)
        self.rotations = tuple(float(r) for r in rotations) or (0.0,)
        self.deformable = bool(deformable)
        self.field_spacing = tuple(float(s) for s in field_spacing)
        self.field_iterations, self.field_lr, self.smoothness = (
            int(field_iterations),
            float(field_lr),
            float(smoothness),
        )
        if dof not in ("affine", "inplane"):
            raise ValueError(f"dof must be 'affine' or 'inplane', got {dof!r}")
        self.dof = dof
        self.search_extent, self.search_step = float(search_extent), max(1e-3, float(search_step))
        self.max_log_det, self.min_overlap, self.seed = float(max_log_det), float(min_overlap), int(seed)
        self.cache = VolumeCache(cache_size, spacings=self.levels)
        self.device = resolve_device(device)
        self._parzen = GlobalMutualInformationLoss(num_bins=self.num_bins, reduction="none").to(self.device)

    def settings(self) -> dict:
        """Everything that changes the result."""
        s = {
            "engine": self.name,
            "levels": list(self.levels),
            "iterations": list(self.iterations),
            "num_points": self.num_points,
            "lr": self.lr,
            "metric": self.metric,
            "num_bins": self.num_bins,
            "init": self.init,
            "roi_fraction": self.roi_fraction,
            "rotations": list(self.rotations),
            "dof": self.dof,
            "search_extent": self.search_extent,
            "search_step": self.search_step,
            "deformable": self.deformable,
            "seed": self.seed,
        }
        if self.deformable:
            s.update(
                field_spacing=list(self.field_spacing),
                field_iterations=self.field_iterations,
                field_lr=self.field_lr,
                smoothness=self.smoothness,
            )
        return s

    # ------------------------------------------------------------------ preparation
    def _level_batch(self, pairs: list[PairSpec], spacing: float) -> _Batch:
        fixed = [self.cache.get(p.fixed_path, spacing) for p in pairs]
        moving = [self.cache.get(p.moving_path, spacing) for p in pairs]
        fshape = torch.tensor([v.shape for v in fixed], dtype=torch.float32)
        lo, hi = [], []
        for v in fixed:
            sl = region_slices(v, self.roi_fraction)
            lo.append([s.start for s in sl])
            hi.append([s.stop for s in sl])
        d = self.device
        return _Batch(
            fixed=_pad_stack([v.array for v in fixed]).to(d),
            moving=_pad_stack([v.array for v in moving]).to(d),
            fixed_affine=torch.tensor(np.stack([v.affine for v in fixed]), dtype=torch.float32, device=d),
            moving_inv=torch.tensor(np.stack([np.linalg.inv(v.affine) for v in moving]), dtype=torch.float32, device=d),
            fixed_shape=fshape.to(d),
            moving_shape=torch.tensor([v.shape for v in moving], dtype=torch.float32, device=d),
            roi_lo=torch.tensor(lo, dtype=torch.float32, device=d),
            roi_hi=torch.tensor(hi, dtype=torch.float32, device=d),
        )

    def _initial(self, pairs: list[PairSpec]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per pair: fixed centre c_i, its RMS radius, start translation target c_j, slice normal."""
        spacing = self.levels[0]
        centres, radii, targets, normals = [], [], [], []
        for p in pairs:
            f = self.cache.get(p.fixed_path, spacing)
            m = self.cache.get(p.moving_path, spacing)
            mean_f, cov_f = grid_moments(f.shape, f.affine)
            mean_m, _ = grid_moments(m.shape, m.affine)
            if self.init == "moments":
                c_f, c_m = intensity_centroid(f, self.roi_fraction), intensity_centroid(m, self.roi_fraction)
            elif self.init == "geometry":
                c_f, c_m = mean_f, mean_m
            else:
                c_f, c_m = mean_f, mean_f
            centres.append(c_f)
            targets.append(c_m)
            radii.append(math.sqrt(max(np.trace(cov_f), 1e-6)))
            ax = slice_axis(f.affine)
            normals.append(f.affine[:3, ax] / np.linalg.norm(f.affine[:3, ax]))
        return np.stack(centres), np.asarray(radii), np.stack(targets), np.stack(normals)

    # ------------------------------------------------------------------ evaluation
    def _sample(self, batch: _Batch, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random fixed voxel indices ``(B, N, 3)`` inside each ROI and their intensities ``(B, N)``."""
        b = batch.fixed.shape[0]
        u = torch.rand((b, self.num_points, 3), generator=gen).to(
            self.device
        )  # drawn on the CPU: same samples on every device
        idx = torch.floor(batch.roi_lo[:, None] + u * (batch.roi_hi - batch.roi_lo)[:, None])
        pad = batch.fixed.shape[2:]
        flat = (idx[..., 0] * pad[1] * pad[2] + idx[..., 1] * pad[2] + idx[..., 2]).long()
        values = torch.gather(batch.fixed.reshape(b, -1), 1, flat)
        return idx, values

    def _similarity(
        self, batch: _Batch, idx, fixed_values, linear, offset, centre, field=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair similarity (higher is better) and valid fraction for transform parameters."""
        a = batch.fixed_affine
        world = idx @ a[:, :3, :3].transpose(1, 2) + a[:, None, :3, 3]
        if field is not None:
            norm = 2 * idx / (batch.fixed_shape[:, None] - 1).clamp(min=1) - 1
            grid = norm.flip(-1)[:, None, None]  # (B, 1, 1, N, 3)
            disp = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
            world = world + disp[:, :, 0, 0].transpose(1, 2)
        moved = (world - centre[:, None]) @ linear.transpose(1, 2) + offset[:, None]
        mi = batch.moving_inv
        vox = moved @ mi[:, :3, :3].transpose(1, 2) + mi[:, None, :3, 3]
        pad = torch.tensor(batch.moving.shape[2:], dtype=vox.dtype, device=vox.device)
        grid = (2 * vox / (pad - 1).clamp(min=1) - 1).flip(-1)[:, None, None]
        values = F.grid_sample(batch.moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        values = values.reshape(vox.shape[0], -1)
        valid = ((vox >= 0) & (vox <= batch.moving_shape[:, None] - 1)).all(-1)
        if self.metric == "mi":
            sim = masked_mutual_information(self._parzen, fixed_values, values, valid)
        else:
            sim = masked_ncc(fixed_values, values, valid)
        return sim, valid.float().mean(1)

    # ------------------------------------------------------------------ optimisation
    def _frames(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair an orthonormal world frame (in-plane u, v, slice normal n) and the update mask.

        ``dof="inplane"`` allows a 2D affine in the slice plane, a scale along the normal and a 3D
        translation, but no in-plane/through-plane coupling (tilts, shears): with ~10 slices 10 mm
        apart those are poorly determined and let whole-image similarity collapse the stack.
        """
        a = batch.fixed_affine[:, :3, :3]
        frames = []
        for b in range(a.shape[0]):
            ax = slice_axis(batch.fixed_affine[b].double().cpu().numpy())
            order = [k for k in range(3) if k != ax] + [ax]
            q, _ = torch.linalg.qr(a[b][:, order].double().cpu())
            frames.append(q.float())
        frame = torch.stack(frames).to(self.device)
        mask = torch.ones(3, 3, device=self.device)
        if self.dof == "inplane":
            mask[:2, 2] = 0
            mask[2, :2] = 0
        return frame, mask

    def _translation_search(self, pairs, linear, offset, centre, gen) -> torch.Tensor:
        """Exhaustive in-plane translation search at the coarsest level (forward passes only).

        Candidates on a grid of step ``search_step`` mm within +-``search_extent`` mm along the
        fixed slice plane; each pair keeps its best-scoring start.
        """
        batch = self._level_batch(pairs, self.levels[0])
        frame, _ = self._frames(batch)
        steps = torch.arange(-self.search_extent, self.search_extent + 1e-6, self.search_step).tolist()
        best_sim = torch.full((len(pairs),), -float("inf"), device=self.device)
        best = offset.clone()
        with torch.no_grad():
            idx, fv = self._sample(batch, gen)
            for du in steps:
                for dv in steps:
                    cand = offset + du * frame[:, :, 0] + dv * frame[:, :, 1]
                    sim, overlap = self._similarity(batch, idx, fv, linear, cand, centre)
                    sim = torch.where(overlap >= 0.5, sim, torch.full_like(sim, -float("inf")))
                    better = sim > best_sim
                    best[better] = cand[better]
                    best_sim = torch.where(better, sim, best_sim)
        return best

    def _optimise_affine(self, pairs, linear, offset, centre, radius, gen, levels: range):
        """Run the affine pyramid ``levels``; returns optimised ``linear`` (B,3,3) and ``offset`` (B,3)."""
        for level in levels:
            spacing, iters = self.levels[level], self.iterations[level]
            batch = self._level_batch(pairs, spacing)
            frame, mask = self._frames(batch)
            d_lin = torch.zeros_like(linear, requires_grad=True)
            d_off = torch.zeros_like(offset, requires_grad=True)
            lr = self.lr / (2**level)
            opt = torch.optim.Adam([d_lin, d_off], lr=lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k, n=iters: 1.0 - 0.9 * k / max(n, 1))
            for _ in range(iters):
                idx, fv = self._sample(batch, gen)
                lin = linear + frame @ (d_lin * mask) @ frame.transpose(1, 2)
                sim, _ = self._similarity(batch, idx, fv, lin, offset + radius[:, None] * d_off, centre)
                opt.zero_grad(set_to_none=True)
                (-sim.sum()).backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                linear = linear + frame @ (d_lin * mask) @ frame.transpose(1, 2)
                offset = offset + radius[:, None] * d_off
        return linear.detach(), offset.detach()

    def _field_grid(self, fixed: list[Volume]) -> tuple[int, int, int]:
        """Control grid shape shared by the batch: enough points for ``field_spacing`` on the largest."""
        shape = []
        for a in range(3):
            extent = max((v.shape[a] - 1) * float(np.linalg.norm(v.affine[:3, a])) for v in fixed)
            n_max = max(v.shape[a] for v in fixed)
            shape.append(int(min(n_max, max(2, math.ceil(extent / self.field_spacing[a]) + 1))))
        return tuple(shape)  # type: ignore[return-value]

    def _optimise_field(self, pairs, linear, offset, centre, gen):
        spacing = self.levels[-1]
        batch = self._level_batch(pairs, spacing)
        fixed = [self.cache.get(p.fixed_path, spacing) for p in pairs]
        gshape = self._field_grid(fixed)
        field = torch.zeros((len(pairs), 3, *gshape), device=self.device, requires_grad=True)
        opt = torch.optim.Adam([field], lr=self.field_lr)
        n_it = self.field_iterations
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - 0.95 * k / max(n_it, 1))
        # control spacing (mm) per pair and axis, for a dimensionless smoothness penalty
        ctrl = torch.tensor(
            [
                [(v.shape[a] - 1) * float(np.linalg.norm(v.affine[:3, a])) / max(gshape[a] - 1, 1) for a in range(3)]
                for v in fixed
            ],
            dtype=torch.float32,
            device=self.device,
        ).clamp(min=1e-3)
        for _ in range(self.field_iterations):
            idx, fv = self._sample(batch, gen)
            sim, _ = self._similarity(batch, idx, fv, linear, offset, centre, field)
            penalty = 0.0
            for a in range(3):
                if gshape[a] > 1:
                    d = torch.diff(field, dim=2 + a) / ctrl[:, a].view(-1, 1, 1, 1, 1)
                    penalty = penalty + (d**2).mean(dim=(1, 2, 3, 4))
            loss = (-sim + self.smoothness * penalty).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        field = field.detach().cpu()
        affines = []
        for b, v in enumerate(fixed):
            scale = np.array([(v.shape[a] - 1) / max(gshape[a] - 1, 1) for a in range(3)])
            fa = v.affine.copy()
            fa[:3, :3] = v.affine[:3, :3] * scale[None, :]
            affines.append(fa)
        return field, affines

    def register_batch(self, pairs: list[PairSpec]) -> list[PairResult]:
        """Register all pairs together; a pair that diverges is returned with ``status="failed"``."""
        if not pairs:
            return []
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed)
        try:
            c_f, radius, c_m, normals = self._initial(pairs)
        except Exception as exc:  # a bad volume: fall back to one-by-one to isolate it
            if len(pairs) == 1:
                return [PairResult(pairs[0].fixed_id, pairs[0].moving_id, None, INPUT_ERROR, f"load: {exc}")]
            return [r for p in pairs for r in self.register_batch([p])]
        n, s = len(pairs), len(self.rotations)
        # multi-start: replicate every pair once per start rotation for the coarsest level
        rots = np.stack([rotation_about(normals[b], ang) for ang in self.rotations for b in range(n)])
        rep = [p for _ in self.rotations for p in pairs]
        tile = lambda x: torch.tensor(np.tile(x, (s,) + (1,) * (x.ndim - 1)), dtype=torch.float32, device=self.device)  # noqa: E731
        linear = torch.tensor(rots, dtype=torch.float32, device=self.device)
        centre, offset, rad = tile(c_f), tile(c_m), tile(radius)
        if self.search_extent > 0:
            offset = self._translation_search(rep, linear, offset, centre, gen)
        if s > 1:
            linear, offset = self._optimise_affine(rep, linear, offset, centre, rad, gen, range(1))
            batch = self._level_batch(rep, self.levels[0])
            with torch.no_grad():
                idx, fv = self._sample(batch, gen)
                sim, _ = self._similarity(batch, idx, fv, linear, offset, centre)
            pick = sim.reshape(s, n).argmax(0) * n + torch.arange(n, device=self.device)
            linear, offset, centre, rad = linear[pick], offset[pick], centre[:n], rad[:n]
            linear, offset = self._optimise_affine(pairs, linear, offset, centre, rad, gen, range(1, len(self.levels)))
        else:
            linear, offset = self._optimise_affine(pairs, linear, offset, centre, rad, gen, range(len(self.levels)))
        field, field_affines = (None, None)
        if self.deformable:
            field, field_affines = self._optimise_field(pairs, linear, offset, centre, gen)
        batch = self._level_batch(pairs, self.levels[-1])
        with torch.no_grad():
            idx, fv = self._sample(batch, gen)
            sim, overlap = self._similarity(batch, idx, fv, linear, offset, centre, field)
        elapsed = (time.perf_counter() - start) / n
        linear, offset, centre, sim, overlap = (t.cpu() for t in (linear, offset, centre, sim, overlap))
        results = []
        for b, p in enumerate(pairs):
            lin = linear[b].double().numpy()
            mat = np.eye(4)
            mat[:3, :3] = lin
            mat[:3, 3] = offset[b].double().numpy() - lin @ centre[b].double().numpy()
            det = float(np.linalg.det(lin))
            status, reason = "ok", ""
            if not np.all(np.isfinite(mat)) or not math.isfinite(float(sim[b])):
                status, reason = "failed", "diverged: non-finite parameters or metric"
            elif det <= 0 or abs(math.log(det)) > self.max_log_det:
                status, reason = "failed", f"diverged: det(L)={det:.3g} outside exp(+-{self.max_log_det})"
            elif float(overlap[b]) < self.min_overlap:
                status, reason = "failed", f"overlap {float(overlap[b]):.2f} below {self.min_overlap}"
            transform = None
            if status == "ok":
                if field is not None:
                    transform = PairTransform(mat, field[b].numpy(), field_affines[b])
                else:
                    transform = PairTransform(mat)
            results.append(PairResult(p.fixed_id, p.moving_id, transform, status, reason, float(sim[b]), elapsed))
        return results
