"""Best registration selection (BRS): which labeled partner q registers best to volume j.

For target j (unlabeled, validation, ...) and labeled q the round trip ``R = T_qj o T_jq`` maps
points of j to q and back; a perfect, consistent pair gives the identity.  The score is

    S(j, q) = w_rmse * RMSE(R) - w_mi * MI(v_j, v_j o R) / MI(v_j, v_j)        (lower is better)

* RMSE: root-mean-square round-trip displacement (mm) over all voxel centres of j. For affine
  transforms it has a closed form from the voxel grid's mean and covariance (O(1) per pair); with a
  displacement field it is estimated on sampled voxels.
* MI: mutual information of j with j resampled through the round trip, normalised by its self
  information (1 for a perfect round trip), on j shrunk in-plane to ``spacing`` mm (at most
  20 000 voxels, a fixed random subset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss

from .geometry import affine_rmse, apply_affine, grid_moments
from .similarity import masked_mutual_information
from .store import TransformTable
from .volumes import Volume, VolumeCache


@dataclass
class BRSScore:
    """Score of one (target, partner) pair; ``score`` is ``inf`` when a transform is missing."""

    target: str
    partner: str
    score: float
    rmse: float
    mi: float


def round_trip_points(t_jq, t_qj, points: np.ndarray) -> np.ndarray:
    """``T_qj(T_jq(x))`` for world points of j."""
    return t_qj.map_points(t_jq.map_points(points))


def round_trip_rmse(t_jq, t_qj, volume: Volume, num_points: int = 4096, seed: int = 0) -> float:
    """RMS round-trip displacement (mm) over the voxel centres of ``volume`` (closed form if affine)."""
    if t_jq.is_affine and t_qj.is_affine:
        mean, cov = grid_moments(volume.shape, volume.affine)
        return float(affine_rmse(t_qj.matrix @ t_jq.matrix, mean, cov))
    rng = np.random.default_rng(seed)
    idx = rng.random((num_points, 3)) * (np.asarray(volume.shape) - 1)
    pts = apply_affine(volume.affine, idx)
    return float(np.sqrt(np.mean(np.sum((round_trip_points(t_jq, t_qj, pts) - pts) ** 2, axis=1))))


def round_trip_mi(
    t_jq, t_qj, volume: Volume, parzen: GlobalMutualInformationLoss, max_points: int = 20000, seed: int = 0
) -> float:
    """MI of ``volume`` with itself resampled through the round trip, over MI with itself.

    Evaluated on at most ``max_points`` voxel centres (a fixed random subset for a given seed).
    """
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), -1).reshape(-1, 3)
    if idx.shape[0] > max_points:
        idx = idx[np.random.default_rng(seed).choice(idx.shape[0], max_points, replace=False)]
    flat = np.ravel_multi_index(tuple(idx.T), volume.shape)
    pts = apply_affine(volume.affine, idx.astype(np.float64))
    back = apply_affine(np.linalg.inv(volume.affine), round_trip_points(t_jq, t_qj, pts))
    shape = torch.tensor(volume.shape, dtype=torch.float64)
    vox = torch.as_tensor(back)
    grid = (2 * vox / (shape - 1).clamp(min=1) - 1).flip(-1).reshape(1, 1, 1, -1, 3).float()
    img = torch.as_tensor(volume.array, dtype=torch.float32)[None, None]
    warped = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True).reshape(1, -1)
    fixed = img.reshape(1, -1)[:, torch.as_tensor(flat)]
    valid = ((vox >= -1e-3) & (vox <= shape - 1 + 1e-3)).all(-1)[None]
    mi = masked_mutual_information(parzen, fixed, warped, valid)
    self_mi = masked_mutual_information(parzen, fixed, fixed, torch.ones_like(valid))
    return float(mi / self_mi.clamp(min=1e-8))


class BestRegistrationSelector:
    """Scores and ranks labeled partners for target volumes from a :class:`TransformTable`.

    Args:
        w_rmse: weight of the round-trip RMSE (per mm).
        w_mi: weight of the normalised round-trip MI.
        spacing: in-plane spacing (mm) at which the MI term is computed.
        num_bins: Parzen histogram bins of the MI term.
    """

    def __init__(self, w_rmse: float = 0.1, w_mi: float = 1.0, spacing: float = 3.0, num_bins: int = 24) -> None:
        self.w_rmse, self.w_mi, self.spacing = float(w_rmse), float(w_mi), float(spacing)
        self.parzen = GlobalMutualInformationLoss(num_bins=int(num_bins), reduction="none")
        self.cache = VolumeCache(8)

    def score(self, table: TransformTable, target_id: str, target_path: str, partner_id: str) -> BRSScore:
        """Score one (target j, partner q) pair; ``inf`` if ``T_jq`` or ``T_qj`` is missing/failed."""
        t_jq, t_qj = table.get(target_id, partner_id), table.get(partner_id, target_id)
        if t_jq is None or t_qj is None:
            return BRSScore(target_id, partner_id, math.inf, math.nan, math.nan)
        vol = self.cache.get(target_path, self.spacing)
        rmse = round_trip_rmse(t_jq, t_qj, vol)
        mi = round_trip_mi(t_jq, t_qj, vol, self.parzen) if self.w_mi != 0 else math.nan
        score = self.w_rmse * rmse - (self.w_mi * mi if self.w_mi != 0 else 0.0)
        return BRSScore(target_id, partner_id, float(score), rmse, mi)

    def rank(self, table: TransformTable, target_id: str, target_path: str, partners: list[str]) -> list[BRSScore]:
        """All partners of one target, best (lowest score) first; missing pairs last."""
        scores = [self.score(table, target_id, target_path, q) for q in partners]
        return sorted(scores, key=lambda s: (s.score, partners.index(s.partner)))


def usable(ranked: list[BRSScore], k: int | None = None) -> list[BRSScore]:
    """The partners of a ranking whose pair registered both ways (finite score), best first; the first ``k``."""
    finite = [s for s in ranked if math.isfinite(s.score)]
    return finite if k is None else finite[:k]
