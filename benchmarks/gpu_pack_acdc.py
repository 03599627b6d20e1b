"""Pack the ACDC development folder small enough to travel to a lent GPU machine (``benchmarks/gpu_check.sh``).

The device tool sends the repository and at most 64 MiB with it; the ACDC folder's ``.nii.gz`` files are
about 98 MB. Its images are min-max scaled floats in [0, 1]; stored here as uint16 with the NIfTI scale
slope 1/65535 they read back as floats within 1e-5 of the originals (nibabel applies the slope), the
geometry and the labels unchanged; all stored as uncompressed ``.nii`` (xz packs raw voxels far better than
gzipped ones). A volume whose values are not in [0, 1] stays float32. The folder is
written to ``--staging`` (default ``/tmp/acdc_pack``, the path the device unpacks to, so the datalist's
absolute paths hold there), with its datalist, then archived as ``--out`` (tar + xz):

    python benchmarks/gpu_pack_acdc.py --root ../shared/acdc --labeled 1 --out .gpu/acdc_pack.tar.xz

The archive goes in an ignored folder (``.gpu/``): the data never enters the project.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def repack(src: Path, dst: Path) -> float:
    """One image as scaled uint16 (or float32 if its values leave [0, 1]); returns the largest error."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    header = img.header.copy()
    if data.min() < 0 or data.max() > 1:
        header.set_data_dtype(np.float32)
        nib.save(nib.Nifti1Image(data, img.affine, header), str(dst))
        return 0.0
    header.set_data_dtype(np.uint16)
    out = nib.Nifti1Image(np.rint(data * 65535).astype(np.uint16), img.affine, header)
    out.header.set_slope_inter(1 / 65535, 0)
    nib.save(out, str(dst))
    return float(np.abs(np.asarray(nib.load(str(dst)).dataobj, dtype=np.float32) - data).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "acdc"))
    ap.add_argument("--staging", default="/tmp/acdc_pack")
    ap.add_argument("--labeled", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / ".gpu" / "acdc_pack.tar.xz"))
    ap.add_argument("--xz_level", type=int, default=9)
    args = ap.parse_args()
    root, staging = Path(args.root), Path(args.staging)
    worst = 0.0
    for src in sorted(root.glob("patient*/*.nii.gz")):
        dst = staging / src.parent.name / src.name.removesuffix(".gz")  # uncompressed: xz packs the raw voxels better
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.name.endswith("_gt.nii.gz"):
            nib.save(nib.load(str(src)), str(dst))
        else:
            worst = max(worst, repack(src, dst))
    for name in ("split.json", "README.md"):
        if (root / name).exists():
            (staging / name).write_bytes((root / name).read_bytes())
    datalist = staging / f"acdc_{args.labeled}.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.data.datalist",
            "acdc",
            "--root",
            str(staging),
            "--out",
            str(datalist),
            "--labeled",
            str(args.labeled),
        ],
        check=True,
        cwd=ROOT,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-C", str(staging.parent), "-cf", args.out, "-I", f"xz -{args.xz_level} -T0", staging.name], check=True
    )
    size = Path(args.out).stat().st_size / 2**20
    print(f"{args.out}: {size:.1f} MiB; largest image error {worst:.2e}; datalist {datalist}")


if __name__ == "__main__":
    main()
