"""The bundle's documented commands, end to end, on a tiny phantom.

Each command runs as a user would run it (``python -m monai.bundle run ...`` from the bundle root),
with overrides that keep it to seconds: a few phantom subjects, a 32x32 patch, a handful of
iterations.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.data.phantom import ensure_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--patch_size",
    "[32,32]",
    "--batch_size",
    "4",
    "--num_workers",
    "0",
    "--cache_num_workers",
    "0",
    "--swin_feature_size",
    "12",
    "--cl_num_anchors",
    "50",
    "--cl_num_negatives",
    "50",
    "--registration_workers",
    "1",
    "--registration_torch_settings#iterations",
    "[20,10]",
    "--registration_torch_settings#num_points",
    "512",
]
LS = "['configs/train.yaml','configs/variant_ls.yaml']"


def bundle(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def infer(bundle_root, *args: str) -> subprocess.CompletedProcess:
    """``run inference`` with the model of the run in ``bundle_root``."""
    return bundle(
        "run", "inference", "--config_file", "configs/inference.yaml", "--bundle_root", str(bundle_root), *args
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"command failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("phantom")
    return ensure_phantom_dataset(root, n_labeled=2, n_unlabeled=1, n_validation=1, n_test=2, seed=3)


def train(run_dir: Path, datalist: str, *extra: str, config: str = "configs/train.yaml") -> subprocess.CompletedProcess:
    return bundle(
        "run",
        "training",
        "--config_file",
        config,
        "--bundle_root",
        str(run_dir),
        "--datalist_file",
        datalist,
        "--num_iterations",
        "8",
        "--val_interval",
        "4",
        *FAST,
        *extra,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    ok(train(run_dir, phantom))
    return run_dir


def test_default_training_registers_then_trains_cct_r(trained):
    """The one command: registration first (with REPS partners), then the CNN + Transformer pair with RSL, SCL, REPS."""
    model = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in model.values()), "model.pt must be a flat state_dict"
    assert any(k.startswith("net_a.") for k in model) and any(k.startswith("net_b.swinViT") for k in model)
    state = torch.load(trained / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    assert {
        "network",
        "optimizer",
        "optimizer_b",
        "lr_scheduler",
        "trainer",
        "best_model",
        "rng",
        "contrastive",
        "curves",
    } <= set(state)
    assert state["trainer"]["iteration"] == 8
    assert state["best_model"]["best_metric"] is not None
    (reg,) = (trained / "registration").iterdir()  # one folder, named by the engine settings and the datalist content
    assert (reg / "rsl_datalist.json").exists() and (reg / "transforms.npz").exists()
    assert (reg / "qc_montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out,) = (trained / "eval").glob("training_*")
    assert (out / "runs").is_dir() and (out / "curves.png").stat().st_size > 5000  # TensorBoard logs, curves
    config = json.loads((trained / "models" / "model_config.json").read_text())
    assert config["variant"] == "cct_r" and config["patch_size"] == [32, 32]


def test_second_training_run_reuses_the_registration(tmp_path, phantom, trained):
    import shutil

    run = tmp_path / "again"
    shutil.copytree(trained / "registration", run / "registration")
    proc = ok(train(run, phantom, "--max_epochs", "1"))
    log = proc.stdout + proc.stderr
    assert "reusing" in log and "pair/s" not in log  # no registration progress bar: nothing registered


def test_resume_equals_uninterrupted_run(tmp_path, phantom):
    """8 iterations straight == 4 iterations, stop, resume, 4 more (same weights); the LS baseline."""
    straight_dir, split = tmp_path / "straight", tmp_path / "split"
    ok(train(straight_dir, phantom, config=LS))
    ok(train(split, phantom, "--max_epochs", "1", config=LS))
    first = torch.load(split / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    assert first["trainer"]["iteration"] == 4
    ok(train(split, phantom, "--resume", "true", config=LS))
    resumed = torch.load(split / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    straight = torch.load(straight_dir / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    assert resumed["trainer"]["iteration"] == 8
    for name, value in straight["network"].items():
        torch.testing.assert_close(resumed["network"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed["lr_scheduler"]["last_epoch"] == straight["lr_scheduler"]["last_epoch"] == 8


def _oblique_volume(path: Path, shape=(30, 26, 5), axis_order=(0, 1, 2)) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.random(shape).astype(np.float32)
    t = np.deg2rad(25)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    spacing = np.array([1.3, 1.7, 8.0])[list(axis_order)]
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-12.5, 40.0, 7.25]
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return affine


def test_inference_keeps_shape_and_affine_of_any_input(tmp_path, trained):
    inputs = tmp_path / "in"
    inputs.mkdir()
    affines = {
        "oblique.nii.gz": _oblique_volume(inputs / "oblique.nii.gz"),
        # slices along the first axis (through-plane spacing on axis 0)
        "axis0.nii.gz": _oblique_volume(inputs / "axis0.nii.gz", shape=(5, 30, 26), axis_order=(2, 0, 1)),
    }
    out = tmp_path / "out"
    proc = ok(infer(str(trained), "--input_dir", str(inputs), "--output_dir", str(out)))
    assert f"written to {out}" in proc.stdout + proc.stderr  # says where
    for name, affine in affines.items():
        src = nib.load(inputs / name)
        pred = nib.load(out / name.replace(".nii.gz", "_seg.nii.gz"))
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
    assert not [f for f in os.listdir(out) if f.startswith(".")], "temporary files left behind"


def test_inference_rejects_2d_input_naming_the_file(tmp_path, trained):
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(inputs / "flat.nii.gz"))
    proc = infer(str(trained), "--input_dir", str(inputs), "--output_dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "flat.nii.gz" in proc.stderr
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_evaluate_writes_per_case_and_summary(tmp_path, phantom, trained):
    report = tmp_path / "report"
    ok(
        bundle(
            "run",
            "evaluating",
            "--config_file",
            "['configs/inference.yaml','configs/evaluate.yaml']",
            "--bundle_root",
            str(trained),
            "--datalist_file",
            phantom,
            "--datalist_section",
            "test",
            "--report_dir",
            str(report),
            "--output_dir",
            str(tmp_path / "pred"),
        )
    )
    with open(report / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["class_name"] for r in rows} == {"RV", "myocardium", "LV"}
    assert len({r["case"] for r in rows}) == 2  # the two test subjects
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
        assert float(r["hd95_mm"]) >= 0.0 and float(r["hd95_vox"]) >= 0.0
    assert (report / "metrics_summary.csv").exists() and (report / "metrics_summary.md").exists()


def test_training_stops_on_bad_datalist_before_caching(tmp_path, phantom):
    import json

    bad = json.loads(Path(phantom).read_text())
    base = Path(phantom).parent
    bad["training"][0]["label"] = str(base / "labelsTr" / "does_not_exist.nii.gz")
    for section in ("training", "unlabeled", "validation", "test"):
        for e in bad[section]:
            for k in ("image", "label", "true_label"):
                if k in e and not os.path.isabs(e[k]):
                    e[k] = str(base / e[k])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    proc = train(tmp_path / "run", str(path))
    assert proc.returncode != 0
    assert "does_not_exist.nii.gz" in proc.stderr
    assert "Loading dataset" not in proc.stderr  # failed before any volume was cached
    assert not (tmp_path / "run" / "registration").exists()  # ... or registered
    assert not (tmp_path / "run" / "models" / "model.pt").exists()
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr  # one readable message


def test_num_iterations_is_trained_exactly(tmp_path, phantom):
    """5 iterations with val_interval 2: rounds of 2, 2 and 1; the LR schedule ends where training ends."""
    proc = ok(
        bundle(
            "run",
            "training",
            "--config_file",
            "configs/train.yaml",
            "--bundle_root",
            str(tmp_path),
            "--datalist_file",
            phantom,
            "--num_iterations",
            "5",
            "--val_interval",
            "2",
            *FAST,
        )
    )
    state = torch.load(tmp_path / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    assert state["trainer"]["iteration"] == 5
    assert state["lr_scheduler"]["last_epoch"] == 5
    assert "a last round of 1" in proc.stdout + proc.stderr


def _phantom_folders(phantom: str) -> tuple[Path, Path]:
    root = Path(phantom).parent
    return root / "imagesTr", root / "labelsTr"


def test_evaluate_plain_folders_writes_its_own_run_folder_and_pictures(phantom, trained):
    images, labels = _phantom_folders(phantom)
    runs = []
    for _ in range(2):
        proc = ok(
            bundle(
                "run",
                "evaluating",
                "--config_file",
                "['configs/inference.yaml','configs/evaluate.yaml']",
                "--bundle_root",
                str(trained),
                "--image_dir",
                str(images),
                "--label_dir",
                str(labels),
            )
        )
        assert "reports written to" in proc.stdout + proc.stderr
        runs.append(sorted((trained / "eval").glob("evaluation_*")))
    assert len(runs[1]) == len(runs[0]) + 1  # a second evaluation never overwrites the first
    out = runs[1][-1]
    with open(out / "metrics_per_case.csv") as f:
        cases = {r["case"] for r in csv.DictReader(f)}
    assert len(cases) == len(list(images.glob("*.nii.gz")))  # every image of the folder, matched to its label
    for png in [out / "dice_per_class.png", *sorted((out / "overlays").glob("*.png"))]:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert len(list((out / "overlays").glob("*.png"))) == len(cases)
    assert len(list((out / "predictions").glob("*_seg.nii.gz"))) == len(cases)


def test_evaluate_refuses_images_without_labels(tmp_path, phantom, trained):
    images, labels = _phantom_folders(phantom)
    partial = tmp_path / "labels"
    partial.mkdir()
    first = sorted(labels.glob("*.nii.gz"))[0]
    (partial / first.name).write_bytes(first.read_bytes())
    proc = bundle(
        "run",
        "evaluating",
        "--config_file",
        "['configs/inference.yaml','configs/evaluate.yaml']",
        "--bundle_root",
        str(trained),
        "--image_dir",
        str(images),
        "--label_dir",
        str(partial),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert proc.returncode != 0 and "no label for this image" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("**/*.nii.gz"))  # refused before any work


def test_inference_refuses_a_model_that_does_not_fit_its_description(tmp_path, phantom, trained):
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained / "models" / "model.pt", models / "model.pt")
    config = json.loads((trained / "models" / "model_config.json").read_text())
    config["networks"] = {"a": config["networks"]["a"]}  # says: one U-Net (an LS model)
    (models / "model_config.json").write_text(json.dumps(config))
    proc = infer(str(tmp_path), "--input_dir", str(_phantom_folders(phantom)[0]))
    assert proc.returncode != 0 and "does not fit the network" in proc.stderr and "Traceback" not in proc.stderr


def test_inference_refuses_another_patch_size(tmp_path, trained):
    proc = infer(str(trained), "--patch_size", "[64,64]", "--output_dir", str(tmp_path / "out"))
    assert proc.returncode != 0 and "trained at" in proc.stderr


def test_unwritable_output_is_refused_before_any_work(tmp_path, trained):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = infer(str(trained), "--output_dir", str(blocker / "predictions"))
    assert proc.returncode != 0 and "cannot write output there" in proc.stderr and str(blocker) in proc.stderr
    assert "Traceback" not in proc.stderr and "Loading" not in proc.stdout  # nothing was loaded or segmented


def test_datalist_tool_user_mistakes_are_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.data.datalist",
            "folder",
            "--images",
            str(tmp_path / "nope"),
            "--labels",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.json"),
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: image folder {tmp_path / 'nope'} is not a folder"


def test_refused_input_leaves_no_output_folder_behind(tmp_path, trained):
    """A constant image (no anatomy) is refused with one line naming it, and neither --output_dir nor an
    automatic eval/inference_* folder is left behind empty."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(
        nib.Nifti1Image(np.zeros((20, 18, 5), np.float32), np.diag([1.5, 1.5, 8.0, 1.0])), str(inputs / "empty.nii.gz")
    )
    out = tmp_path / "out"
    proc = infer(str(trained), "--input_dir", str(inputs), "--output_dir", str(out))
    assert proc.returncode != 0 and "empty.nii.gz: image is constant" in proc.stderr
    assert not out.exists()
    before = sorted((trained / "eval").glob("inference_*"))
    proc = infer(str(trained), "--input_dir", str(inputs))
    assert proc.returncode != 0 and sorted((trained / "eval").glob("inference_*")) == before


