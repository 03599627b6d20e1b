"""Every semi-supervised variant trains for a few iterations on a tiny phantom, from its documented config files.

The bundle's ``run`` runs in this process (as ``python -m monai.bundle run`` would) with overrides that
keep each run to a couple of seconds: 32x32 patches, a SwinUNETR with feature size 12, two iterations.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from scripts.data.semi_supervised_data import MissingRegisteredLabelError
from tests.cross_teaching_fixtures import make_rsl_datalist, run_bundle

torch.set_num_threads(1)

ITERATIONS = ["--num_iterations", "2", "--val_interval", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return make_rsl_datalist(tmp_path_factory.mktemp("phantom"))


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "models" / "train_state.pt", map_location="cpu", weights_only=False)


def _model(run_dir: Path) -> dict:
    return torch.load(run_dir / "models" / "model.pt", map_location="cpu", weights_only=True)


def _evaluates(run_dir: Path, datalist: str, inference_files: list[str]) -> None:
    """The variant's documented inference override loads its model.pt and scores the validation volume."""
    report = run_dir / "report"
    run_bundle(run_dir, ["inference.yaml", "evaluate.yaml", *inference_files], datalist, "--datalist_section", "validation",
               "--report_dir", str(report), "--output_dir", str(run_dir / "pred"), run_id="evaluating")
    with open(report / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["class_name"] for r in rows} == {"RV", "myocardium", "LV"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)


def _monitor(run_dir: Path) -> dict:
    history = json.loads((run_dir / "eval" / "pseudo_label_dice.json").read_text())
    assert [r["iteration"] for r in history] == [2]
    return history[-1]["dice"]


@pytest.mark.parametrize(
    "variant, files, datalist, names, rsl, inference",
    [
        ("cct-r", ["variants/cct_r.yaml"], "rsl", ["cnn", "transformer"], True, ["variants/inference_cct_r.yaml"]),
        ("cts", ["variants/cct_r.yaml", "variants/cts.yaml"], "plain", ["cnn", "transformer"], False, ["variants/inference_cct_r.yaml"]),
        ("cps", ["variants/cct_r.yaml", "variants/cps.yaml"], "plain", ["unet_a", "unet_b"], False, ["variants/inference_cct_r.yaml", "variants/inference_cps.yaml"]),
    ],
)
def test_two_student_variants(tmp_path, data, variant, files, datalist, names, rsl, inference):
    run_bundle(tmp_path, ["train.yaml", *files], data[datalist], *ITERATIONS)
    state = _state(tmp_path)
    assert state["trainer"]["iteration"] == 2
    assert state["lr_scheduler"]["last_epoch"] == state["lr_scheduler_b"]["last_epoch"] == 2
    assert state["optimizer_b"]["param_groups"][0]["initial_lr"] == (0.0001 if variant != "cps" else 0.0005)
    model = _model(tmp_path)
    assert any(k.startswith("net_a.") for k in model) and any(k.startswith("net_b.") for k in model)
    assert len(model) == len(state["network"])
    swin = any("swinViT" in k for k in model)
    assert swin == (variant != "cps")  # CPS: two U-Nets
    dice = _monitor(tmp_path)
    assert set(dice) == set(names) | ({"registered"} if rsl else set())
    for scores in dice.values():
        assert set(scores) == {"RV", "myocardium", "LV", "mean"}
        assert 0.0 <= scores["mean"] <= 1.0
    if rsl:  # one registered label is the truth, the other a shifted copy
        assert 0.3 < dice["registered"]["mean"] < 1.0
    _evaluates(tmp_path, data[datalist], inference)


@pytest.mark.parametrize("rsl", [False, True])
def test_uamt_variants(tmp_path, data, rsl):
    files = ["train.yaml", "variants/cct_r.yaml", "variants/uamt.yaml"] + (["variants/uamt_rsl.yaml"] if rsl else [])
    run_bundle(tmp_path, files, data["rsl" if rsl else "plain"], *ITERATIONS)
    state = _state(tmp_path)
    assert state["trainer"]["iteration"] == 2
    assert "optimizer_b" not in state
    network = state["network"]
    student = {k[6:]: v for k, v in network.items() if k.startswith("net_a.")}
    teacher = {k[6:]: v for k, v in network.items() if k.startswith("net_b.")}
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # an average, not a copy
    dice = _monitor(tmp_path)
    assert set(dice) == {"student", "teacher"} | ({"registered"} if rsl else set())
    _evaluates(tmp_path, data["plain"], ["variants/inference_cct_r.yaml", "variants/inference_uamt.yaml"])


def test_fs_trains_on_labeled_and_true_labels(tmp_path, data):
    run_bundle(tmp_path, ["train.yaml", "variants/fs.yaml"], data["plain"], *ITERATIONS)
    state = _state(tmp_path)
    assert state["trainer"]["iteration"] == 2
    model = _model(tmp_path)
    assert not any(k.startswith("net_") for k in model)  # a plain U-Net, served by inference.yaml
    assert not (tmp_path / "eval" / "pseudo_label_dice.json").exists()
    _evaluates(tmp_path, data["plain"], [])


def test_cct_r_refuses_a_datalist_without_registered_labels(tmp_path, data):
    with pytest.raises(RuntimeError) as info:
        run_bundle(tmp_path, ["train.yaml", "variants/cct_r.yaml"], data["plain"], *ITERATIONS)
    error, causes = info.value, []
    while error is not None:  # the bundle wraps the error of the expression that failed
        causes.append(error)
        error = error.__cause__
    root = causes[-1]
    assert isinstance(root, MissingRegisteredLabelError)
    assert "registered_label" in str(root) and data["plain"] in str(root)
    assert not (tmp_path / "models" / "model.pt").exists()
