"""Input checks run before any training or inference starts.

:func:`check_datalist` inspects every file a datalist names and raises one
:class:`DataCheckError` that lists *all* the problems found (each naming the file and what is
wrong), so that a bad dataset is fixed in one go rather than discovered an hour into training.
It reads NIfTI headers with nibabel; label volumes are loaded only to check their values, images
are streamed once to make sure they are complete (a truncated ``.nii.gz`` is only noticed when the
data are read). :func:`check_image_file` does the image part for a single inference input.

Command line::

    python -m scripts.data.data_checks --datalist data/acdc_7.json [--sections training,validation]
"""

from __future__ import annotations

import gzip
import math
import os
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from scripts.data.datalist import SECTIONS, DatalistError, read_datalist
from scripts.user_errors import BundleInputError

__all__ = ["DataCheckError", "check_datalist", "check_image_file", "main", "cli"]

#: Geometry tolerance between an image and its label: |a - b| <= ATOL + RTOL * |b|, per affine entry.
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-4

#: Sections whose entries must carry a ``label``.
LABELED_SECTIONS = ("training", "validation")


class DataCheckError(BundleInputError):
    """The data are not fit for use; ``problems`` lists every problem found, one string each."""

    def __init__(self, problems: Sequence[str], source: str | os.PathLike | None = None):
        self.problems = list(problems)
        self.source = None if source is None else str(source)
        where = f" in {source}" if source is not None else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} data problem(s){where}:\n{lines}")


# ----------------------------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------------------------


def _raw_scaling(path: str) -> tuple[float, float] | None:
    """The ``scl_slope`` / ``scl_inter`` fields as stored in the file (None if not NIfTI).

    Read from the file itself: a loaded nibabel image moves the scaling into its data proxy and
    resets these header fields, and quietly treats an infinite slope as "no scaling".
    """
    try:
        with ImageOpener(path) as f:
            raw = f.read(540)
        for header_class in (nib.Nifti1Header, nib.Nifti2Header):
            size = header_class.template_dtype.itemsize
            if len(raw) < size:
                continue
            header = header_class(raw[:size], check=False)
            if int(header["sizeof_hdr"]) == size and header["magic"] in (b"n+1", b"ni1", b"n+2", b"ni2"):
                return float(header["scl_slope"]), float(header["scl_inter"])
    except Exception:  # noqa: BLE001 - unreadable: reported by the caller from nib.load's error
        return None
    return None


def _scaling_problem(path: str, slope: float, inter: float) -> str | None:
    """Problem with the header's intensity scaling, if any.

    NIfTI defines slope 0 or NaN as "no scaling" (nibabel writes NaN/NaN for unscaled data), so
    those are fine; an infinite slope, or a valid slope with a NaN/inf intercept, is not.
    """
    if math.isinf(slope) or (slope != 0 and math.isfinite(slope) and not math.isfinite(inter)):
        return (
            f"{path}: invalid intensity scaling in header (scl_slope={slope}, scl_inter={inter}); NaN/inf not allowed"
        )
    return None


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The 3D shape, accepting trailing singleton dimensions (``(X, Y, Z, 1)``); None if not 3D."""
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        return None
    return tuple(int(s) for s in shape[:3])


def _check_complete(path: str, img: nib.spatialimages.SpatialImage) -> str | None:
    """Whether the file holds all its voxel data (streams ``.gz`` files through to their CRC)."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                while f.read(1 << 22):
                    pass
        elif hasattr(img.dataobj, "offset"):  # uncompressed single-file NIfTI: compare sizes
            proxy = img.dataobj
            needed = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
            size = os.path.getsize(path)
            if size < needed:
                return f"{path}: file truncated ({size} bytes, header needs {needed})"
    except (OSError, EOFError, zlib.error) as err:
        return f"{path}: unreadable / truncated data ({type(err).__name__}: {err})"
    return None


