"""The synthetic abdominal CT phantom, and the whole CT path on it (deformable registration inside CCT-R
training, inference with no flags, evaluation) through the bundle's commands with the Synapse overlay."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.ct_phantom import ensure_ct_phantom_dataset
from scripts.data.phantom import PhantomDatasetError
from scripts.registration.store import TransformStore
from tests.cross_teaching_fixtures import ROOT


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return Path(
        ensure_ct_phantom_dataset(
            tmp_path_factory.mktemp("ct") / "ct_phantom", n_labeled=2, n_unlabeled=2, n_validation=1, seed=1
        )
    )


def test_ct_phantom_is_synapse_like_and_deterministic(ct, tmp_path):
    datalist = json.loads(ct.read_text())
    assert datalist["modality"] == "CT" and len(datalist["labels"]) == 9
    mapping = dict(zip(datalist["label_mapping"]["orig"], datalist["label_mapping"]["target"]))
    entry = datalist["training"][0]
    img = nib.load(ct.parent / entry["image"])
    image, label = np.asarray(img.dataobj), np.asarray(nib.load(ct.parent / entry["label"]).dataobj)
    zooms = img.header.get_zooms()
    assert image.dtype == np.int16 and zooms[2] > 1.5 * zooms[0]  # HU, anisotropic, slice axis 2
    assert image.min() < -900 and 150 < np.percentile(image[label == 8], 50) < 250  # air, contrast-enhanced aorta
    raw = set(np.unique(label).tolist())
    assert {1, 2, 3, 4, 6, 7, 8, 11} <= raw and 9 in raw  # the eight organs + the IVC (raw BTCV numbering)
    mapped = set(mapping[v] for v in raw)
    assert mapped == set(range(9)) and mapping[9] == 0  # 13 -> 8: every organ present, the IVC is background
    again = ensure_ct_phantom_dataset(tmp_path / "again", n_labeled=2, n_unlabeled=2, n_validation=1, seed=1)
    assert np.array_equal(np.asarray(nib.load(Path(again).parent / entry["image"]).dataobj), image)
    with pytest.raises(PhantomDatasetError, match="not a CT phantom"):
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "notes.txt").write_text("mine")
        ensure_ct_phantom_dataset(tmp_path / "foreign")


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=ROOT, capture_output=True, text=True
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def test_ct_default_path_trains_infers_and_evaluates(ct, tmp_path):
    fast = [
        "--patch_size",
        "[64,64]",
        "--batch_size",
        "4",
        "--num_iterations",
        "2",
        "--val_interval",
        "2",
        "--num_workers",
        "0",
        "--cache_num_workers",
        "0",
        "--swin_feature_size",
        "12",
        "--registration_workers",
        "1",
        "--registration_torch_settings#iterations",
        "[8,4]",
        "--registration_torch_settings#num_points",
        "512",
        "--registration_torch_settings#field_iterations",
        "4",
    ]
    bundle = ["--bundle_root", str(tmp_path)]
    _run(
        "training",
        "--config_file",
        "['configs/train.yaml','configs/dataset_synapse.yaml']",
        "--datalist_file",
        str(ct),
        *bundle,
        *fast,
    )
    folders = [p for p in (tmp_path / "registration").iterdir() if p.is_dir()]
    assert len(folders) == 1 and json.loads((folders[0] / "settings.json").read_text())["deformable"] is True
    table = TransformStore(folders[0]).load()
    ok = [table.get(f, m) for f, m, s in zip(table.fixed_ids, table.moving_ids, table.status) if s == "ok"]
    assert ok and all(not t.is_affine for t in ok)  # affine + deformable by default for CT
    config = json.loads((tmp_path / "models" / "model_config.json").read_text())
    assert config["label_mapping"]["target"][9] == 0 and len(config["class_names"]) == 9
    # the registration-only baseline scores the mapped organs (raw 13 labels mapped before scoring): every
    # organ is present in every validation label, none is scored on an empty class
    baseline = json.loads((folders[0] / "baseline" / "baseline.json").read_text())
    organs = [c for c in baseline["brs"]["per_class"] if c["class"] != "mean"]
    assert [c["class_name"] for c in organs] == [
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "liver",
        "stomach",
        "aorta",
        "pancreas",
    ]
    assert all(c["n_gt_empty"] == 0 for c in organs), organs

    entries = json.loads(ct.read_text())["validation"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for e in entries:
        (inputs / Path(e["image"]).name).symlink_to(ct.parent / e["image"])
    _run(
        "inference",
        "--config_file",
        "configs/inference.yaml",
        "--input_dir",
        str(inputs),
        *bundle,
        "--output_dir",
        str(tmp_path / "segs"),
    )
    segs = sorted((tmp_path / "segs").glob("*_seg.nii.gz"))
    assert len(segs) == len(entries)
    seg = np.asarray(nib.load(segs[0]).dataobj)
    assert seg.shape == nib.load(ct.parent / entries[0]["image"]).shape and seg.max() <= 8

    _run(
        "evaluating",
        "--config_file",
        "['configs/inference.yaml','configs/evaluate.yaml']",
        "--datalist_file",
        str(ct),
        "--datalist_section",
        "validation",
        *bundle,
        "--output_dir",
        str(tmp_path / "evaluation"),
    )
    with open(tmp_path / "evaluation" / "metrics_per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["class_name"] for r in rows} == {
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "liver",
        "stomach",
        "aorta",
        "pancreas",
    }
    assert all(r["gt_empty"] == "False" for r in rows)  # labels mapped 13 -> 8 before scoring: every organ present
