"""Segmentation metrics (Dice, HD95) per class and per case, their summaries, and report files.

What is measured
----------------
For every case and every requested class id ``c`` the binary masks ``pred == c`` and
``label == c`` are compared and one row is produced::

    {"class": c, "dice": float, "hd95_mm": float, "hd95_vox": float,
     "gt_empty": bool, "pred_empty": bool}

(``"case"`` is added by the callers that know the case id.)

* **Dice** is ``2|P∩G| / (|P|+|G|)``, computed with :func:`monai.metrics.compute_dice`.
* **HD95** follows **medpy's** ``medpy.metric.binary.hd95``, the convention of the published
  semi-supervised segmentation tables (e.g. the SSL4MIS ACDC benchmarks):

  1. surface of a mask = ``mask XOR binary_erosion(mask, generate_binary_structure(ndim, 1))``
     (face connectivity; voxels on the array border count as surface);
  2. the two directed surface-distance sets are computed: for every surface voxel of P the
     Euclidean distance to the nearest surface voxel of G, and vice versa;
  3. HD95 = the 95th percentile (linear interpolation, ``numpy.percentile``) of the **union**
     (concatenation) of both sets.

  This is *not* what ``monai.metrics.compute_hausdorff_distance(percentile=95, directed=False)``
  returns: MONAI takes the 95th percentile of each directed set separately and reports the
  larger of the two, which is always >= medpy's value and differed by up to ~2 mm on random
  test masks. We therefore reuse MONAI's building blocks, which do match medpy
  (:func:`monai.metrics.utils.get_mask_edges` - the same erosion/XOR surface - and
  :func:`monai.metrics.utils.get_surface_distance` - exact Euclidean nearest-surface distance),
  and take the percentile of the union ourselves. Agreement with a line-by-line transcription
  of medpy is checked in ``tests/test_metrics.py`` (float32 distances: ~1e-6 relative).

  ``hd95_mm`` uses the voxel spacing (from the volume's affine, never assumed);
  ``hd95_vox`` uses unit spacing, i.e. medpy's ``hd95(pred, gt)`` on the voxel grid, as in the
  published tables. Both are measured on the grid of the arrays given (for the evaluation
  handler: the grid after the evaluator's pre-processing).

Empty masks
-----------
* GT empty and prediction empty: Dice = 1.0, HD95 = 0.0 (perfect agreement on absence).
* Exactly one of them empty: Dice = 0.0, HD95 = the diagonal of the volume extent,
  ``sqrt(sum((n_i * s_i)**2))`` (mm, with spacing ``s``) for ``hd95_mm`` and ``sqrt(sum(n_i**2))``
  for ``hd95_vox`` (``n`` = array shape): a finite worst-case penalty (no two voxels are
  farther apart), so that means stay defined.
* Every row records ``gt_empty`` and ``pred_empty`` so that such cases can be filtered out.
* ``hd95_mm_ssl4mis`` / ``hd95_vox_ssl4mis`` are the same HD95 under the SSL4MIS convention
  (``calculate_metric_percase`` of its test scripts), reported beside ours so that numbers can be
  compared with published tables: 0 when either mask is empty (SSL4MIS returns HD95 0 for an empty
  prediction, so a missed structure scores as perfect), else identical to ours.

Summaries
---------
:func:`summarize` gives, per class, the mean and the population standard deviation (``ddof=0``)
across cases, plus a ``"mean"`` row: each case's metric is first averaged over its classes,
then mean and std are taken across cases.

Entry points
------------
* :func:`case_metrics` - one case, arrays in memory.
* :func:`evaluate_files` - NIfTI prediction/label pairs on disk (e.g. the registration-only
  baseline).
* :class:`SegmentationReport` - an ignite handler for MONAI's ``SupervisedEvaluator`` (usable
  as a ``val_handlers`` entry of a bundle config) that writes the reports after each run.
* :func:`summarize` and :func:`write_reports` - ``<prefix>_per_case.csv``,
  ``<prefix>_summary.csv`` and ``<prefix>_summary.md``, written atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.metrics import compute_dice
from monai.metrics.utils import get_mask_edges, get_surface_distance
from monai.utils import convert_to_numpy

from scripts.data.atomic_io import write_text

__all__ = [
    "METRICS",
    "MetricsInputError",
    "spacing_from_affine",
    "dice_score",
    "hd95",
    "case_metrics",
    "class_name_map",
    "summarize",
    "summary_markdown",
    "write_reports",
    "evaluate_files",
    "SegmentationReport",
]

#: The metric keys of a case row, in report order.
METRICS: tuple[str, ...] = ("dice", "hd95_mm", "hd95_vox", "hd95_mm_ssl4mis", "hd95_vox_ssl4mis")

PER_CASE_COLUMNS: tuple[str, ...] = (
    "case",
    "class",
    "class_name",
    "dice",
    "hd95_mm",
    "hd95_vox",
    "hd95_mm_ssl4mis",
    "hd95_vox_ssl4mis",
    "gt_empty",
    "pred_empty",
    "no_prediction",
)
_METRIC_TITLES = {
    "dice": "Dice",
    "hd95_mm": "HD95 (mm)",
    "hd95_vox": "HD95 (voxels)",
    "hd95_mm_ssl4mis": "HD95 SSL4MIS (mm)",
    "hd95_vox_ssl4mis": "HD95 SSL4MIS (voxels)",
}
_METRIC_DECIMALS = {"dice": 4, "hd95_mm": 2, "hd95_vox": 2, "hd95_mm_ssl4mis": 2, "hd95_vox_ssl4mis": 2}
_NIFTI_SUFFIX = re.compile(r"\.(nii(\.gz)?|mha|mhd|nrrd)$", re.IGNORECASE)


class MetricsInputError(ValueError):
    """Raised for inputs the metrics cannot be computed from (shapes, spacing, label values...)."""


# ----------------------------------------------------------------------------------------------
# Single-case metrics
# ----------------------------------------------------------------------------------------------


def spacing_from_affine(affine: Any) -> tuple[float, ...]:
    """Voxel spacing from an ``(N+1, N+1)`` affine: the column norms of its ``N x N`` linear part.

    For a 4x4 NIfTI/MONAI affine this is the spacing along voxel axes (i, j, k) in mm, whatever
    the orientation (rotations and flips do not change column norms).
    """
    a = np.asarray(convert_to_numpy(affine), dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise MetricsInputError(f"affine must be a square (N+1)x(N+1) matrix, got shape {a.shape}")
    n = a.shape[0] - 1
    spacing = np.linalg.norm(a[:n, :n], axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise MetricsInputError(f"affine has a degenerate linear part (column norms {spacing.tolist()})")
    return tuple(float(s) for s in spacing)


def _as_label_array(x: Any, name: str) -> np.ndarray:
    """Convert a 2D/3D integer label volume (numpy, torch or MetaTensor) to a numpy array."""
    arr = np.asarray(convert_to_numpy(x))
    if arr.ndim not in (2, 3):
        raise MetricsInputError(f"{name} must be a 2D or 3D label volume, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.rint(arr)):
            raise MetricsInputError(f"{name} must hold integer class labels, got non-integer values")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise MetricsInputError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    return arr


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in np.asarray(convert_to_numpy(spacing), dtype=np.float64).reshape(-1))
    if len(sp) != ndim:
        raise MetricsInputError(f"spacing {sp} has {len(sp)} values for a {ndim}D volume")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise MetricsInputError(f"spacing must be positive and finite, got {sp}")
    return sp


def _extent_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the volume's extent ``n_i * s_i``: the empty-mask HD95 penalty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice_score(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Dice of two boolean masks (MONAI ``compute_dice``; both empty -> 1.0, one empty -> 0.0)."""
    p = torch.from_numpy(np.ascontiguousarray(pred_mask, dtype=bool))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt_mask, dtype=bool))[None, None]
    # One channel: MONAI treats it as the foreground class; ignore_empty=False gives the rule above.
    return float(compute_dice(p, g, include_background=True, ignore_empty=False)[0, 0])


