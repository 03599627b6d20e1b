"""End to end on a tiny phantom: the config runs, rsl_datalist.json has what RSL needs, baseline is scored."""

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

import scripts.data.phantom as phantom
from scripts.data.datalist import load_datalist

REPO = Path(__file__).resolve().parents[1]


def test_config_run_writes_rsl_datalist_and_baseline(tmp_path, monkeypatch, caplog):
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="scripts.registration.runner")
    monkeypatch.chdir(tmp_path)  # the default bundle_root is "." (run from the bundle root)
    datalist = phantom.ensure_phantom_dataset(tmp_path / "ph", n_labeled=2, n_unlabeled=2, n_validation=1, n_test=0)
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "registration.yaml"))
    parser["bundle_root"] = "."
    parser["datalist_file"] = datalist
    parser["torch_settings"]["levels"] = [6.0]
    parser["torch_settings"]["iterations"] = [15]
    parser["torch_settings"]["num_points"] = 512
    parser["registration_runner"]["progress"] = False
    parser["registration_runner"]["random_partner_datalist"] = True
    runner = parser.get_parsed_content("registration_runner")
    summary = runner.run()
    out = Path(summary["output_dir"])
    assert f"registration: writing {out}" in caplog.text  # the log names the folder it writes, as when it reuses one
    assert out.resolve().parent == tmp_path / "registration" and out.name.startswith("torch_affine_")
    assert summary["pairs"] == 2 * 2 * 2 + 2 * 1 * 2  # labeled <-> unlabeled and labeled <-> validation
    rsl = json.loads((out / "rsl_datalist.json").read_text())
    labeled_ids = {e["id"] for e in load_datalist(datalist, "training")}
    images = {e["id"]: e["image"] for e in load_datalist(datalist, "unlabeled")}
    assert len(rsl["unlabeled"]) == 2 and rsl["training"] == load_datalist(datalist, "training")
    # registered labels are stored relative to the datalist's folder, so the folder can move
    assert all(not Path(e["registered_label"]).is_absolute() for e in rsl["unlabeled"])
    moved = tmp_path / "elsewhere"
    (out.resolve()).rename(moved)
    for entry in load_datalist(moved / "rsl_datalist.json", "unlabeled"):
        assert entry["partner"] in labeled_ids and isinstance(entry["brs_score"], float)
        reg, img = nib.load(entry["registered_label"]), nib.load(images[entry["id"]])
        assert reg.shape == img.shape and np.allclose(reg.affine, img.affine, atol=1e-4)
        assert set(np.unique(np.asarray(reg.dataobj))) <= {0, 1, 2, 3}
        assert np.asarray(reg.dataobj).any()
    moved.rename(out.resolve())
    # the no-BRS ablation datalist: a labeled partner for every unlabeled volume, its label on disk
    rand = load_datalist(out / "rsl_datalist_random.json", "unlabeled")
    assert [e["id"] for e in rand] == [e["id"] for e in rsl["unlabeled"]]
    assert all(e["partner"] in labeled_ids and Path(e["registered_label"]).exists() for e in rand)
    base = json.loads((out / "baseline" / "baseline.json").read_text())
    assert base["brs"]["cases"] == 1 and 0.0 <= base["brs"]["mean_dice"] <= 1.0
    assert (out / "baseline" / "brs" / "metrics_summary.csv").exists()
    assert (out / "transforms.npz").exists() and not (out / "batches").exists()
    # a second run reuses every stored pair
    runner.engine.register_batch = None  # would fail if called
    assert runner.run()["pairs"] == summary["pairs"]


def test_plan_pairs_covers_rsl_reps_and_baseline_needs():
    from scripts.registration.pairs import plan_pairs

    ent = lambda i: {"id": i, "image": f"{i}.nii.gz"}  # noqa: E731
    lab, unl, ev = [ent("q1"), ent("q2")], [ent("u1"), ent("u2"), ent("u3")], [ent("v1")]
    keys = {p.key for p in plan_pairs(lab, unl, ev)}
    assert len(keys) == 2 * 3 * 2 + 2 * 1 * 2
    assert ("u1", "q2") in keys and ("q2", "u1") in keys and ("v1", "q1") in keys and ("u1", "u2") not in keys
    all_pairs = {p.key for p in plan_pairs(lab, unl, ev, reps_partners="all")}
    assert len(all_pairs) == 16 + (5 * 4 - 12) and ("u1", "u2") in all_pairs
    k1 = plan_pairs(lab, unl, [], reps_partners=1, seed=3)
    assert k1 == plan_pairs(lab, unl, [], reps_partners=1, seed=3)  # deterministic
    for p in k1:
        assert (p.moving_id, p.fixed_id) in {q.key for q in k1}  # both directions


