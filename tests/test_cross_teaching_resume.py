"""CCT-R: resume equals an uninterrupted run; inference and evaluation of the mean and of each branch."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.cross_teaching_fixtures import make_rsl_datalist, run_bundle

torch.set_num_threads(1)

CCT_R = ["train.yaml", "variant_no_contrastive.yaml"]  # REPS needs registrations (its bank: test_contrastive_training)
RUN = ["--num_iterations", "4", "--val_interval", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return make_rsl_datalist(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    run_bundle(run_dir, CCT_R, data["rsl"], *RUN)
    return run_dir


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "models" / "train_state.pt", map_location="cpu", weights_only=False)


def test_resume_equals_uninterrupted_run(tmp_path, data, straight):
    """4 iterations straight == 2 iterations, stop, resume, 2 more: both networks, optimizers, schedulers."""
    run_bundle(tmp_path, CCT_R, data["rsl"], *RUN, "--max_epochs", "1")
    assert _state(tmp_path)["trainer"]["iteration"] == 2
    run_bundle(tmp_path, CCT_R, data["rsl"], *RUN, "--resume", "true")
    resumed, full = _state(tmp_path), _state(straight)
    assert resumed["trainer"]["iteration"] == full["trainer"]["iteration"] == 4
    assert any(k.startswith("net_b.swinViT") for k in full["network"])
    for name, value in full["network"].items():
        torch.testing.assert_close(resumed["network"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("optimizer", "optimizer_b"):
        for pid, moments in full[key]["state"].items():
            torch.testing.assert_close(resumed[key]["state"][pid]["exp_avg"], moments["exp_avg"], rtol=1e-5, atol=1e-7)
    for key in ("lr_scheduler", "lr_scheduler_b"):
        assert resumed[key]["last_epoch"] == full[key]["last_epoch"] == 4
    assert resumed["monitor"]["history"] == full["monitor"]["history"]
    assert len(full["monitor"]["history"]) == 2


def _evaluate(run_dir: Path, data: dict, out: Path, branch: str) -> dict[str, float]:
    run_bundle(
        run_dir,
        ["inference.yaml", "evaluate.yaml"],
        data["rsl"],
        "--datalist_section",
        "validation",
        "--report_dir",
        str(out / "report"),
        "--output_dir",
        str(out / "pred"),
        "--branch",
        branch,
        "--largest_component",  # the raw argmax, as validation during training scores it
        "false",
        run_id="evaluating",
    )
    with open(out / "report" / "metrics_per_case.csv") as f:
        return {r["class_name"]: float(r["dice"]) for r in csv.DictReader(f)}


def test_evaluation_of_mean_and_each_branch(tmp_path, data, straight):
    scores = {b: _evaluate(straight, data, tmp_path / b, b) for b in ("mean", "a", "b")}
    for s in scores.values():
        assert set(s) == {"RV", "myocardium", "LV"}
        assert all(0.0 <= v <= 1.0 for v in s.values())
    assert scores["a"] != scores["b"]  # the CNN and the Transformer alone
    # the saved model is the best validation round; its mean-branch evaluation of the raw argmax reproduces that
    # round's Dice
    best = _state(straight)["best_model"]["best_metric"]
    mean = sum(scores["mean"].values()) / 3
    assert mean == pytest.approx(best, abs=1e-4)


def _model(run_dir: Path) -> dict:
    return torch.load(run_dir / "models" / "model.pt", map_location="cpu", weights_only=True)


def _differs(a: dict, b: dict) -> bool:
    return any(
        not torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6) for k in a if a[k].is_floating_point()
    )


def test_weight_average_is_validated_saved_and_resumed_while_the_students_train_as_without_it(tmp_path, data, straight):
    """--ema_decay: the students' weights equal a run without it; model.pt is the average; resume keeps it."""
    ema = ["--ema_decay", "0.9"]
    run_bundle(tmp_path / "ema", CCT_R, data["rsl"], *RUN, *ema)
    state, plain = _state(tmp_path / "ema"), _state(straight)
    for name, value in plain["network"].items():
        torch.testing.assert_close(state["network"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    average = state["weight_average"]
    assert set(average) == set(state["network"]) and _differs(average, state["network"])
    assert "weight_average" not in plain

    part = tmp_path / "part"  # one validation round (iteration 2): it selects and saves the average
    run_bundle(part, CCT_R, data["rsl"], *RUN, *ema, "--max_epochs", "1")
    first = _state(part)
    saved = _model(part)
    assert not _differs(saved, first["weight_average"]) and _differs(saved, first["network"])
    run_bundle(part, CCT_R, data["rsl"], *RUN, *ema, "--resume", "true")
    for name, value in average.items():
        torch.testing.assert_close(_state(part)["weight_average"][name], value, rtol=1e-5, atol=1e-6, msg=name)