def hd95(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """medpy-convention HD95 of two boolean masks (see the module docstring), with the empty rule.

    ``spacing`` defaults to unit spacing (distances in voxels).
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    gt_mask = np.asarray(gt_mask, dtype=bool)
    if pred_mask.shape != gt_mask.shape:
        raise MetricsInputError(f"mask shapes differ: prediction {pred_mask.shape} vs label {gt_mask.shape}")
    sp = _check_spacing((1.0,) * pred_mask.ndim if spacing is None else spacing, pred_mask.ndim)
    pred_any, gt_any = bool(pred_mask.any()), bool(gt_mask.any())
    if not pred_any and not gt_any:
        return 0.0
    if pred_any != gt_any:
        return _extent_diagonal(pred_mask.shape, sp)
    edges_pred, edges_gt = get_mask_edges(pred_mask, gt_mask, crop=True)
    distances = np.concatenate(
        [
            convert_to_numpy(get_surface_distance(edges_pred, edges_gt, "euclidean", sp)),
            convert_to_numpy(get_surface_distance(edges_gt, edges_pred, "euclidean", sp)),
        ]
    ).astype(np.float64)
    return float(np.percentile(distances, 95))


def case_metrics(pred: Any, label: Any, spacing: Sequence[float], class_ids: Iterable[int]) -> list[dict[str, Any]]:
    """Dice and HD95 (mm and voxels) of one case, one row per class id.

    Args:
        pred: predicted integer label volume, 2D or 3D (numpy, torch or MetaTensor).
        label: ground-truth integer label volume of the same shape.
        spacing: voxel spacing along the array axes (``len == ndim``), e.g. from
            :func:`spacing_from_affine`.
        class_ids: the classes to score, e.g. ``[1, 2, 3]``.

    Returns:
        ``[{"class", "dice", "hd95_mm", "hd95_vox", "hd95_mm_ssl4mis", "hd95_vox_ssl4mis", "gt_empty",
        "pred_empty"}, ...]`` in the
        order of ``class_ids``.
    """
    p = _as_label_array(pred, "prediction")
    g = _as_label_array(label, "label")
    if p.shape != g.shape:
        raise MetricsInputError(f"prediction shape {p.shape} differs from label shape {g.shape}")
    sp = _check_spacing(spacing, g.ndim)
    ids = [int(c) for c in class_ids]
    if not ids:
        raise MetricsInputError("class_ids is empty")
    if len(set(ids)) != len(ids):
        raise MetricsInputError(f"class_ids has duplicates: {ids}")
    rows = []
    for c in ids:
        pm, gm = p == c, g == c
        row = {
            "class": c,
            "dice": dice_score(pm, gm),
            "hd95_mm": hd95(pm, gm, sp),
            "hd95_vox": hd95(pm, gm, None),
            "gt_empty": not bool(gm.any()),
            "pred_empty": not bool(pm.any()),
        }
        one_empty = row["gt_empty"] or row["pred_empty"]
        row["hd95_mm_ssl4mis"] = 0.0 if one_empty else row["hd95_mm"]
        row["hd95_vox_ssl4mis"] = 0.0 if one_empty else row["hd95_vox"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Summaries and report files
# ----------------------------------------------------------------------------------------------


def class_name_map(class_names: Mapping[Any, str] | Sequence[str]) -> dict[int, str]:
    """Normalise class names to ``{class_id: name}``.

    Accepts a mapping with int or numeric-string keys (a datalist's ``"labels"``) or a list whose
    index is the class id (``["background", "RV", "myocardium", "LV"]``).
    """
    if isinstance(class_names, Mapping):
        out = {}
        for k, v in class_names.items():
            try:
                out[int(k)] = str(v)
            except (TypeError, ValueError):
                raise MetricsInputError(f"class_names key {k!r} is not an integer class id") from None
        return out
    if isinstance(class_names, (str, bytes)):
        raise MetricsInputError(f"class_names must be a mapping or a list of names, got {class_names!r}")
    return {i: str(v) for i, v in enumerate(class_names)}


def _name_of(names: Mapping[int, str], class_id: int) -> str:
    if class_id not in names:
        raise MetricsInputError(f"class {class_id} has no name in class_names {names}")
    return names[class_id]


def _stats(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=0))


def summarize(
    rows: Sequence[Mapping[str, Any]], class_names: Mapping[Any, str] | Sequence[str]
) -> list[dict[str, Any]]:
    """Mean and std across cases of each metric, per class and for the class mean.

    Args:
        rows: case rows (as from :func:`case_metrics`) that also carry ``"case"``.
        class_names: see :func:`class_name_map`.

    Returns:
        One dict per class (ascending id), then one with ``class == "mean"``; keys ``class``,
        ``class_name``, ``n_cases``, ``n_gt_empty``, ``n_pred_empty`` and ``<metric>_mean``,
        ``<metric>_std`` for each metric in :data:`METRICS`. The ``"mean"`` row averages each
        case over its classes first, then takes mean/std across cases.
    """
    names = class_name_map(class_names)
    if not rows:
        raise MetricsInputError("no metric rows to summarize")
    by_class: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    by_case: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        missing = [k for k in ("case", "class", *METRICS, "gt_empty", "pred_empty") if k not in row]
        if missing:
            raise MetricsInputError(f"metric row {dict(row)} lacks {missing}")
        by_class[int(row["class"])].append(row)
        by_case[str(row["case"])].append(row)

    summary = []
    for c in sorted(by_class):
        crows = by_class[c]
        entry: dict[str, Any] = {
            "class": c,
            "class_name": _name_of(names, c),
            "n_cases": len(crows),
            "n_gt_empty": sum(bool(r["gt_empty"]) for r in crows),
            "n_pred_empty": sum(bool(r["pred_empty"]) for r in crows),
        }
        for m in METRICS:
            entry[f"{m}_mean"], entry[f"{m}_std"] = _stats([float(r[m]) for r in crows])
        summary.append(entry)

    no_prediction = sorted({str(r["case"]) for r in rows if r.get("no_prediction")})
    mean_entry: dict[str, Any] = {
        "class": "mean",
        "class_name": "mean",
        "n_cases": len(by_case),
        "no_prediction": no_prediction,
        "n_gt_empty": sum(e["n_gt_empty"] for e in summary),
        "n_pred_empty": sum(e["n_pred_empty"] for e in summary),
    }
    for m in METRICS:
        per_case = [float(np.mean([float(r[m]) for r in crows])) for crows in by_case.values()]
        mean_entry[f"{m}_mean"], mean_entry[f"{m}_std"] = _stats(per_case)
    summary.append(mean_entry)
    return summary


def _csv_text(header: Sequence[str], records: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(header), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: rec[k] for k in header})
    return buf.getvalue()


def summary_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table, class x metric, cells ``mean ± std`` (from :func:`summarize`)."""
    lines = [
        "| Class | Cases | " + " | ".join(_METRIC_TITLES[m] for m in METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    for e in summary:
        name = "**mean**" if e["class"] == "mean" else str(e["class_name"])
        cells = [f"{e[f'{m}_mean']:.{_METRIC_DECIMALS[m]}f} ± {e[f'{m}_std']:.{_METRIC_DECIMALS[m]}f}" for m in METRICS]
        lines.append(f"| {name} | {e['n_cases']} | " + " | ".join(cells) + " |")
    last = summary[-1] if summary else {}
    lines += [
        "",
        "HD95: 95th percentile of the union of both directed surface-distance sets (medpy `hd95`); "
        "voxels = unit spacing. Empty masks: both empty -> Dice 1, HD95 0; one empty -> Dice 0, "
        "HD95 = volume-extent diagonal. Std: population (ddof=0) across cases.",
        f"Rows with empty ground truth: {last.get('n_gt_empty', 0)}; "
        f"with empty prediction: {last.get('n_pred_empty', 0)}.",
    ]
    if last.get("no_prediction"):
        lines.append(
            f"Cases without a prediction, counted as failures (an all-background prediction: Dice 0): "
            f"{len(last['no_prediction'])} ({', '.join(last['no_prediction'])})."
        )
    return "\n".join(lines) + "\n"


def write_reports(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    class_names: Mapping[Any, str] | Sequence[str],
    prefix: str = "metrics",
) -> dict[str, Path]:
    """Write ``<prefix>_per_case.csv``, ``<prefix>_summary.csv`` and ``<prefix>_summary.md``.

    All three files are written atomically. Returns their paths under the keys ``"per_case"``,
    ``"summary_csv"`` and ``"summary_md"``.
    """
    names = class_name_map(class_names)
    summary = summarize(rows, names)
    out = Path(out_dir)
    per_case = [{"no_prediction": False, **r, "class_name": _name_of(names, int(r["class"]))} for r in rows]
    summary_cols = ["class", "class_name", "n_cases", "n_gt_empty", "n_pred_empty"]
    summary_cols += [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    paths = {
        "per_case": out / f"{prefix}_per_case.csv",
        "summary_csv": out / f"{prefix}_summary.csv",
        "summary_md": out / f"{prefix}_summary.md",
    }
    write_text(paths["per_case"], _csv_text(PER_CASE_COLUMNS, per_case))
    write_text(paths["summary_csv"], _csv_text(summary_cols, summary))
    write_text(paths["summary_md"], summary_markdown(summary))
    return paths


# ----------------------------------------------------------------------------------------------
# Files on disk
# ----------------------------------------------------------------------------------------------


def _load_label_file(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Load an integer label volume and its affine from a NIfTI file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise MetricsInputError(f"cannot read {what} file {path}: {exc}") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    try:
        return _as_label_array(data, f"{what} {path}"), np.asarray(img.affine, dtype=np.float64)
    except MetricsInputError as exc:
        raise MetricsInputError(f"{what} file {path}: {exc}") from exc


def _apply_mapping(arr: np.ndarray, mapping: Mapping[Any, int]) -> np.ndarray:
    """Map raw label values to class ids; values absent from ``mapping`` become 0 (background)."""
    out = np.zeros(arr.shape, dtype=np.int32)
    for raw, cls in mapping.items():
        out[arr == int(raw)] = int(cls)
    return out


def _case_id_from_path(path: str | os.PathLike) -> str:
    return _NIFTI_SUFFIX.sub("", Path(str(path)).name)


def evaluate_files(
    cases: Sequence[Mapping[str, Any]],
    pred_key: str = "pred",
    label_key: str = "label",
    *,
    class_ids: Iterable[int],
    label_mapping: Mapping[Any, int] | None = None,
    base_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Metrics of NIfTI prediction/label pairs (e.g. the registration-only baseline).

    Args:
        cases: dicts with a prediction path under ``pred_key``, a label path under ``label_key``
            and optionally an ``"id"`` (default: the label file name without extension).
        class_ids: classes to score (keyword-only, no dataset-specific default).
        label_mapping: optional ``{raw_value: class_id}`` applied to both volumes before scoring;
            values not listed become 0.
        base_dir: folder that relative paths are resolved against (default: working directory).

    A case whose prediction is ``None`` has no prediction (e.g. registration found no partner): it
    is scored as an all-background prediction (Dice 0 for every class present) and its rows carry
    ``no_prediction: True``, so a failure counts in every mean instead of leaving it.

    Spacing comes from the label file's affine. The prediction must have the label's shape and
    (to 1e-3 mm / 1e-4 relative) its affine, otherwise :class:`MetricsInputError` names both files.

    Returns:
        Case rows (``"case"`` plus the :func:`case_metrics` keys), cases in input order.
    """
    class_ids = [int(c) for c in class_ids]
    base = Path(base_dir) if base_dir is not None else None
    rows: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        for key in (pred_key, label_key):
            if key not in case:
                raise MetricsInputError(f"case #{i} ({case.get('id', '?')}) has no {key!r} entry: {dict(case)}")
        paths = []
        for key in (pred_key, label_key):
            p = Path(str(case[key]))
            paths.append(base / p if base is not None and not p.is_absolute() else p)
        pred_path, label_path = paths
        label, label_affine = _load_label_file(label_path, "label")
        missing_pred = case[pred_key] is None
        if missing_pred:
            pred, pred_affine = np.zeros_like(label), label_affine
        else:
            pred, pred_affine = _load_label_file(pred_path, "prediction")
        if pred.shape != label.shape:
            raise MetricsInputError(
                f"shape mismatch: prediction {pred_path} has shape {pred.shape}, "
                f"label {label_path} has shape {label.shape}"
            )
        if pred_affine.shape != label_affine.shape or not np.allclose(pred_affine, label_affine, rtol=1e-4, atol=1e-3):
            raise MetricsInputError(
                f"geometry mismatch: prediction {pred_path} and label {label_path} have different affines\n"
                f"{pred_affine}\nvs\n{label_affine}"
            )
        if label_mapping is not None:
            pred, label = _apply_mapping(pred, label_mapping), _apply_mapping(label, label_mapping)
        spacing = spacing_from_affine(label_affine)[: label.ndim]
        case_id = str(case.get("id") or _case_id_from_path(label_path))
        rows += [
            {"case": case_id, **r, "no_prediction": missing_pred} for r in case_metrics(pred, label, spacing, class_ids)
        ]
    return rows


# ----------------------------------------------------------------------------------------------
# Evaluator handler
# ----------------------------------------------------------------------------------------------


class SegmentationReport:
    """Ignite handler: per-case Dice/HD95 during a MONAI ``SupervisedEvaluator`` run, reports at the end.

    Bundle config example (``val_handlers`` / ``handlers`` of an evaluator)::

        - _target_: scripts.evaluation.metrics.SegmentationReport
          output_dir: "$@bundle_root + '/eval'"
          class_names: "@labels"          # {"0": "background", "1": "RV", ...} or a list

    Each iteration reads the decollated ``engine.state.output`` (a list of per-case dicts; a
    batched dict is decollated here). ``pred`` and ``label`` are ``(1, *spatial)`` integer label
    maps or ``(C, *spatial)`` one-hot/probabilities (argmax over channels when ``C > 1``).
    Spacing comes from the label's (else the prediction's) ``MetaTensor.affine``, or from the
    ``"<key>_meta_dict"`` entries ``"affine"``/``"pixdim"``. The case id is the data dict's
    ``id_key`` entry in ``engine.state.batch`` (MONAI's evaluator keeps only image/label/pred in
    the output), else the label's ``filename_or_obj`` without extension, else ``case_<n>``.

    On ``COMPLETED`` the reports are written (:func:`write_reports`), the markdown summary is
    logged, and ``engine.state.metrics`` gets ``mean_dice``, ``mean_hd95_mm``, ``mean_hd95_vox``
    and ``<metric>_<class_name>`` per class. Rows are reset when the engine starts a run, so
    every validation round overwrites the files.

    Args:
        output_dir: folder for the report files.
        class_names: see :func:`class_name_map`.
        pred_key, label_key: keys of the prediction and the label in each output dict.
        prefix: file-name prefix of the reports.
        class_ids: classes to score; default: every named class except 0 (background).
        id_key: key of the case id in the data dicts.
        logger_name: name of the logger the summary goes to.
        figures: also draw, per case, ``overlays/<case>.png`` (a few slices of the image with the
            ground truth (solid) and predicted (dashed) contours; needs the image in the output
            under ``image_key``), and ``dice_per_class.png`` at the end
            (:mod:`scripts.evaluation.figures`).
        image_key: key of the image in each output dict.
        max_overlays: at most this many overlay pictures (the first cases).

    Note: in multi-process (DDP) evaluation each process only sees its own shard of cases.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Mapping[Any, str] | Sequence[str],
        pred_key: str = "pred",
        label_key: str = "label",
        prefix: str = "metrics",
        class_ids: Sequence[int] | None = None,
        id_key: str = "id",
        logger_name: str | None = None,
        figures: bool = False,
        image_key: str = "image",
        max_overlays: int = 50,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.figures, self.image_key, self.max_overlays = bool(figures), image_key, int(max_overlays)
        self.class_names = class_name_map(class_names)
        self.class_ids = (
            [int(c) for c in class_ids] if class_ids is not None else sorted(c for c in self.class_names if c != 0)
        )
        if not self.class_ids:
            raise MetricsInputError(f"no foreground classes to score in class_names {self.class_names}")
        for c in self.class_ids:
            _name_of(self.class_names, c)
        self.pred_key = pred_key
        self.label_key = label_key
        self.prefix = prefix
        self.id_key = id_key
        self.logger = logging.getLogger(logger_name or __name__)
        self.rows: list[dict[str, Any]] = []
        self.summary: list[dict[str, Any]] = []
        self.report_paths: dict[str, Path] = {}
        self._n_seen = 0

    def attach(self, engine: Engine) -> None:
        """Register the handler's callbacks on ``engine``."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the rows of a previous run."""
        self.rows, self.summary, self.report_paths, self._n_seen = [], [], {}, 0

    # -- per iteration -------------------------------------------------------------------------

    @staticmethod
    def _as_list(data: Any) -> list[Any]:
        if isinstance(data, dict):
            return decollate_batch(data, detach=True)
        if isinstance(data, (list, tuple)):
            return list(data)
        return []

    @staticmethod
    def _to_label_map(x: Any, what: str) -> torch.Tensor:
        t = torch.as_tensor(x.as_tensor() if isinstance(x, MetaTensor) else x).detach().cpu()
        if t.ndim not in (3, 4):
            raise MetricsInputError(
                f"{what} must be channel-first (C, *spatial) with 2 or 3 spatial dims, got shape {tuple(t.shape)}"
            )
        return t.argmax(dim=0) if t.shape[0] > 1 else t[0]

    def _spacing(self, item: Mapping[str, Any], ndim: int) -> tuple[float, ...]:
        for key in (self.label_key, self.pred_key):
            x = item.get(key)
            if isinstance(x, MetaTensor):
                return spacing_from_affine(x.affine)[:ndim]
        for key in (self.label_key, self.pred_key):
            meta = item.get(f"{key}_meta_dict")
            if isinstance(meta, Mapping):
                if meta.get("affine") is not None:
                    return spacing_from_affine(meta["affine"])[:ndim]
                if meta.get("pixdim") is not None:
                    pixdim = np.asarray(convert_to_numpy(meta["pixdim"]), dtype=np.float64).reshape(-1)
                    return tuple(float(s) for s in pixdim[1 : 1 + ndim])
        raise MetricsInputError(
            f"no spacing for this case: {self.label_key!r}/{self.pred_key!r} are not MetaTensors and have no "
            "'<key>_meta_dict' with 'affine' or 'pixdim'"
        )

    def _case_id(self, item: Mapping[str, Any], data: Any) -> str:
        if isinstance(data, Mapping) and data.get(self.id_key) is not None:
            return str(data[self.id_key])
        if item.get(self.id_key) is not None:
            return str(item[self.id_key])
        for key in (self.label_key, self.pred_key):
            x = item.get(key)
            name = x.meta.get("filename_or_obj") if isinstance(x, MetaTensor) else None
            if name:
                return _case_id_from_path(name)
        return f"case_{self._n_seen:04d}"

    def iteration_completed(self, engine: Engine) -> None:
        """Score every case of the current iteration."""
        outputs = self._as_list(engine.state.output)
        batch = self._as_list(engine.state.batch)
        for i, item in enumerate(outputs):
            if not isinstance(item, Mapping) or self.pred_key not in item or self.label_key not in item:
                raise MetricsInputError(
                    f"evaluator output must hold {self.pred_key!r} and {self.label_key!r} per case, got "
                    f"{sorted(item) if isinstance(item, Mapping) else type(item).__name__}"
                )
            pred = self._to_label_map(item[self.pred_key], f"output {self.pred_key!r}")
            label = self._to_label_map(item[self.label_key], f"output {self.label_key!r}")
            spacing = self._spacing(item, label.ndim)
            case_id = self._case_id(item, batch[i] if i < len(batch) else None)
            self._n_seen += 1
            self.rows += [{"case": case_id, **r} for r in case_metrics(pred, label, spacing, self.class_ids)]
            if self.figures and self._n_seen <= self.max_overlays and self.image_key in item:
                self._overlay(item[self.image_key], pred, label, spacing, case_id)

    def _overlay(
        self, image: Any, pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float], case_id: str
    ) -> None:
        from scripts.evaluation.figures import write_case_overlays

        image = np.asarray(torch.as_tensor(image).detach().cpu().float())
        image = image[0] if image.ndim == label.ndim + 1 else image
        write_case_overlays(
            self.output_dir / "overlays" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', case_id)}.png",
            image,
            {"ground truth": np.asarray(label.cpu()), "prediction": np.asarray(pred.cpu())},
            spacing,
            self.class_ids,
            title=case_id,
            class_names=self.class_names,
        )

    # -- end of run ----------------------------------------------------------------------------

    def completed(self, engine: Engine) -> None:
        """Write the reports, log the summary and publish the means in ``engine.state.metrics``."""
        if not self.rows:
            self.logger.warning("SegmentationReport: no cases were evaluated, no report written")
            return
        self.report_paths = write_reports(self.rows, self.output_dir, self.class_names, self.prefix)
        if self.figures:
            from scripts.evaluation.figures import write_dice_plot

            write_dice_plot(self.output_dir / "dice_per_class.png", self.rows, self.class_names)
        self.summary = summarize(self.rows, self.class_names)
        self.logger.info(
            "Segmentation metrics (%d cases), written to %s:\n%s",
            self.summary[-1]["n_cases"],
            self.output_dir,
            summary_markdown(self.summary),
        )
        for entry in self.summary:
            for m in METRICS:
                key = f"mean_{m}" if entry["class"] == "mean" else f"{m}_{entry['class_name']}"
                engine.state.metrics[key] = entry[f"{m}_mean"]


class SplitClassMetric:
    """Evaluator handler: replace a per-class metric tensor (``MeanDice(reduction="mean_batch")``) by one
    scalar per class, ``<prefix><class name>`` (``val_dice_RV``, ...), so that every logger and tracker
    (stats, TensorBoard, MLflow) gets plain numbers. Attach it before the handlers that read metrics.

    Args:
        metric: the per-class metric name in ``engine.state.metrics``.
        class_names: background first (the metric has one value per foreground class).
        prefix: the scalar metrics' name prefix.
    """

    def __init__(self, metric: str, class_names: Sequence[str], prefix: str = "val_dice_") -> None:
        self.metric, self.class_names, self.prefix = metric, list(class_names), prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        values = engine.state.metrics.pop(self.metric, None)
        if values is None:
            return
        values = torch.as_tensor(values).reshape(-1).tolist()
        names = (
            self.class_names[1:]
            if len(values) == len(self.class_names) - 1
            else [str(i + 1) for i in range(len(values))]
        )
        for name, value in zip(names, values):
            engine.state.metrics[f"{self.prefix}{name}"] = float(value)
