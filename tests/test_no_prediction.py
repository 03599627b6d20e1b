"""A volume without a prediction counts as a failure (Dice 0) and is named (issue 11, case 10)."""

from __future__ import annotations

import json

import numpy as np

from scripts.data.atomic_io import save_nifti
from scripts.evaluation.metrics import evaluate_files, summarize, write_reports
from scripts.registration.baseline import run_baseline


def _label(path, shift=0):
    label = np.zeros((12, 12, 4), np.uint8)
    label[3 + shift : 8 + shift, 3:8] = 1
    save_nifti(label, np.diag([1.0, 1.0, 3.0, 1.0]), path, dtype=np.uint8)
    return str(path)


def test_missing_prediction_scores_zero_and_is_named(tmp_path):
    good = _label(tmp_path / "a.nii.gz")
    cases = [
        {"id": "a", "pred": good, "label": good},
        {"id": "b", "pred": None, "label": _label(tmp_path / "b.nii.gz")},
    ]
    rows = evaluate_files(cases, class_ids=[1])
    assert [(r["case"], r["dice"], r["no_prediction"]) for r in rows] == [("a", 1.0, False), ("b", 0.0, True)]
    mean = summarize(rows, {1: "fg"})[-1]
    assert mean["n_cases"] == 2 and mean["dice_mean"] == 0.5 and mean["no_prediction"] == ["b"]
    md = (write_reports(rows, tmp_path / "out", {1: "fg"})["summary_md"]).read_text()
    assert "Cases without a prediction" in md and "(b)" in md


class _NoPartners:
    def rank(self, table, vid, image, partners):
        return []  # every pair diverged


class _EmptyTable:
    def get(self, moving, fixed):
        return None


def test_registration_baseline_counts_a_volume_without_partner(tmp_path):
    labeled = [{"id": "L", "image": "unused", "label": _label(tmp_path / "L.nii.gz")}]
    evaluation = [{"id": "v", "image": "unused", "label": _label(tmp_path / "v.nii.gz", shift=1)}]
    result = run_baseline(
        _EmptyTable(), labeled, evaluation, _NoPartners(), tmp_path / "baseline", top_k=1, class_names={1: "fg"}
    )
    for method in ("first", "brs"):
        assert result[method]["cases"] == 1 and result[method]["mean_dice"] == 0.0
        assert result[method]["no_prediction"] == ["v"]
    saved = json.loads((tmp_path / "baseline" / "baseline.json").read_text())
    assert saved["brs"]["no_prediction"] == ["v"]
