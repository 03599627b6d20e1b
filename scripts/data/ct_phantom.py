"""Synthetic abdominal CT phantom: the CT counterpart of :mod:`scripts.data.phantom` (never shipped data).

An axial abdominal CT in Hounsfield units with the eight Synapse organs and a few others, labelled in
the raw **13-label BTCV numbering** (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 liver,
7 stomach, 8 aorta, 9 inferior vena cava, 11 pancreas), so that the datalist's 13 -> 8 mapping
(``configs/splits/synapse.json``; the IVC maps to background) is exercised exactly as on
Synapse. Anatomy lives in a canonical frame in millimetres (``x`` to the patient's left, ``y``
anterior, ``z`` superior):

* an elliptic body (soft tissue, a subcutaneous fat ring), air outside, a vertebral body and the
  lumbar muscles behind the organs;
* organs as ellipsoids (liver, stomach, spleen, kidneys, gallbladder, pancreas) and vertical
  cylinders (aorta, IVC), later organs drawn over earlier ones.

Each subject draws its own organ centres (+-8 mm), sizes (+-15 %), a global anisotropic scale
(0.9-1.1), a rotation about the vertical axis (+-8 degrees), a translation (+-10 mm) and a smooth
non-rigid deformation (a sum of low-frequency sinusoids, 4-8 mm), so an affine registration cannot
align two subjects exactly and a deformable one matters. Intensities: organ HU values with per-subject
contrast variation, Gaussian noise (10-20 HU), stored as int16; labels as uint8.

Grids are anisotropic (slice axis 2): ``size="small"`` (96 x 96 in-plane, 24 slices of 8-10 mm, for
tests and the demo) or ``size="ct"`` (512 x 512 at 0.7-0.9 mm, 100 slices of 3-5 mm, for benchmarks).

``ensure_ct_phantom_dataset(root)`` writes ``imagesTr/``, ``labelsTr/`` and ``datalist.json`` (with
``label_mapping``, ``labels`` and ``intensity_window`` as ``scripts.data.datalist build_synapse``
writes them); deterministic in ``seed``, a no-op when the dataset on disk matches the request, and
generated in a temporary folder that replaces ``root`` at the end::

    python -m scripts.data.ct_phantom --root data/ct_phantom --n_labeled 2 --n_unlabeled 6
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from scripts.data.atomic_io import save_nifti, write_json
from scripts.data.phantom import PhantomDatasetError, _replace_folder

__all__ = ["CT_PHANTOM_VERSION", "ORGANS", "render_ct_subject", "ensure_ct_phantom_dataset"]

CT_PHANTOM_VERSION = 1
SPLIT = Path(__file__).resolve().parents[2] / "configs" / "splits" / "synapse.json"

#: name -> (raw BTCV label, HU, shape, centre (mm), semi-axes (mm) or (radius, half-height)); drawn in this order
ORGANS: dict[str, tuple[int, float, str, tuple[float, float, float], tuple[float, ...]]] = {
    "liver": (6, 60.0, "ellipsoid", (-60.0, 10.0, 30.0), (70.0, 60.0, 60.0)),
    "stomach": (7, 25.0, "ellipsoid", (45.0, 35.0, 35.0), (40.0, 30.0, 40.0)),
    "spleen": (1, 50.0, "ellipsoid", (85.0, -35.0, 40.0), (25.0, 35.0, 45.0)),
    "right kidney": (2, 160.0, "ellipsoid", (-55.0, -45.0, -20.0), (25.0, 20.0, 45.0)),
    "left kidney": (3, 160.0, "ellipsoid", (55.0, -45.0, -15.0), (25.0, 20.0, 45.0)),
    "gallbladder": (4, 10.0, "ellipsoid", (-45.0, 40.0, 0.0), (15.0, 15.0, 25.0)),
    "pancreas": (11, 45.0, "ellipsoid", (10.0, 5.0, 0.0), (55.0, 12.0, 12.0)),
    "aorta": (8, 200.0, "cylinder", (15.0, -25.0, 0.0), (12.0, 150.0)),
    "inferior vena cava": (9, 150.0, "cylinder", (-15.0, -20.0, 0.0), (11.0, 150.0)),
}
SIZES = {
    "small": {"inplane": 96, "slices": 24, "slice_mm": (8.0, 10.0), "fov_mm": (380.0, 420.0)},
    "ct": {"inplane": 512, "slices": 100, "slice_mm": (3.0, 5.0), "pixel_mm": (0.7, 0.9)},
}


def _subject(rng: np.random.Generator, size: str) -> dict[str, Any]:
    spec = SIZES[size]
    if "pixel_mm" in spec:
        pixel = float(rng.uniform(*spec["pixel_mm"]))
    else:
        pixel = float(rng.uniform(*spec["fov_mm"])) / spec["inplane"]
    organs = {}
    for name, (_, hu, _, centre, axes) in ORGANS.items():
        organs[name] = {
            "centre": (np.asarray(centre) + rng.uniform(-8, 8, 3)).tolist(),
            "axes": (np.asarray(axes) * rng.uniform(0.85, 1.15, len(axes))).tolist(),
            "hu": hu + float(rng.uniform(-10, 10)),
        }
    return {
        "spacing": [pixel, pixel, float(rng.uniform(*spec["slice_mm"]))],
        "shape": [spec["inplane"], spec["inplane"], spec["slices"]],
        "scale": rng.uniform(0.9, 1.1, 3).tolist(),
        "angle": float(rng.uniform(-8, 8)),
        "shift": rng.uniform(-10, 10, 3).tolist(),
        "warp": {
            "amplitude": float(rng.uniform(4, 8)),
            "phase": rng.uniform(0, 2 * math.pi, (3, 3)).tolist(),
            "wavelength": float(rng.uniform(160, 240)),
        },
        "body": {"a": float(rng.uniform(140, 160)), "b": float(rng.uniform(100, 120))},
        "noise": float(rng.uniform(10, 20)),
        "organs": organs,
    }


def grid_affine(subject: dict[str, Any]) -> np.ndarray:
    """Voxel -> RAS world (mm) affine of the subject's axial grid, centred on the world origin."""
    spacing, shape = np.asarray(subject["spacing"]), np.asarray(subject["shape"])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (shape - 1) / 2.0
    return affine


