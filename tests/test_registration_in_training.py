"""Registration as the first step of training: when it runs, where it writes, reuse, resume, the two-step path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

import scripts.data.phantom as phantom
from scripts.registration.in_training import RegistrationSetupError, TrainingRegistration
from scripts.registration.runner import RegistrationRunner
from scripts.registration.store import TransformStore

ROOT = Path(__file__).resolve().parents[1]
FAST_SETTINGS = {"levels": [6.0], "iterations": [10], "num_points": 256}

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> str:
    return phantom.ensure_phantom_dataset(
        tmp_path_factory.mktemp("ph"), n_labeled=2, n_unlabeled=2, n_validation=1, n_test=0, seed=5
    )


def _stage(datalist: str, root: Path, **kwargs) -> TrainingRegistration:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    settings = {**parser.get_parsed_content("registration_torch_settings", instantiate=False), **FAST_SETTINGS}
    settings["deformable"] = False
    defaults = dict(
        engine="torch",
        engine_settings=settings,
        workers=0,
        num_threads=1,
        num_classes=4,
        progress=False,
        evaluation_sections=[],
        montage=False,
    )
    return TrainingRegistration(datalist, root, **{**defaults, **kwargs})


def _count_registered_pairs(monkeypatch) -> list[int]:
    """Record, per registration call, how many pairs were actually left to register (not in the store)."""
    calls = []
    original = RegistrationRunner.register

    def counting(self, pairs=None, max_batches=None):
        done = TransformStore(self.output_dir, self.settings).done()
        calls.append(sum(p.key not in done for p in (pairs if pairs is not None else self.plan())))
        return original(self, pairs, max_batches)

    monkeypatch.setattr(RegistrationRunner, "register", counting)
    return calls


def test_train_yaml_and_registration_yaml_share_engine_settings():
    """The same settings give the same folder: 'run registration' and training reuse each other's pairs."""
    train, reg = ConfigParser(), ConfigParser()
    train.read_config(str(ROOT / "configs" / "train.yaml"))
    reg.read_config(str(ROOT / "configs" / "registration.yaml"))
    assert train.get_parsed_content("registration_torch_settings") == reg.get_parsed_content("torch_settings")
    sitk_train = train.get_parsed_content("registration_sitk_settings")
    sitk_reg = reg.get_parsed_content("sitk_settings")
    assert {k: v for k, v in sitk_train.items() if k != "threads"} == {
        k: v for k, v in sitk_reg.items() if k != "threads"
    }
    assert train.get_parsed_content("registration_brs") == reg.get_parsed_content("brs")


def test_registers_when_needed_then_reuses(tmp_path, datalist, monkeypatch):
    calls = _count_registered_pairs(monkeypatch)
    stage = _stage(datalist, tmp_path / "registration", montage=True)
    out = Path(stage.datalist)
    assert out.name == "rsl_datalist.json" and out.parent.parent == tmp_path / "registration"
    assert Path(stage.registration_dir) == out.parent
    entries = json.loads(out.read_text())["unlabeled"]
    assert all(e["registered_label"] and e["partner"] for e in entries)
    assert (out.parent / "qc_montage.png").read_bytes()[:4] == b"\x89PNG"
    assert calls == [2 * 2 * 2]  # labeled <-> unlabeled, both ways
    # a second run (here: a second training run's stage) registers nothing
    again = _stage(datalist, tmp_path / "registration")
    assert again.datalist == stage.datalist and len(calls) == 1


def test_folder_is_keyed_by_content_not_file_name(tmp_path, datalist):
    first = _stage(datalist, tmp_path / "registration")
    renamed = tmp_path / "another_name.json"
    data = json.loads(Path(datalist).read_text())
    base = Path(datalist).parent
    for section in ("training", "unlabeled", "validation"):
        for e in data.get(section, []):
            for k in ("image", "label", "true_label"):
                if k in e:
                    e[k] = str(base / e[k])
    renamed.write_text(json.dumps(data))
    assert Path(_stage(str(renamed), tmp_path / "registration").registration_dir) == Path(first.registration_dir)
    data["unlabeled"] = data["unlabeled"][:1]  # other volumes: another folder
    renamed.write_text(json.dumps(data))
    assert Path(_stage(str(renamed), tmp_path / "registration").registration_dir) != Path(first.registration_dir)


def test_a_killed_registration_resumes_with_the_pairs_it_had(tmp_path, datalist, monkeypatch):
    stage = _stage(datalist, tmp_path / "registration")
    runner = RegistrationRunner(
        datalist,
        tmp_path / "registration",
        engine="torch",
        batch_size=3,
        progress=False,
        engine_settings=stage.runner_kwargs["engine_settings"],
        evaluation_sections=[],
    )
    runner.register(max_batches=1)  # killed after one committed batch of 3 pairs
    calls = _count_registered_pairs(monkeypatch)
    assert Path(stage.datalist).exists() and Path(stage.registration_dir) == runner.output_dir
    assert calls == [2 * 2 * 2 - 3]  # the 3 stored pairs were not registered again