def test_weights_without_their_description_are_refused(tmp_path, trained):
    """model.pt without model_config.json would be rebuilt as the built-in default network: refused, unless
    --model_config_file names the description."""
    import shutil

    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    shutil.copy(trained / "models" / "model.pt", root / "models" / "model.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    _oblique_volume(inputs / "case.nii.gz")
    proc = infer(str(root), "--input_dir", str(inputs))
    assert (
        proc.returncode != 0
        and "has no model description beside it" in proc.stderr
        and "--model_config_file" in proc.stderr
    )
    ok(
        infer(
            str(root),
            "--input_dir",
            str(inputs),
            "--model_config_file",
            str(trained / "models" / "model_config.json"),
            "--output_dir",
            str(tmp_path / "out"),
        )
    )
    assert (tmp_path / "out" / "case_seg.nii.gz").exists()


def test_inference_keeps_the_largest_piece_of_each_class_unless_asked_not_to(tmp_path, trained):
    assert json.loads((trained / "models" / "model_config.json").read_text())["largest_component"] is True
    outputs = {}
    for name, extra in (("default", []), ("raw", ["--largest_component", "false"])):
        ok(infer(str(trained), "--output_dir", str(tmp_path / name), *extra))
        outputs[name] = {
            p.name: np.asarray(nib.load(p).dataobj) for p in sorted((tmp_path / name).glob("*_seg.nii.gz"))
        }
    assert outputs["default"] and outputs["default"].keys() == outputs["raw"].keys()
    for case, kept in outputs["default"].items():
        raw = outputs["raw"][case]
        for c in (1, 2, 3):
            assert ndimage.label(kept == c, structure=np.ones((3, 3, 3)))[1] <= 1, (case, c)
            assert not ((kept == c) & (raw != c)).any(), (case, c)  # only removes voxels of a class
