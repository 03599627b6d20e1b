"""SimpleITK reference engine: affine with Mattes mutual information, optionally then B-spline.

Pitfalls handled here (see the issue):

* the pyramid is built in-plane only, with ``sitk.BinShrink`` (exact geometry; ``sitk.Shrink``
  with even factors shifts by half a voxel, and ``SetShrinkFactorsPerLevel`` would also shrink the
  10-slice axis), one ``ImageRegistrationMethod`` run per level continuing the same transform;
* affine uses regular step gradient descent with physical-shift scales (LBFGSB ignores scales);
  LBFGSB is used only for the B-spline stage, whose parameters share one scale.

The result maps fixed (i) physical points to moving (j) points, exported as a
:class:`~scripts.registration.transform.PairTransform` (RAS).  A B-spline result is sampled to a
dense displacement field on a coarse grid so that it has the bundle's single representation.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from .engine import INPUT_ERROR, PairResult, PairSpec
from .geometry import sitk_image_affine, sitk_image_from_array, sitk_to_affine, slice_axis, spacing_of
from .transform import PairTransform
from .volumes import Volume, VolumeCache


def to_sitk_image(vol: Volume) -> sitk.Image:
    """Float32 SimpleITK image with the volume's geometry."""
    return sitk.Cast(sitk_image_from_array(vol.array, vol.affine), sitk.sitkFloat32)


def in_plane_shrink(image: sitk.Image, target_spacing: float) -> sitk.Image:
    """``BinShrink`` the two in-plane axes to about ``target_spacing`` mm; slices untouched."""
    affine = sitk_image_affine(image)
    ax = slice_axis(affine)
    sp = spacing_of(affine)
    factors = [1 if a == ax else max(1, int(round(target_spacing / sp[a]))) for a in range(3)]
    return sitk.BinShrink(image, factors) if factors != [1, 1, 1] else image


