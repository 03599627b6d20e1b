"""Tests for scripts.evaluation.metrics: Dice/HD95 conventions, empty rule, reports, evaluator handler, files."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from scripts.data.atomic_io import save_nifti
from scripts.evaluation.metrics import (
    MetricsInputError,
    SegmentationReport,
    case_metrics,
    class_name_map,
    evaluate_files,
    hd95,
    spacing_from_affine,
    summarize,
    write_reports,
)

torch.set_num_threads(1)

NAMES = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}


# ---------------------------------------------------------------------------------------------
# Reference: a line-by-line transcription of medpy.metric.binary.__surface_distances / hd95
# (EDT based, float64), independent of the KD-tree path used by the implementation.
# ---------------------------------------------------------------------------------------------


def _medpy_surface_distances(result, reference, spacing):
    footprint = ndimage.generate_binary_structure(result.ndim, 1)
    result_border = result ^ ndimage.binary_erosion(result, structure=footprint, iterations=1)
    reference_border = reference ^ ndimage.binary_erosion(reference, structure=footprint, iterations=1)
    dt = ndimage.distance_transform_edt(~reference_border, sampling=spacing)
    return dt[result_border]


def _medpy_hd95(result, reference, spacing):
    hd1 = _medpy_surface_distances(result, reference, spacing)
    hd2 = _medpy_surface_distances(reference, result, spacing)
    return float(np.percentile(np.hstack((hd1, hd2)), 95))


def _blobs(rng, shape, fraction):
    """Irregular blobs covering ``fraction`` of the array (smoothed noise above its quantile)."""
    field = ndimage.gaussian_filter(rng.random(shape), 1.2)
    return field > np.quantile(field, 1.0 - fraction)


# ---------------------------------------------------------------------------------------------
# Single-case metrics
# ---------------------------------------------------------------------------------------------


def test_spacing_from_affine_oblique_and_errors():
    rot = np.array([[0.0, -1.0, 0.0], [0.6, 0.0, -0.8], [0.8, 0.0, 0.6]])  # orthonormal
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.5, 2.0, 8.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    assert spacing_from_affine(affine) == pytest.approx((1.5, 2.0, 8.0))
    assert spacing_from_affine(torch.as_tensor(affine)) == pytest.approx((1.5, 2.0, 8.0))
    with pytest.raises(MetricsInputError, match="square"):
        spacing_from_affine(np.eye(4)[:3])
    with pytest.raises(MetricsInputError, match="degenerate"):
        spacing_from_affine(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_dice_of_overlapping_cubes():
    pred = np.zeros((12, 12, 12), np.int64)
    label = np.zeros_like(pred)
    label[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred[3:7, 2:6, 2:6] = 1  # shifted by one: overlap 3*4*4 = 48
    pred[8:10, 8:10, 8:10] = 2  # 8 voxels of class 2 vs 27 in the label, 8 shared
    label[8:11, 8:11, 8:11] = 2
    rows = case_metrics(pred, label, (1.0, 1.0, 1.0), [1, 2])
    assert [r["class"] for r in rows] == [1, 2]
    assert rows[0]["dice"] == pytest.approx(2 * 48 / 128)
    assert rows[1]["dice"] == pytest.approx(2 * 8 / 35)
    assert not rows[0]["gt_empty"] and not rows[0]["pred_empty"]


@pytest.mark.parametrize(
    "axis, k, spacing", [(2, 1, (1.5, 1.5, 10.0)), (0, 3, (1.5, 2.0, 10.0)), (1, 2, (0.7, 1.25, 9.0))]
)
def test_hd95_of_plate_shifted_by_k_voxels(axis, k, spacing):
    # A one-voxel-thick plate: every voxel is surface and its nearest voxel of the shifted plate
    # lies exactly k voxels away along the shift axis, so HD95 = k voxels = k * spacing[axis] mm.
    shape = (10, 11, 12)
    label = np.zeros(shape, np.uint8)
    index = [slice(2, 8)] * 3
    index[axis] = 1
    label[tuple(index)] = 3
    pred = np.roll(label, k, axis=axis)
    (row,) = case_metrics(torch.as_tensor(pred), torch.as_tensor(label), spacing, [3])
    assert row["hd95_vox"] == pytest.approx(k, rel=1e-6)
    assert row["hd95_mm"] == pytest.approx(k * spacing[axis], rel=1e-6)
    assert row["hd95_mm_ssl4mis"] == row["hd95_mm"] and row["hd95_vox_ssl4mis"] == row["hd95_vox"]  # both masks present
    assert row["dice"] == 0.0


@pytest.mark.parametrize(
    "seed, shape, spacing",
    [(0, (14, 13, 6), (1.3, 1.7, 8.0)), (1, (16, 15, 5), (1.5, 1.5, 10.0)), (2, (20, 17), (0.9, 2.1))],
)
def test_hd95_matches_medpy_transcription(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    pred, label = _blobs(rng, shape, 0.55), _blobs(rng, shape, 0.45)  # touch the array border too
    assert pred.any() and label.any()
    assert hd95(pred, label, spacing) == pytest.approx(_medpy_hd95(pred, label, spacing), rel=1e-5)
    assert hd95(pred, label) == pytest.approx(_medpy_hd95(pred, label, (1.0,) * len(shape)), rel=1e-5)
    (row,) = case_metrics(pred.astype(np.int16), label.astype(np.int16), spacing, [1])
    assert row["hd95_mm"] == pytest.approx(_medpy_hd95(pred, label, spacing), rel=1e-5)


def test_hd95_is_union_percentile_not_monai_max_of_directed():
    # Documents the convention choice: MONAI's symmetric percentile HD is the max of the two
    # directed 95th percentiles, which exceeds medpy's union percentile here.
    rng = np.random.default_rng(0)
    shape, spacing = (20, 18, 6), (1.3, 1.7, 8.0)
    pred, label = _blobs(rng, shape, 0.5), _blobs(rng, shape, 0.4)
    ours = hd95(pred, label, spacing)
    monai_value = float(
        compute_hausdorff_distance(
            torch.as_tensor(pred)[None, None].float(),
            torch.as_tensor(label)[None, None].float(),
            include_background=True,
            percentile=95,
            spacing=spacing,
        )
    )
    assert ours == pytest.approx(_medpy_hd95(pred, label, spacing), rel=1e-5)
    assert monai_value > ours + 0.1


def test_empty_rule():
    shape, spacing = (6, 8, 4), (1.5, 2.0, 10.0)
    label = np.zeros(shape, np.int64)
    pred = np.zeros(shape, np.int64)
    label[1:3, 1:3, 1] = 1  # class 1 only in the label
    pred[2:4, 2:4, 2] = 2  # class 2 only in the prediction; class 3 in neither
    rows = {r["class"]: r for r in case_metrics(pred, label, spacing, [1, 2, 3])}
    diag_mm = math.sqrt((6 * 1.5) ** 2 + (8 * 2.0) ** 2 + (4 * 10.0) ** 2)
    diag_vox = math.sqrt(6**2 + 8**2 + 4**2)
    assert rows[3] == {
        "class": 3,
        "dice": 1.0,
        "hd95_mm": 0.0,
        "hd95_vox": 0.0,
        "hd95_mm_ssl4mis": 0.0,
        "hd95_vox_ssl4mis": 0.0,
        "gt_empty": True,
        "pred_empty": True,
    }
    for c, gt_empty, pred_empty in ((1, False, True), (2, True, False)):
        assert rows[c]["dice"] == 0.0
        assert rows[c]["hd95_mm"] == pytest.approx(diag_mm)
        assert rows[c]["hd95_vox"] == pytest.approx(diag_vox)
        assert rows[c]["hd95_mm_ssl4mis"] == 0.0 and rows[c]["hd95_vox_ssl4mis"] == 0.0  # SSL4MIS: a miss scores 0
        assert (rows[c]["gt_empty"], rows[c]["pred_empty"]) == (gt_empty, pred_empty)


def test_case_metrics_rejects_bad_input():
    a = np.zeros((4, 4, 4), np.int64)
    with pytest.raises(MetricsInputError, match="shape"):
        case_metrics(a, np.zeros((4, 4, 5), np.int64), (1, 1, 1), [1])
    with pytest.raises(MetricsInputError, match="spacing"):
        case_metrics(a, a, (1, 1), [1])
    with pytest.raises(MetricsInputError, match="integer"):
        case_metrics(a + 0.5, a, (1, 1, 1), [1])
    with pytest.raises(MetricsInputError, match="2D or 3D"):
        case_metrics(a[None], a[None], (1, 1, 1, 1), [1])
    with pytest.raises(MetricsInputError, match="empty"):
        case_metrics(a, a, (1, 1, 1), [])


# ---------------------------------------------------------------------------------------------
# Summaries and report files
# ---------------------------------------------------------------------------------------------


def _rows():
    def row(case, c, dice, mm, vox, gt_empty=False, pred_empty=False):
        return {
            "case": case,
            "class": c,
            "dice": dice,
            "hd95_mm": mm,
            "hd95_vox": vox,
            "hd95_mm_ssl4mis": 0.0 if pred_empty else mm,
            "hd95_vox_ssl4mis": 0.0 if pred_empty else vox,
            "gt_empty": gt_empty,
            "pred_empty": pred_empty,
        }

    return [
        row("a", 1, 0.5, 2.0, 1.0),
        row("a", 3, 1.0, 4.0, 2.0),
        row("b", 1, 1.0, 6.0, 3.0),
        row("b", 3, 0.0, 8.0, 4.0, pred_empty=True),
    ]


def test_class_name_map_accepts_dict_and_list():
    assert class_name_map(NAMES) == {0: "background", 1: "RV", 2: "myocardium", 3: "LV"}
    assert class_name_map(["bg", "RV"]) == {0: "bg", 1: "RV"}
    with pytest.raises(MetricsInputError, match="not an integer"):
        class_name_map({"RV": "x"})


def test_summarize_per_class_and_case_mean():
    summary = summarize(_rows(), NAMES)
    assert [e["class"] for e in summary] == [1, 3, "mean"]
    rv, lv, mean = summary
    assert rv["class_name"] == "RV" and rv["n_cases"] == 2
    assert rv["dice_mean"] == pytest.approx(0.75) and rv["dice_std"] == pytest.approx(0.25)
    assert lv["hd95_mm_mean"] == pytest.approx(6.0) and lv["n_pred_empty"] == 1
    # "mean": per-case class means a = (0.75, 3, 1.5), b = (0.5, 7, 3.5); then across cases.
    assert mean["dice_mean"] == pytest.approx(0.625) and mean["dice_std"] == pytest.approx(0.125)
    assert mean["hd95_mm_mean"] == pytest.approx(5.0) and mean["hd95_mm_std"] == pytest.approx(2.0)
    assert mean["hd95_vox_mean"] == pytest.approx(2.5) and mean["n_cases"] == 2
    with pytest.raises(MetricsInputError, match="no name"):
        summarize(_rows(), {1: "RV"})
    with pytest.raises(MetricsInputError, match="lacks"):
        summarize([{k: v for k, v in _rows()[0].items() if k != "case"}], NAMES)


def test_write_reports_content(tmp_path):
    paths = write_reports(_rows(), tmp_path / "out", NAMES, prefix="val")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "val_per_case.csv",
        "val_summary.csv",
        "val_summary.md",
    ]
    with open(paths["per_case"], newline="") as f:
        per_case = list(csv.DictReader(f))
    assert list(per_case[0]) == [
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
    ]
    assert len(per_case) == 4
    assert per_case[3]["case"] == "b" and per_case[3]["class_name"] == "LV"
    assert float(per_case[3]["hd95_mm"]) == 8.0 and per_case[3]["pred_empty"] == "True"
    assert float(per_case[3]["hd95_mm_ssl4mis"]) == 0.0  # the missed LV, beside ours
    with open(paths["summary_csv"], newline="") as f:
        summary = list(csv.DictReader(f))
    assert [s["class_name"] for s in summary] == ["RV", "LV", "mean"]
    assert float(summary[0]["dice_mean"]) == pytest.approx(0.75)
    assert float(summary[2]["hd95_mm_std"]) == pytest.approx(2.0)
    md = paths["summary_md"].read_text()
    assert "| Class | Cases | Dice | HD95 (mm) | HD95 (voxels) |" in md
    assert "| RV | 2 | 0.7500 ± 0.2500 | 4.00 ± 2.00 | 2.00 ± 1.00 |" in md
    assert "| **mean** | 2 | 0.6250 ± 0.1250 | 5.00 ± 2.00 | 2.50 ± 1.00 |" in md
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


# ---------------------------------------------------------------------------------------------
# Evaluator handler
# ---------------------------------------------------------------------------------------------

AFFINE = torch.tensor(
    [[0.0, -2.0, 0.0, 5.0], [1.5, 0.0, 0.0, -3.0], [0.0, 0.0, 8.0, 1.0], [0, 0, 0, 1.0]], dtype=torch.float64
)  # spacing (1.5, 2.0, 8.0), axes permuted/flipped


def _label_volume(offset: int) -> torch.Tensor:
    lab = torch.zeros(1, 10, 9, 4)
    lab[0, 2 + offset : 6 + offset, 2:6, 1:3] = 3
    lab[0, 1:3, 1:4, 0:2] = 1
    lab[0, 6:8, 5:8, 2:4] = 2
    return lab


class _ShiftNet(torch.nn.Module):
    """Returns the input label map rolled by one voxel along axis X, as one-hot or as indices."""

    def __init__(self, one_hot: bool):
        super().__init__()
        self.one_hot = one_hot

    def forward(self, x):
        lab = torch.roll(x, 1, dims=2).round().long()
        if self.one_hot:
            return torch.nn.functional.one_hot(lab[:, 0], 4).permute(0, 4, 1, 2, 3).float()
        return lab.float()


def _run_evaluator(tmp_path, one_hot: bool, with_ids: bool):
    data = []
    for n in range(3):
        lab = _label_volume(n % 2)
        item = {
            "image": MetaTensor(lab.clone(), affine=AFFINE, meta={"filename_or_obj": f"/d/img{n}.nii.gz"}),
            "label": MetaTensor(lab.clone(), affine=AFFINE, meta={"filename_or_obj": f"/d/patient{n}_gt.nii.gz"}),
        }
        if with_ids:
            item["id"] = f"case{n}"
        data.append(item)
    report = SegmentationReport(tmp_path, NAMES, prefix="val")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2),
        network=_ShiftNet(one_hot),
        inferer=SimpleInferer(),
        val_handlers=[report],
    )
    evaluator.run()
    return report, evaluator, data


@pytest.mark.parametrize("one_hot", [False, True])
def test_handler_on_evaluator(tmp_path, one_hot, caplog):
    with caplog.at_level(logging.INFO, logger="scripts.evaluation.metrics"):
        report, evaluator, data = _run_evaluator(tmp_path, one_hot, with_ids=True)
    expected = []
    for item in data:
        lab = item["label"][0].numpy()
        rows = case_metrics(np.roll(lab, 1, axis=0), lab, (1.5, 2.0, 8.0), [1, 2, 3])
        expected += [{"case": item["id"], **r} for r in rows]
    assert report.rows == expected
    assert report.rows[0]["hd95_mm"] == pytest.approx(1.5)  # column norm of AFFINE (a row norm would be 2)
    assert [r["case"] for r in report.rows] == ["case0"] * 3 + ["case1"] * 3 + ["case2"] * 3
    assert 0.0 < evaluator.state.metrics["mean_dice"] < 1.0
    assert evaluator.state.metrics["mean_dice"] == pytest.approx(report.summary[-1]["dice_mean"])
    assert evaluator.state.metrics["hd95_mm_LV"] == pytest.approx(report.summary[2]["hd95_mm_mean"])
    assert "mean_hd95_vox" in evaluator.state.metrics
    assert (tmp_path / "val_per_case.csv").is_file() and (tmp_path / "val_summary.md").is_file()
    assert "| **mean** | 3 |" in caplog.text


def test_handler_case_id_falls_back_to_label_filename(tmp_path):
    report, _, _ = _run_evaluator(tmp_path, one_hot=False, with_ids=False)
    assert sorted({r["case"] for r in report.rows}) == ["patient0_gt", "patient1_gt", "patient2_gt"]


def test_handler_rejects_missing_keys(tmp_path):
    report = SegmentationReport(tmp_path, ["background", "fg"])
    assert report.class_ids == [1]

    class _Engine:
        class state:  # noqa: N801 - mimics ignite's State attribute access
            output = [{"pred": torch.zeros(1, 4, 4)}]
            batch = []

    with pytest.raises(MetricsInputError, match="'label'"):
        report.iteration_completed(_Engine())


# ---------------------------------------------------------------------------------------------
# NIfTI files
# ---------------------------------------------------------------------------------------------


def _affine(spacing):
    a = np.eye(4)
    a[:3, :3] = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) @ np.diag(spacing)
    a[:3, 3] = [-30.0, 12.0, 4.0]
    return a


def test_evaluate_files(tmp_path):
    spacing = (1.25, 1.75, 9.0)
    label = np.zeros((10, 11, 5), np.uint8)
    label[2:7, 3:8, 1:4] = 20
    label[7:9, 3:8, 1:4] = 40
    pred = np.roll(label, 1, axis=2)
    save_nifti(label, _affine(spacing), tmp_path / "p1_gt.nii.gz", np.uint8)
    save_nifti(pred, _affine(spacing), tmp_path / "p1_pred.nii.gz", np.uint8)
    cases = [{"pred": "p1_pred.nii.gz", "label": "p1_gt.nii.gz"}]
    rows = evaluate_files(cases, class_ids=[1, 2], label_mapping={20: 1, 40: 2}, base_dir=tmp_path)
    expected = case_metrics(np.roll(label, 1, axis=2) // 20, label // 20, spacing, [1, 2])
    assert rows == [{"case": "p1_gt", **r, "no_prediction": False} for r in expected]
    # spacing comes from the (permuted-axes) header: the wrong spacing would change HD95 in mm
    assert rows[0]["hd95_mm"] != pytest.approx(case_metrics(pred // 20, label // 20, (1, 1, 1), [1])[0]["hd95_mm"])
    rows = evaluate_files(
        [{"id": "x", "seg": str(tmp_path / "p1_pred.nii.gz"), "label": str(tmp_path / "p1_gt.nii.gz")}],
        pred_key="seg",
        class_ids=[20],
    )
    assert rows[0]["case"] == "x" and rows[0]["dice"] == pytest.approx(expected[0]["dice"])


def test_evaluate_files_errors(tmp_path):
    save_nifti(np.zeros((6, 6, 3), np.uint8), np.eye(4), tmp_path / "gt.nii.gz")
    save_nifti(np.zeros((6, 6, 4), np.uint8), np.eye(4), tmp_path / "bad_shape.nii.gz")
    save_nifti(np.zeros((6, 6, 3), np.uint8), np.diag([2.0, 1, 1, 1]), tmp_path / "bad_grid.nii.gz")
    with pytest.raises(MetricsInputError, match="shape mismatch") as err:
        evaluate_files([{"pred": tmp_path / "bad_shape.nii.gz", "label": tmp_path / "gt.nii.gz"}], class_ids=[1])
    assert "bad_shape.nii.gz" in str(err.value) and "gt.nii.gz" in str(err.value)
    with pytest.raises(MetricsInputError, match="geometry mismatch.*bad_grid"):
        evaluate_files([{"pred": tmp_path / "bad_grid.nii.gz", "label": tmp_path / "gt.nii.gz"}], class_ids=[1])
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        evaluate_files([{"pred": tmp_path / "missing.nii.gz", "label": tmp_path / "gt.nii.gz"}], class_ids=[1])
    with pytest.raises(MetricsInputError, match="no 'pred' entry"):
        evaluate_files([{"label": tmp_path / "gt.nii.gz"}], class_ids=[1])