def _intensity_problem(path: str, img: nib.spatialimages.SpatialImage, intensity: Mapping | None = None) -> str | None:
    """NaN or inf voxels, or an image that holds no anatomy: every voxel the same value (an empty
    series, a failed export), as stored or after the intensity normalisation ``intensity`` (a spec such
    as ``{"type": "ScaleIntensityRanged", "a_min": -125, "a_max": 275, "clip": true}``: a CT volume
    entirely outside the HU window). Read slab by slab along the last axis to bound memory."""
    proxy = img.dataobj
    floating = np.dtype(img.get_data_dtype()).kind == "f"
    nan = inf = 0
    lo, hi = math.inf, -math.inf
    try:
        depth = proxy.shape[2] if len(proxy.shape) > 2 else 1
        step = max(1, (1 << 24) // max(1, int(np.prod(proxy.shape[:2]))))
        for z in range(0, depth, step):
            slab = np.asarray(proxy[:, :, z : z + step] if len(proxy.shape) > 2 else proxy[:])
            if floating:
                finite, n_nan = np.isfinite(slab), int(np.isnan(slab).sum())
                nan, inf = nan + n_nan, inf + int(slab.size - finite.sum()) - n_nan
                slab = slab[finite]
            if slab.size:
                lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        return f"{path}: image data unreadable ({type(err).__name__}: {err})"
    if nan or inf:
        total = int(np.prod(proxy.shape))
        return (
            f"{path}: image has non-finite values ({nan} NaN and {inf} inf of {total} voxels); "
            "images must hold finite intensities"
        )
    if lo == hi:
        return f"{path}: image is constant (every voxel is {lo:g}): it holds no anatomy to segment (an empty or failed export?)"
    window = _intensity_window(intensity)
    if window is not None and (hi <= window[0] or lo >= window[1]):
        return (
            f"{path}: image is constant after the intensity window [{window[0]:g}, {window[1]:g}] (its values lie in "
            f"[{lo:g}, {hi:g}]): it holds no anatomy to segment (wrong units, or not this modality?)"
        )
    return None


def _intensity_window(intensity: Mapping | None) -> tuple[float, float] | None:
    """The clipping window of an intensity spec (MONAI's ``ScaleIntensityRanged`` with ``clip``), else None."""
    if not isinstance(intensity, Mapping) or not str(intensity.get("type", "")).endswith("ScaleIntensityRanged"):
        return None
    if not intensity.get("clip", False) or intensity.get("a_min") is None or intensity.get("a_max") is None:
        return None
    return float(intensity["a_min"]), float(intensity["a_max"])


def _open(
    path: str, role: str, problems: list[str], stream: bool = True, intensity: Mapping | None = None
) -> tuple[nib.spatialimages.SpatialImage, tuple[int, ...]] | None:
    """Load a volume's header and check it is a readable 3D file with sane scaling and geometry.

    With ``stream``, also read the file through once to make sure its data are complete (labels
    skip this: their data are loaded anyway). Problems are appended to ``problems``; returns
    ``(image, 3D shape)`` when the file can be used for the further checks, else None.
    """
    if not os.path.isfile(path):
        problems.append(f"{path}: {role} file missing")
        return None
    try:
        img = nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        raw = _raw_scaling(path)
        issue = _scaling_problem(path, *raw) if raw else None
        problems.append(issue or f"{path}: {role} file unreadable ({type(err).__name__}: {err})")
        return None
    found: list[str] = []
    raw = _raw_scaling(path)
    issue = _scaling_problem(path, *raw) if raw else None
    if issue:
        found.append(issue)
    shape = _spatial_shape(img.shape)
    if shape is None:
        kind = f"{len(img.shape)}D" if len(img.shape) != 4 else "4D (non-singleton 4th dimension)"
        found.append(f"{path}: {role} is {kind} with shape {tuple(img.shape)}; a 3D volume is required")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        found.append(f"{path}: {role} affine has NaN/inf entries")
    elif abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        found.append(f"{path}: {role} affine is degenerate (zero voxel size)")
    issue = _check_complete(path, img) if stream else None
    if issue:
        found.append(issue)
    elif stream and role == "image" and not found:
        issue = _intensity_problem(path, img, intensity)
        if issue:
            found.append(issue)
    problems.extend(found)
    return None if found else (img, shape)


def _label_values(path: str, img: nib.spatialimages.SpatialImage, problems: list[str]) -> np.ndarray | None:
    """The distinct values of a label volume (integers), or None with a problem appended."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001
        problems.append(f"{path}: label data unreadable ({type(err).__name__}: {err})")
        return None
    if data.dtype.kind in "iub":
        if data.size and data.min() >= 0 and data.max() < 1 << 16:
            return np.flatnonzero(np.bincount(data.ravel().astype(np.int64, copy=False)))
        return np.unique(data).astype(np.int64)
    if data.dtype.kind != "f":
        problems.append(f"{path}: label has non-numeric data type {data.dtype}")
        return None
    values = np.unique(data)
    bad = values[~np.isfinite(values) | (values != np.round(values))]
    if bad.size:
        problems.append(f"{path}: non-integer label values {bad[:5].tolist()} (labels must be whole class indices)")
        return None
    return values.astype(np.int64)


def check_image_file(path: str | os.PathLike, intensity: Mapping | None = None, role: str = "image") -> None:
    """Check one inference input: the file exists, nibabel reads it, and it is a complete 3D volume;
    an image (``role``) also holds finite, not constant intensities (before and after ``intensity``,
    the model's normalisation spec). ``role="label"`` checks a label file's container only.

    Raises:
        DataCheckError: listing the problems, each naming the file.
    """
    problems: list[str] = []
    _open(os.fspath(path), role, problems, intensity=intensity)
    if problems:
        raise DataCheckError(problems)


# ----------------------------------------------------------------------------------------------
# A datalist
# ----------------------------------------------------------------------------------------------


def _mapping_lookup(
    label_mapping: Mapping[str, Sequence[int]] | None, num_classes: int | None, problems: list[str], where: str
) -> dict[int, int] | None:
    """``{orig: target}`` from a ``{"orig": [...], "target": [...]}`` mapping (None if absent or bad)."""
    if label_mapping is None:
        return None
    try:
        orig = [int(v) for v in label_mapping["orig"]]
        target = [int(v) for v in label_mapping["target"]]
    except (KeyError, TypeError, ValueError) as err:
        problems.append(f"{where}: label_mapping must be {{'orig': [ints], 'target': [ints]}} ({err!r})")
        return None
    if len(orig) != len(target):
        problems.append(f"{where}: label_mapping 'orig' ({len(orig)}) and 'target' ({len(target)}) differ in length")
        return None
    if num_classes is not None:
        out = sorted({t for t in target if not 0 <= t < num_classes})
        if out:
            problems.append(f"{where}: label_mapping targets {out} are outside 0..{num_classes - 1}")
    return dict(zip(orig, target))


def _check_label(
    image: str,
    image_info: tuple[nib.spatialimages.SpatialImage, tuple[int, ...]] | None,
    label: str,
    role: str,
    num_classes: int | None,
    lookup: dict[int, int] | None,
    problems: list[str],
) -> None:
    """Check a label volume: readable, 3D, same shape and geometry as its image, valid values."""
    opened = _open(label, role, problems, stream=False)
    if opened is None:
        return
    lab, lab_shape = opened
    if image_info is not None:
        img, img_shape = image_info
        if lab_shape != img_shape:
            problems.append(f"{label}: {role} shape {lab_shape} differs from image {image} shape {img_shape}")
        else:
            a, b = np.asarray(lab.affine, float), np.asarray(img.affine, float)
            if not np.allclose(a, b, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
                problems.append(
                    f"{label}: {role} geometry (affine) differs from image {image} "
                    f"(max difference {np.max(np.abs(a - b)):.4g}; "
                    f"tolerance {AFFINE_ATOL_MM} mm + {AFFINE_RTOL} relative)"
                )
    values = _label_values(label, lab, problems)
    if values is None:
        return
    if lookup is not None:
        unmapped = [int(v) for v in values if int(v) not in lookup]
        if unmapped:
            problems.append(f"{label}: label values {unmapped} are not in label_mapping orig {sorted(lookup)}")
        values = np.asarray([lookup[int(v)] for v in values if int(v) in lookup], dtype=np.int64)
    if num_classes is not None:
        out = [int(v) for v in values if not 0 <= v < num_classes]
        if out:
            after = " (after label_mapping)" if lookup is not None else ""
            problems.append(f"{label}: label values {out}{after} outside 0..{num_classes - 1} ({num_classes} classes)")


def check_datalist(
    path: str | os.PathLike,
    sections: Sequence[str] | str = ("training", "unlabeled", "validation"),
    num_classes: int | None = None,
    label_mapping: Mapping[str, Sequence[int]] | None = None,
    require_labeled: bool = True,
    nonempty: Sequence[str] = (),
    intensity: Mapping | None = None,
) -> dict:
    """Check a datalist and every file it names in ``sections``; raise if anything is wrong.

    Checks: the datalist reads; requested sections exist; ``training`` is not empty (when
    ``require_labeled``) and neither is any section named in ``nonempty``; ids are present and unique
    across all sections; every image / label / true_label file exists, is readable and complete, is 3D
    (a trailing singleton dimension is accepted), has a finite non-degenerate affine and no NaN/inf
    intensity scaling; every image holds finite intensities that are not all equal (before, and after
    ``intensity``'s clipping window, the normalisation spec); each label has its image's shape and
    geometry (affine within 1e-3 mm + 1e-4 relative) and integer values in
    ``0..num_classes-1`` after ``label_mapping``. ``num_classes`` defaults to the number of the
    datalist's ``labels``; ``label_mapping`` (``{"orig": [...], "target": [...]}``) to the datalist's
    own ``label_mapping`` if it has one (labels with values not in ``orig`` are errors).

    Returns:
        A report: ``{"datalist", "num_classes", "sections": {name: count}, "files_checked", "seconds"}``.

    Raises:
        DataCheckError: listing every problem found, each naming the file and the problem.
    """
    start = time.perf_counter()
    if isinstance(sections, str):
        sections = [s.strip() for s in sections.split(",") if s.strip()]
    path = Path(path)
    try:
        data = read_datalist(path)
    except (FileNotFoundError, DatalistError) as err:
        raise DataCheckError([str(err)], path) from err

    problems: list[str] = []
    where = f"datalist {path}"
    if not any(data.get(s) for s in SECTIONS):
        problems.append(f"{where}: empty datalist (no entry in any of {list(SECTIONS)})")
    for section in sections:
        if section not in data:
            available = [s for s in SECTIONS if s in data]
            problems.append(f"{where}: no section {section!r} (available: {available})")
    if require_labeled and not data.get("training"):
        problems.append(f"{where}: no labeled case (section 'training' is missing or empty)")
    for section in nonempty:
        if section in data and not data[section]:
            problems.append(f"{where}: section {section!r} is empty")

    seen: dict[str, list[str]] = defaultdict(list)
    for section in SECTIONS:
        for i, entry in enumerate(data.get(section, [])):
            if "id" not in entry:
                problems.append(f"{where}: {section}[{i}] ({entry.get('image')}) has no 'id'")
            else:
                seen[str(entry["id"])].append(section)
    for case_id, found_in in seen.items():
        if len(found_in) > 1:
            problems.append(f"{where}: duplicate id {case_id!r} ({len(found_in)} entries, in sections {found_in})")

    if num_classes is None:
        labels = data.get("labels")
        if isinstance(labels, Mapping) and labels:
            num_classes = len(labels)
        else:
            problems.append(f"{where}: no 'labels' to count classes from, and num_classes not given")
    if label_mapping is None:
        label_mapping = data.get("label_mapping")
    lookup = _mapping_lookup(label_mapping, num_classes, problems, where)

    counts: dict[str, int] = {}
    files = 0
    for section in sections:
        entries = data.get(section, [])
        counts[section] = len(entries)
        for i, entry in enumerate(entries):
            name = f"{section}[{i}] id={entry.get('id')!r}"
            image = entry.get("image")
            if not isinstance(image, str):
                problems.append(f"{where}: {name} has no 'image' path")
                continue
            files += 1
            image_info = _open(image, "image", problems, intensity=intensity)
            label_keys = [k for k in ("label", "true_label") if entry.get(k) is not None]
            if section in LABELED_SECTIONS and "label" not in label_keys:
                problems.append(f"{where}: {name} ({image}) has no 'label' (required in section {section!r})")
            for key in label_keys:
                if not isinstance(entry[key], str):
                    problems.append(f"{where}: {name} ({image}): {key!r} must be one path")
                    continue
                files += 1
                _check_label(image, image_info, entry[key], key, num_classes, lookup, problems)

    if problems:
        raise DataCheckError(problems, path)
    return {
        "datalist": str(path),
        "num_classes": num_classes,
        "sections": counts,
        "files_checked": files,
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(
    datalist: str,
    sections: Sequence[str] | str = ("training", "unlabeled", "validation"),
    num_classes: int | None = None,
    require_labeled: bool = True,
) -> None:
    """Command line: check a datalist, print the report, exit 1 with the list of problems if any."""
    try:
        report = check_datalist(datalist, sections=sections, num_classes=num_classes, require_labeled=require_labeled)
    except DataCheckError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    counts = ", ".join(f"{k} {v}" for k, v in report["sections"].items())
    print(f"OK {report['datalist']}: {counts}; {report['files_checked']} files checked in {report['seconds']} s")


def cli(argv: list[str] | None = None) -> None:
    """``python -m scripts.data.data_checks --datalist ...`` (``argv`` for tests)."""
    import fire

    fire.Fire(main, command=argv)


if __name__ == "__main__":
    cli()
