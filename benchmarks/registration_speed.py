"""Per-pair speed of the registration engines on synthetic ACDC-sized and CT-sized volumes.

Volumes come from ``scripts.registration.synthetic`` (analytic anatomy, oblique grids, a known
transform per pair), so no data is needed.  Times are per pair, single thread, with the volumes
already loaded and prepared (each volume is read once per run and reused by all its pairs; the
one-off read + in-plane shrink time per volume is reported separately).

    python benchmarks/registration_speed.py --size acdc --pairs 16 --out benchmarks/results/speed_acdc.json
    python benchmarks/registration_speed.py --size ct --pairs 4 --engines torch_deformable --out ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from scripts.data.atomic_io import save_nifti, write_json
from scripts.registration.engine import PairSpec, make_engine
from scripts.registration.synthetic import grid_points, known_affine, oblique_affine, render

SIZES = {
    # (shape (i, j, k), spacing mm): ACDC short-axis stack; abdominal CT
    "acdc": ((256, 216, 10), (1.5, 1.5, 10.0)),
    "ct": ((512, 512, 150), (0.8, 0.8, 2.5)),
}
ENGINES = {
    "torch_affine": ("torch", {}),
    "torch_deformable": ("torch", {"deformable": True}),
    "sitk_affine": ("sitk", {}),
}


def make_volume(shape, spacing, angles, centre, t_inv, path) -> None:
    """Render at about 4 mm and upsample (rendering 39 M CT voxels analytically is slow)."""
    coarse = tuple(max(2, int(round(n * s / 4.0))) if s < 4 else n for n, s in zip(shape, spacing))
    coarse_sp = [s * (n - 1) / max(c - 1, 1) for n, s, c in zip(shape, spacing, coarse)]
    a_coarse = oblique_affine(coarse_sp, coarse, angles, centre)
    img, _ = render(coarse, a_coarse, t_inv)
    full = ndimage.zoom(img, [n / c for n, c in zip(shape, coarse)], order=1).astype(np.float32)
    full += np.random.default_rng(0).normal(0, 0.02, full.shape).astype(np.float32)
    save_nifti(full, oblique_affine(spacing, shape, angles, centre), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="acdc")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--engines", default="torch_affine,torch_deformable,sitk_affine")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    shape, spacing = SIZES[args.size]
    work = Path(tempfile.mkdtemp(prefix=f"regspeed_{args.size}_"))
    rng = np.random.default_rng(0)
    fixed = work / "fixed.nii.gz"
    make_volume(shape, spacing, (4, -3, 2), (0, 0, 0), None, fixed)
    pairs, truths = [], []
    n_moving = min(args.pairs, 4)  # a few distinct moving volumes, reused (as in a real run)
    for m in range(n_moving):
        t = known_affine((0, 0, rng.uniform(-8, 8)), tuple(rng.uniform(0.93, 1.07, 3)), tuple(rng.uniform(-6, 6, 3)))
        path = work / f"moving{m}.nii.gz"
        make_volume(shape, spacing, tuple(rng.uniform(-6, 6, 3)), tuple(rng.uniform(-5, 5, 3)), np.linalg.inv(t), path)
        truths.append(t)
    for n in range(args.pairs):
        pairs.append(PairSpec("fixed", str(fixed), f"moving{n % n_moving}", str(work / f"moving{n % n_moving}.nii.gz")))
    a_fixed = oblique_affine(spacing, shape, (4, -3, 2), (0, 0, 0))
    probe = grid_points((8, 8, 6), a_fixed @ np.diag([(shape[0] - 1) / 7, (shape[1] - 1) / 7, (shape[2] - 1) / 5, 1]))
    centre = np.linalg.norm(probe - probe.mean(0), axis=1) < 60  # points near the heart-like centre
    report = {"size": args.size, "shape": shape, "spacing": spacing, "pairs": args.pairs, "threads": args.threads}
    for name in args.engines.split(","):
        kind, settings = ENGINES[name]
        engine = make_engine(kind, **settings)
        t0 = time.perf_counter()
        for p in {p.fixed_path for p in pairs} | {p.moving_path for p in pairs}:  # one-off read + prepare
            if kind == "torch":
                for s in engine.levels:
                    engine.cache.get(p, s)
            else:
                engine.cache.full(p)
        prep = (time.perf_counter() - t0) / (n_moving + 1)
        times, errors = [], []
        for start in range(0, len(pairs), args.batch_size):
            batch = pairs[start : start + args.batch_size]
            t0 = time.perf_counter()
            results = engine.register_batch(batch)
            times += [(time.perf_counter() - t0) / len(batch)] * len(batch)
            for p, r in zip(batch, results):
                t = truths[int(p.moving_id[len("moving") :])]
                if r.ok:
                    est = r.transform.map_points(probe[centre])
                    errors.append(float(np.linalg.norm(est - (probe[centre] @ t[:3, :3].T + t[:3, 3]), axis=1).mean()))
        report[name] = {
            "median_seconds_per_pair": statistics.median(times),
            "read_and_prepare_seconds_per_volume": prep,
            "mean_point_error_mm": float(np.mean(errors)) if errors else None,
            "ok_pairs": len(errors),
            "settings": engine.settings(),
        }
        print(name, json.dumps(report[name]))
    write_json(args.out, report)


if __name__ == "__main__":
    main()