def test_run_registration_checks_its_inputs_first(tmp_path, monkeypatch):
    """A missing image stops 'run registration' with its name before any pair is registered."""
    import subprocess
    import sys

    datalist = phantom.ensure_phantom_dataset(tmp_path / "ph", n_labeled=1, n_unlabeled=2, n_validation=0, n_test=0)
    data = json.loads(Path(datalist).read_text())
    data["unlabeled"][1]["image"] = "imagesTr/missing.nii.gz"
    bad = tmp_path / "ph" / "bad.json"
    bad.write_text(json.dumps(data))
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "registration",
            "--config_file",
            "configs/registration.yaml",
            "--bundle_root",
            str(tmp_path),
            "--datalist_file",
            str(bad),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "missing.nii.gz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "registration").exists()


def test_ct_label_mapping_reaches_registration_and_training(tmp_path):
    """Synapse: raw label values (up to 13) are propagated and voted over all their values, and training
    maps every label key to the 8 organs, with deformable registration on."""
    mapping = {
        "orig": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
        "target": [0, 1, 2, 3, 4, 0, 0, 5, 0, 0, 0, 6, 7, 8],
    }
    datalist = tmp_path / "synapse.json"
    datalist.write_text(json.dumps({"label_mapping": mapping, "training": [], "validation": []}))
    reg = ConfigParser()
    reg.read_config([str(REPO / "configs" / "registration.yaml"), str(REPO / "configs" / "dataset_synapse.yaml")])
    reg["datalist_file"] = str(datalist)
    assert reg.get_parsed_content("registration_runner#num_classes") is None  # max raw value + 1, not 9
    train = ConfigParser()
    train.read_config([str(REPO / "configs" / "train.yaml"), str(REPO / "configs" / "dataset_synapse.yaml")])
    train["datalist_file"] = str(datalist)
    assert train.get_parsed_content("registration_stage#num_classes") is None
    assert train.get_parsed_content("registration_torch_settings#deformable") is True
    transform = train.get_parsed_content("label_transform")
    raw = {k: torch.tensor([[[[11.0, 6.0, 13.0]]]]) for k in ("label", "registered_label")}
    out = transform(raw)
    assert out["label"].flatten().tolist() == out["registered_label"].flatten().tolist() == [6.0, 0.0, 8.0]
    assert train.get_parsed_content("model_config#label_mapping") == mapping


def test_label_propagation_on_worker_processes_writes_what_one_process_writes(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    datalist = phantom.ensure_phantom_dataset(tmp_path / "ph", n_labeled=2, n_unlabeled=3, n_validation=0, n_test=0)
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "registration.yaml"))
    parser["datalist_file"] = datalist
    parser["torch_settings"]["levels"] = [6.0]
    parser["torch_settings"]["iterations"] = [15]
    parser["torch_settings"]["num_points"] = 512
    parser["registration_runner"]["progress"] = False
    runner = parser.get_parsed_content("registration_runner")
    out = Path(runner.run()["output_dir"])
    from scripts.data.run_folders import _LOCKS

    assert str(out.resolve()) not in _LOCKS  # the folder's lock ends with the registration (a training may follow)
    labels = out / "registered_labels"
    serial = {p.name: np.asarray(nib.load(p).dataobj) for p in labels.glob("*.nii.gz")}
    assert len(serial) == 3
    for name in ("summary.json", "rsl_datalist.json"):  # the outputs again, from the stored pairs
        (out / name).unlink()
    for p in labels.glob("*.nii.gz"):
        p.unlink()
    runner.workers = 2
    runner.engine.register_batch = None  # every pair is stored: nothing is registered again

    def in_this_process(*args, **kwargs):
        raise AssertionError("a label was warped in the main process")

    monkeypatch.setattr("scripts.registration.propagation.propagate_label", in_this_process)  # the workers spawn fresh
    runner.run()
    parallel = {p.name: np.asarray(nib.load(p).dataobj) for p in labels.glob("*.nii.gz")}
    assert parallel.keys() == serial.keys()
    assert all(np.array_equal(parallel[k], serial[k]) for k in serial)
