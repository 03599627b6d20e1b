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


def _evaluates(run_dir: Path, datalist: str) -> None:
    """The plain inference + evaluation configs rebuild the variant's network from models/model_config.json."""
    report = run_dir / "report"
    run_bundle(
        run_dir,
        ["inference.yaml", "evaluate.yaml"],
        datalist,
        "--datalist_section",
        "validation",
        "--report_dir",
        str(report),
        "--output_dir",
        str(run_dir / "pred"),
        run_id="evaluating",
    )
    with open(report / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["class_name"] for r in rows} == {"RV", "myocardium", "LV"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)


def _training_outputs(run_dir: Path) -> Path:
    (folder,) = sorted((run_dir / "eval").glob("training_*"))  # one run, one folder of its own
    return folder


def _monitor(run_dir: Path) -> dict:
    history = json.loads((_training_outputs(run_dir) / "pseudo_label_dice.json").read_text())
    assert [r["iteration"] for r in history] == [2]
    return history[-1]["dice"]


@pytest.mark.parametrize(
    "variant, files, datalist, names, rsl",
    [
        ("cct_r_no_contrastive", ["variant_no_contrastive.yaml"], "rsl", ["cnn", "transformer"], True),
        ("cts", ["variant_cts.yaml"], "plain", ["cnn", "transformer"], False),
        ("cps", ["variant_cps.yaml"], "plain", ["unet_a", "unet_b"], False),
    ],
)
def test_two_student_variants(tmp_path, data, variant, files, datalist, names, rsl):
    run_bundle(tmp_path, ["train.yaml", *files], data[datalist], *ITERATIONS)
    state = _state(tmp_path)
    assert state["trainer"]["iteration"] == 2
    assert state["lr_scheduler"]["last_epoch"] == state["lr_scheduler_b"]["last_epoch"] == 2
    # the default Transformer rate is the U-Net's (5e-4); the cts baseline keeps the paper's 1e-4
    assert state["optimizer_b"]["param_groups"][0]["initial_lr"] == (0.0001 if variant == "cts" else 0.0005)
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
    config = json.loads((tmp_path / "models" / "model_config.json").read_text())
    assert config["variant"] == variant and set(config["networks"]) == {"a", "b"} and config["patch_size"] == [32, 32]
    assert (_training_outputs(tmp_path) / "curves.png").stat().st_size > 1000
    _evaluates(tmp_path, data[datalist])


@pytest.mark.parametrize("rsl", [False, True])
def test_uamt_variants(tmp_path, data, rsl):
    files = ["train.yaml", "variant_uamt_rsl.yaml" if rsl else "variant_uamt.yaml"]
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
    assert json.loads((tmp_path / "models" / "model_config.json").read_text())["branch"] == "a"  # the student
    _evaluates(tmp_path, data["plain"])


def test_fs_trains_on_labeled_and_true_labels(tmp_path, data):
    run_bundle(tmp_path, ["train.yaml", "variant_ls.yaml", "variant_fs.yaml"], data["plain"], *ITERATIONS)
    state = _state(tmp_path)
    assert state["trainer"]["iteration"] == 2
    model = _model(tmp_path)
    assert not any(k.startswith("net_") for k in model)  # a plain U-Net, served by inference.yaml
    assert not (_training_outputs(tmp_path) / "pseudo_label_dice.json").exists()
    assert set(json.loads((tmp_path / "models" / "model_config.json").read_text())["networks"]) == {"a"}
    _evaluates(tmp_path, data["plain"])


def test_ls_trains_one_unet_on_labeled_batches(tmp_path, data):
    run_bundle(tmp_path, ["train.yaml", "variant_ls.yaml"], data["plain"], *ITERATIONS)
    state = _state(tmp_path)
    assert state["trainer"]["iteration"] == 2 and "optimizer_b" not in state
    assert json.loads((tmp_path / "models" / "model_config.json").read_text())["variant"] == "ls"
    assert not (tmp_path / "registration").exists()  # no registration for a supervised baseline
    _evaluates(tmp_path, data["plain"])


REGISTRATION_FAST = [
    "--registration_workers",
    "0",
    "--registration_torch_settings#levels",
    "[6.0]",
    "--registration_torch_settings#iterations",
    "[10]",
    "--registration_torch_settings#num_points",
    "256",
    "--cl_num_anchors",
    "50",
    "--cl_num_negatives",
    "50",
]


@pytest.mark.parametrize(
    "overlay, variant, random_partner",
    [
        ([], "cct_r", False),  # the default: registration inside training (for REPS), SCL + REPS
        (["variant_cct_r.yaml"], "cct_r", False),  # the paper's settings pinned
        (["variant_no_reps.yaml"], "cct_r_no_reps", False),  # neither RSL nor REPS: no registration
        (["variant_no_brs.yaml"], "cct_r_no_brs", True),
        (["variant_mcsc.yaml"], "mcsc", False),
        (["variant_ssl4mis_unet.yaml"], "cct_r", False),  # the papers' U-Net as network A
    ],
)
def test_registration_variants_train_from_a_plain_datalist(tmp_path, data, overlay, variant, random_partner):
    """One command: registration (when the variant needs it), training, then the plain inference config."""
    run_bundle(tmp_path, ["train.yaml", *overlay], data["plain"], *ITERATIONS, *REGISTRATION_FAST)
    terms = _state(tmp_path)
    assert terms["trainer"]["iteration"] == 2
    folders = list((tmp_path / "registration").glob("*")) if (tmp_path / "registration").exists() else []
    assert len(folders) == (0 if variant in ("mcsc", "cct_r_no_reps") else 1)
    if folders:
        assert (folders[0] / ("rsl_datalist_random.json" if random_partner else "rsl_datalist.json")).exists()
    assert "contrastive" in terms  # SCL / MCSC projector heads are checkpointed
    assert json.loads((tmp_path / "models" / "model_config.json").read_text())["variant"] == variant
    _evaluates(tmp_path, data["plain"])


def test_training_tracks_with_mlflow(tmp_path, data):
    pytest.importorskip(
        "mlflow", reason="MLflow is a requirement, but a GPU image may lack it (benchmarks/gpu_check.sh)"
    )
    from mlflow.tracking import MlflowClient

    run_bundle(tmp_path, ["train.yaml", "variant_cts.yaml"], data["plain"], *ITERATIONS, "--tracking", "mlflow")
    client = MlflowClient(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "cct_r_cts"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert {"train_loss", "sup_a", "cps_b", "val_mean_dice", "val_dice_RV", "pseudo_dice_cnn"} <= set(run.data.metrics)