def test_registration_dir_and_two_step_path(tmp_path, datalist):
    done = _stage(datalist, tmp_path / "registration")
    folder = Path(done.registration_dir)
    given = _stage(datalist, tmp_path / "elsewhere", registration_dir=str(folder))
    assert Path(given.datalist) == folder / "rsl_datalist.json" and not (tmp_path / "elsewhere").exists()
    # a datalist that already carries registered labels is used as it is (its folder holds the transforms)
    two_step = _stage(str(folder / "rsl_datalist.json"), tmp_path / "elsewhere", reps=True)
    assert two_step.datalist == str(folder / "rsl_datalist.json") and Path(two_step.registration_dir) == folder
    with pytest.raises(RegistrationSetupError, match="rsl_datalist.json"):
        _ = _stage(datalist, tmp_path / "x", registration_dir=str(tmp_path)).datalist


def test_registration_dir_of_another_datalist_is_refused(tmp_path, datalist):
    """A folder made from another split (here: one labeled volume moved to the unlabeled half) would replace the
    datalist asked for; it is refused by name before any training."""
    folder = Path(_stage(datalist, tmp_path / "registration").registration_dir)
    data = json.loads(Path(datalist).read_text())
    moved = data["training"].pop()
    data["unlabeled"].append({"image": moved["image"]})
    other = Path(datalist).parent / "other_split.json"
    other.write_text(json.dumps(data))
    with pytest.raises(
        RegistrationSetupError, match="'training' volumes differ from those of .*other_split.json: 1 not in"
    ):
        _ = _stage(str(other), tmp_path / "elsewhere", registration_dir=str(folder)).datalist
    assert not (tmp_path / "elsewhere").exists()


def test_no_registration_without_rsl_or_reps(tmp_path, datalist):
    stage = _stage(datalist, tmp_path / "registration", rsl=False, reps=False)
    assert stage.datalist == datalist and stage.registration_dir is None
    assert not (tmp_path / "registration").exists()


def test_reps_refuses_registered_labels_without_transforms(tmp_path, datalist):
    data = json.loads(Path(datalist).read_text())
    for e in data["unlabeled"]:
        e["registered_label"] = None
    hand_made = tmp_path / "hand_made.json"
    base = Path(datalist).parent
    for section in ("training", "unlabeled", "validation"):
        for e in data.get(section, []):
            for k in ("image", "label", "true_label"):
                if e.get(k):
                    e[k] = str(base / e[k])
    hand_made.write_text(json.dumps(data))
    with pytest.raises(RegistrationSetupError, match="transforms.npz"):
        _ = _stage(str(hand_made), tmp_path / "registration", reps=True).datalist


def test_registration_leaves_the_training_thread_count_alone(tmp_path, datalist):
    """Registering in this process with 1 thread per pair must not leave training single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _ = _stage(datalist, tmp_path / "registration", num_threads=1).datalist
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rsl_partners_votes_the_k_best_partners_labels(tmp_path, monkeypatch):
    """--rsl_partners 3: RSL reads rsl_datalist_top3.json, whose label is the vote of the 3 best BRS partners."""
    import nibabel as nib
    import numpy as np

    from scripts.registration.propagation import majority_vote

    data = phantom.ensure_phantom_dataset(
        tmp_path / "ph3", n_labeled=3, n_unlabeled=2, n_validation=0, n_test=0, seed=7
    )
    calls = _count_registered_pairs(monkeypatch)
    single = _stage(data, tmp_path / "registration")
    assert Path(single.datalist).name == "rsl_datalist.json"
    stage = _stage(data, tmp_path / "registration", rsl_partners=3)
    out = Path(stage.datalist)
    assert out.name == "rsl_datalist_top3.json" and out.parent == Path(single.datalist).parent
    assert calls == [2 * 3 * 2, 0]  # the vote reuses the pairs BRS registered
    brs = json.loads((out.parent / "brs.json").read_text())
    best = {e["id"]: e for e in json.loads(Path(single.datalist).read_text())["unlabeled"]}
    changed = 0
    for entry in json.loads(out.read_text())["unlabeled"]:
        ranked = [s["partner"] for s in brs[entry["id"]]]
        assert entry["partners"] == ranked[:3] and entry["partner"] == best[entry["id"]]["partner"] == ranked[0]
        assert entry["brs_score"] == best[entry["id"]]["brs_score"]
        warped = [
            np.asarray(nib.load(out.parent / "registered_labels" / f"{entry['id']}__from__{p}.nii.gz").dataobj)
            for p in ranked[:3]
        ]
        fused = np.asarray(nib.load(out.parent / entry["registered_label"]).dataobj)
        np.testing.assert_array_equal(fused, majority_vote(warped, 4))
        # where the two runners-up agree against the best partner, the vote follows them
        outvoted = (warped[1] == warped[2]) & (warped[0] != warped[1])
        np.testing.assert_array_equal(fused[outvoted], warped[1][outvoted])
        changed += int(outvoted.sum())
    assert changed > 0  # the vote differs from the best partner's label somewhere
    for bad in (0, 2):
        with pytest.raises(RegistrationSetupError, match="rsl_partners"):
            _stage(data, tmp_path / "registration", rsl_partners=bad)