def central_mask(image: sitk.Image, fraction: float) -> sitk.Image | None:
    """Binary mask of the central ``fraction`` of each in-plane axis (``None`` when fraction >= 1)."""
    if fraction >= 1.0:
        return None
    ax = slice_axis(sitk_image_affine(image))
    size = image.GetSize()
    arr = np.zeros(size[::-1], dtype=np.uint8)  # (k, j, i)
    sl = []
    for a in (2, 1, 0):
        n = size[a]
        if a == ax:
            sl.append(slice(0, n))
        else:
            half = max(1, int(round(n * fraction / 2)))
            sl.append(slice(max(0, n // 2 - half), min(n, n // 2 + half)))
    arr[tuple(sl)] = 1
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(image)
    return mask


class SitkRegistrationEngine:
    """Pairwise SimpleITK registration (one pair at a time; ``threads`` ITK threads).

    Args:
        levels / iterations: in-plane pyramid spacings (mm, coarse to fine) and iterations per level.
        sampling: fraction of voxels randomly sampled by the metric.
        num_bins: Mattes histogram bins.
        learning_rate / min_step: regular step gradient descent settings.
        init: ``"geometry"`` or ``"moments"`` (``CenteredTransformInitializer``).
        roi_fraction: metric restricted to the central fraction of the fixed in-plane extent.
        bspline: add a B-spline stage (mesh of ``bspline_spacing`` mm, LBFGSB, ``bspline_iterations``,
            at most ``bspline_evaluations`` metric evaluations: ITK's default, 2,000, let one small CT
            pair run for minutes).
        bspline_metric: ``"mattes"`` (mutual information, any modality pair) or ``"meansquares"``
            (same modality and calibrated intensities, e.g. CT in HU: the Synapse overlay's choice;
            about 25x faster per pair than Mattes, whose per-bin parameter derivatives grow with the
            thousands of B-spline parameters; same propagated-label Dice on the CT phantom,
            benchmarks/results/ct_registration.md).
        field_spacing: grid spacing (mm) at which a B-spline result is sampled for export.
        max_log_det: a result whose |log det| of the linear part exceeds this is recorded as diverged
            (nominal-spacing data such as the ACDC copy needs real scale changes).
        threads: ITK threads per registration.
    """

    name = "sitk"

    def __init__(
        self,
        levels: tuple[float, ...] = (6.0, 3.0),
        iterations: tuple[int, ...] = (100, 60),
        sampling: float = 0.2,
        num_bins: int = 32,
        learning_rate: float = 2.0,
        min_step: float = 1e-3,
        init: str = "geometry",
        roi_fraction: float = 1.0,
        bspline: bool = False,
        bspline_spacing: float = 40.0,
        bspline_iterations: int = 50,
        bspline_evaluations: int = 200,
        bspline_metric: str = "mattes",
        field_spacing: tuple[float, float, float] = (8.0, 8.0, 8.0),
        max_log_det: float = 2.0,
        threads: int = 1,
        seed: int = 0,
        cache_size: int = 4,
    ) -> None:
        if len(levels) != len(iterations) or not levels:
            raise ValueError(f"levels {levels} and iterations {iterations} must be non-empty and of equal length")
        if init not in ("geometry", "moments"):
            raise ValueError(f"init must be 'geometry' or 'moments', got {init!r}")
        self.levels = tuple(float(x) for x in levels)
        self.iterations = tuple(int(x) for x in iterations)
        self.sampling, self.num_bins = float(sampling), int(num_bins)
        self.learning_rate, self.min_step, self.init = float(learning_rate), float(min_step), init
        self.roi_fraction = float(roi_fraction)
        self.bspline, self.bspline_spacing, self.bspline_iterations = (
            bool(bspline),
            float(bspline_spacing),
            int(bspline_iterations),
        )
        if bspline_metric not in ("mattes", "meansquares"):
            raise ValueError(f"bspline_metric must be 'mattes' or 'meansquares', got {bspline_metric!r}")
        self.bspline_evaluations, self.bspline_metric = int(bspline_evaluations), bspline_metric
        self.field_spacing = tuple(float(s) for s in field_spacing)
        self.threads, self.seed = int(threads), int(seed)
        self.max_log_det = float(max_log_det)
        self.cache = VolumeCache(cache_size, max_full=cache_size)

    def settings(self) -> dict:
        """Everything that changes the result."""
        s = {
            "engine": self.name,
            "levels": list(self.levels),
            "iterations": list(self.iterations),
            "sampling": self.sampling,
            "num_bins": self.num_bins,
            "learning_rate": self.learning_rate,
            "min_step": self.min_step,
            "init": self.init,
            "roi_fraction": self.roi_fraction,
            "bspline": self.bspline,
            "max_log_det": self.max_log_det,
            "seed": self.seed,
        }
        if self.bspline:
            s.update(
                bspline_spacing=self.bspline_spacing,
                bspline_iterations=self.bspline_iterations,
                bspline_evaluations=self.bspline_evaluations,
                bspline_metric=self.bspline_metric,
            )
        return s

    def _method(self, fixed: sitk.Image) -> sitk.ImageRegistrationMethod:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=self.num_bins)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        # ITK reads seed 0 as "seed from the wall clock" (sitkWallClock): shift by one so that every seed,
        # 0 included, gives the same samples on every run
        reg.SetMetricSamplingPercentage(self.sampling, self.seed + 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetNumberOfThreads(self.threads)
        mask = central_mask(fixed, self.roi_fraction)
        if mask is not None:
            reg.SetMetricFixedMask(mask)
        return reg

    def register_pair(self, pair: PairSpec) -> PairResult:
        """Register one pair; failures come back as ``status="failed"`` with the reason."""
        start = time.perf_counter()
        try:
            fixed_full = to_sitk_image(self.cache.full(pair.fixed_path))
            moving_full = to_sitk_image(self.cache.full(pair.moving_path))
        except Exception as exc:  # an unreadable volume: an input error, retried on the next run
            return PairResult(
                pair.fixed_id,
                pair.moving_id,
                None,
                INPUT_ERROR,
                f"load: {type(exc).__name__}: {exc}"[:500],
                float("nan"),
                time.perf_counter() - start,
            )
        try:
            mode = (
                sitk.CenteredTransformInitializerFilter.MOMENTS
                if self.init == "moments"
                else sitk.CenteredTransformInitializerFilter.GEOMETRY
            )
            affine = sitk.AffineTransform(
                sitk.CenteredTransformInitializer(fixed_full, moving_full, sitk.AffineTransform(3), mode)
            )
            metric = float("nan")
            for spacing, iters in zip(self.levels, self.iterations):
                fixed = in_plane_shrink(fixed_full, spacing)
                moving = in_plane_shrink(moving_full, spacing)
                reg = self._method(fixed)
                reg.SetOptimizerAsRegularStepGradientDescent(
                    learningRate=self.learning_rate,
                    minStep=self.min_step,
                    numberOfIterations=iters,
                    relaxationFactor=0.5,
                    gradientMagnitudeTolerance=1e-8,
                )
                reg.SetOptimizerScalesFromPhysicalShift()
                reg.SetInitialTransform(affine, inPlace=True)
                reg.Execute(fixed, moving)
                metric = -float(reg.GetMetricValue())
            matrix = sitk_to_affine(affine)
            transform = PairTransform(matrix)
            if self.bspline:
                transform, metric = self._bspline(fixed_full, moving_full, affine)
            det = float(np.linalg.det(matrix[:3, :3]))
            if not np.all(np.isfinite(matrix)) or det <= 0 or abs(np.log(det)) > self.max_log_det:
                return PairResult(
                    pair.fixed_id,
                    pair.moving_id,
                    None,
                    "failed",
                    f"diverged: det={det:.3g}",
                    metric,
                    time.perf_counter() - start,
                )
            return PairResult(pair.fixed_id, pair.moving_id, transform, "ok", "", metric, time.perf_counter() - start)
        except Exception as exc:  # recorded, never fatal
            return PairResult(
                pair.fixed_id,
                pair.moving_id,
                None,
                "failed",
                f"{type(exc).__name__}: {exc}".strip()[:500],
                float("nan"),
                time.perf_counter() - start,
            )

    def _bspline(self, fixed_full, moving_full, affine) -> tuple[PairTransform, float]:
        """B-spline stage after the affine; result sampled to a coarse displacement field."""
        fixed = in_plane_shrink(fixed_full, self.levels[-1])
        moving = in_plane_shrink(moving_full, self.levels[-1])
        phys = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
        mesh = [max(1, int(round(p / self.bspline_spacing))) for p in phys]
        bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        reg = self._method(fixed)
        if self.bspline_metric == "meansquares":
            reg.SetMetricAsMeanSquares()
        reg.SetOptimizerAsLBFGSB(
            numberOfIterations=self.bspline_iterations,
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=self.bspline_evaluations,
        )
        reg.SetMovingInitialTransform(affine)
        reg.SetInitialTransform(bs, inPlace=True)
        reg.Execute(fixed, moving)
        metric = -float(reg.GetMetricValue())
        # T(x) = A(x + v(x)) with v(x) = B(x) - x, sampled on a coarse grid over the fixed volume
        affine_ras = sitk_to_affine(affine)
        fa = sitk_image_affine(fixed_full)
        shape = fixed_full.GetSize()
        sp = spacing_of(fa)
        gshape = [max(2, int(np.ceil((n - 1) * s / fs)) + 1) for n, s, fs in zip(shape, sp, self.field_spacing)]
        scale = np.array([(n - 1) / (g - 1) for n, g in zip(shape, gshape)])
        grid_aff = fa.copy()
        grid_aff[:3, :3] = fa[:3, :3] * scale[None, :]
        idx = np.stack(np.meshgrid(*[np.arange(g) for g in gshape], indexing="ij"), -1).reshape(-1, 3)
        world = idx @ grid_aff[:3, :3].T + grid_aff[:3, 3]
        lps = world * np.array([-1, -1, 1])
        moved = np.array([bs.TransformPoint(tuple(p)) for p in lps]) * np.array([-1, -1, 1])
        field = (moved - world).T.reshape(3, *gshape)
        return PairTransform(affine_ras, field, grid_aff), metric

    def register_batch(self, pairs: list[PairSpec]) -> list[PairResult]:
        """Register pairs one after the other."""
        return [self.register_pair(p) for p in pairs]