def _canonical(world: np.ndarray, subject: dict[str, Any]) -> np.ndarray:
    """World points ``(N, 3)`` -> canonical anatomy coordinates (inverse pose, then the smooth warp)."""
    t = math.radians(subject["angle"])
    rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    p = ((world - np.asarray(subject["shift"])) @ rot) / np.asarray(subject["scale"])  # rot.T inverse rotation
    warp, k = subject["warp"], 2 * math.pi / subject["warp"]["wavelength"]
    phase = np.asarray(warp["phase"])
    disp = np.stack([sum(np.sin(k * p[:, j] + phase[i, j]) for j in range(3)) / 3.0 for i in range(3)], 1)
    return p + warp["amplitude"] * disp


def render_ct_subject(subject: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image int16 HU, raw label uint8)`` of one subject, rendered a few slices at a time (bounded memory)."""
    shape = tuple(int(s) for s in subject["shape"])
    affine = grid_affine(subject)
    image = np.empty(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = subject["body"]
    for k0 in range(0, shape[2], 8):
        ks = np.arange(k0, min(k0 + 8, shape[2]))
        vox = (
            np.stack(
                [
                    np.repeat(ii[..., None], len(ks), 2),
                    np.repeat(jj[..., None], len(ks), 2),
                    np.broadcast_to(ks, (*ii.shape, len(ks))),
                ],
                -1,
            )
            .reshape(-1, 3)
            .astype(np.float64)
        )
        c = _canonical(vox @ affine[:3, :3].T + affine[:3, 3], subject)
        x, y, z = c[:, 0], c[:, 1], c[:, 2]
        r = (x / body["a"]) ** 2 + (y / body["b"]) ** 2
        hu = np.full(x.shape, -1000.0)
        lab = np.zeros(x.shape, np.uint8)
        hu[r <= 1.0] = -100.0  # subcutaneous fat
        inner = (x / (body["a"] - 15)) ** 2 + (y / (body["b"] - 15)) ** 2 <= 1.0
        hu[inner] = 30.0  # soft tissue
        muscle = inner & (((np.abs(x) - 35) / 22) ** 2 + ((y + 70) / 18) ** 2 <= 1.0)
        hu[muscle] = 55.0
        hu[inner & ((x / 22) ** 2 + ((y + 62) / 20) ** 2 <= 1.0)] = 600.0  # vertebral body
        for name, (raw, _, kind, _, _) in ORGANS.items():
            o = subject["organs"][name]
            (cx, cy, cz), axes = o["centre"], o["axes"]
            if kind == "ellipsoid":
                inside = ((x - cx) / axes[0]) ** 2 + ((y - cy) / axes[1]) ** 2 + ((z - cz) / axes[2]) ** 2 <= 1.0
            else:
                inside = (((x - cx) / axes[0]) ** 2 + ((y - cy) / axes[0]) ** 2 <= 1.0) & (np.abs(z - cz) <= axes[1])
            inside &= inner
            hu[inside] = o["hu"]
            lab[inside] = raw
        hu += rng.normal(0.0, subject["noise"], hu.shape)
        image[..., ks] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16).reshape(*ii.shape, len(ks))
        label[..., ks] = lab.reshape(*ii.shape, len(ks))
    return image, label


def _settings(seed: int, counts: dict[str, int], size: str) -> dict[str, Any]:
    return {"name": "scripts.data.ct_phantom", "version": CT_PHANTOM_VERSION, "seed": seed, "size": size, **counts}


def _up_to_date(root: Path, settings: dict[str, Any]) -> bool:
    try:
        datalist = json.loads((root / "datalist.json").read_text())
    except (OSError, ValueError):
        return False
    if datalist.get("generator") != settings:
        return False
    return all(
        (root / e[k]).is_file()
        for s in ("training", "unlabeled", "validation", "test")
        for e in datalist.get(s, [])
        for k in ("image", "label", "true_label")
        if k in e
    )


def ensure_ct_phantom_dataset(
    root: str | Path,
    n_labeled: int = 2,
    n_unlabeled: int = 6,
    n_validation: int = 2,
    n_test: int = 0,
    seed: int = 0,
    size: str = "small",
) -> str:
    """Generate the CT phantom into ``root`` unless it is already there; return ``root/datalist.json``."""
    counts = {"n_labeled": n_labeled, "n_unlabeled": n_unlabeled, "n_validation": n_validation, "n_test": n_test}
    if size not in SIZES:
        raise PhantomDatasetError(f"ensure_ct_phantom_dataset: size must be one of {sorted(SIZES)}, got {size!r}")
    if any(int(v) < 0 for v in counts.values()) or int(n_labeled) < 1 or int(seed) < 0:
        raise PhantomDatasetError(
            f"ensure_ct_phantom_dataset: need n_labeled >= 1, other counts >= 0, seed >= 0; got {counts}"
        )
    settings = _settings(int(seed), {k: int(v) for k, v in counts.items()}, size)
    root = Path(root).absolute()
    if _up_to_date(root, settings):
        return str(root / "datalist.json")
    if root.exists() and any(root.iterdir()):
        try:
            ours = json.loads((root / "datalist.json").read_text()).get("generator", {}).get("name") == settings["name"]
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise PhantomDatasetError(
                f"{root}: exists and is not a CT phantom dataset folder; refusing to overwrite it"
            )
    split = json.loads(SPLIT.read_text())
    sections = (
        ["training"] * n_labeled + ["unlabeled"] * n_unlabeled + ["validation"] * n_validation + ["test"] * n_test
    )
    rng = np.random.default_rng(int(seed))
    datalist: dict[str, Any] = {
        "name": "ct_phantom",
        "description": "Synthetic abdominal CT phantom generated by scripts.data.ct_phantom",
        "modality": "CT",
        "labels": dict(split["labels"]),
        "label_mapping": dict(split["label_mapping"]),
        "intensity_window": list(split["intensity_window"]),
        "generator": settings,
        "training": [],
        "unlabeled": [],
        "validation": [],
        "test": [],
    }
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        subjects = {}
        for n, section in enumerate(sections):
            sid = f"ct_{n:03d}"
            subject = _subject(rng, size)
            image, label = render_ct_subject(subject, int(seed) * 1000 + n)
            affine = grid_affine(subject)
            save_nifti(image, affine, staging / "imagesTr" / f"{sid}.nii.gz", dtype=np.int16)
            save_nifti(label, affine, staging / "labelsTr" / f"{sid}.nii.gz", dtype=np.uint8)
            key = "true_label" if section == "unlabeled" else "label"
            datalist[section].append({"id": sid, "image": f"imagesTr/{sid}.nii.gz", key: f"labelsTr/{sid}.nii.gz"})
            subjects[sid] = subject
        write_json(staging / "ct_phantom.json", {"settings": settings, "subjects": subjects})
        write_json(staging / "datalist.json", datalist)
        _replace_folder(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(root / "datalist.json")


def main(
    root: str = "data/ct_phantom",
    n_labeled: int = 2,
    n_unlabeled: int = 6,
    n_validation: int = 2,
    n_test: int = 0,
    seed: int = 0,
    size: str = "small",
) -> str:
    """Command line: generate the CT phantom and print its datalist path."""
    path = ensure_ct_phantom_dataset(root, n_labeled, n_unlabeled, n_validation, n_test, seed, size)
    print(path)
    return path


if __name__ == "__main__":
    import fire

    fire.Fire(main)
