"""Datalist loader and builders (scripts/data/datalist.py), on tiny fake data trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.data.atomic_io import save_nifti
from scripts.data.datalist import (
    SPLITS_DIR,
    DatalistError,
    build_acdc,
    build_folder,
    build_synapse,
    load_datalist,
    load_datalist_info,
    main,
    read_datalist,
)

ACDC_SPLIT = json.loads((SPLITS_DIR / "acdc.json").read_text())
SYNAPSE_SPLIT = json.loads((SPLITS_DIR / "synapse.json").read_text())


def touch(path: Path) -> Path:
    """The ACDC / Synapse builders only look at file names: empty files are enough."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def nifti(path: Path, values: np.ndarray | None = None, seed: int = 0) -> Path:
    """A small real NIfTI volume (8x8x3)."""
    if values is None:
        values = np.random.default_rng(seed).random((8, 8, 3)).astype(np.float32)
    save_nifti(values, np.diag([1.5, 1.5, 8.0, 1.0]), path)
    return path


def fake_acdc(root: Path, patients, frames=("01", "12"), gt=True) -> Path:
    for p in patients:
        for f in frames:
            touch(root / p / f"{p}_frame{f}.nii.gz")
            if gt:
                touch(root / p / f"{p}_frame{f}_gt.nii.gz")
        touch(root / p / f"{p}_4d.nii.gz")  # the original download has these too: not frames
        (root / p / "Info.cfg").write_text("ED: 1\nES: 12\n")
    return root


def ids(data: dict, section: str) -> list[str]:
    return [e["id"] for e in data[section]]


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------


def test_load_datalist_resolves_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    dl = tmp_path / "sub" / "dl.json"
    dl.write_text(
        json.dumps(
            {
                "name": "x",
                "modality": "MRI",
                "labels": {"0": "bg", "1": "fg"},
                "training": [{"id": "a", "image": "img/a.nii.gz", "label": "../lab/a.nii.gz", "weight": "heavy"}],
                "unlabeled": [
                    {
                        "id": "b",
                        "image": "/abs/b.nii.gz",
                        "true_label": "lab/b.nii.gz",
                        "moving_image": "m.nii.gz",
                        "warped_label": "w.nii.gz",
                    }
                ],
                "test": ["img/c.nii.gz"],
            }
        )
    )
    training = load_datalist(dl, "training")
    assert training == [
        {
            "id": "a",
            "image": str(tmp_path / "sub" / "img" / "a.nii.gz"),
            "label": str(tmp_path / "lab" / "a.nii.gz"),
            "weight": "heavy",
        }
    ]
    (entry,) = load_datalist(str(dl), "unlabeled")
    assert entry["image"] == "/abs/b.nii.gz"
    assert entry["true_label"] == str(tmp_path / "sub" / "lab" / "b.nii.gz")
    assert entry["moving_image"] == str(tmp_path / "sub" / "m.nii.gz")
    assert entry["warped_label"] == str(tmp_path / "sub" / "w.nii.gz")
    assert load_datalist(dl, "test") == [{"image": str(tmp_path / "sub" / "img" / "c.nii.gz")}]
    # entries are copies: changing them does not change what the next load returns
    training[0]["image"] = "changed"
    assert load_datalist(dl, "training")[0]["image"].endswith("a.nii.gz")


def test_load_datalist_unknown_section_names_file_and_sections(tmp_path):
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"name": "x", "training": [], "validation": []}))
    with pytest.raises(KeyError) as err:
        load_datalist(dl, "validaton")
    msg = str(err.value)
    assert str(dl) in msg and "validaton" in msg and "'training'" in msg and "'validation'" in msg


def test_load_datalist_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_datalist(tmp_path / "nothere.json", "training")


def test_load_datalist_invalid_json(tmp_path):
    dl = tmp_path / "broken.json"
    dl.write_text('{"training": [')
    with pytest.raises(DatalistError, match=r"broken\.json.*not valid JSON"):
        load_datalist(dl, "training")


def test_load_datalist_bad_section_and_entry(tmp_path):
    dl = tmp_path / "bad.json"
    dl.write_text(json.dumps({"training": {"id": "a"}}))
    with pytest.raises(DatalistError, match=r"bad\.json.*'training' must be a list"):
        load_datalist(dl, "training")
    dl.write_text(json.dumps({"training": [{"id": "a", "image": 3}]}))
    with pytest.raises(DatalistError, match=r"bad\.json, training\[0\].*'image' must be a path"):
        load_datalist(dl, "training")


def test_load_datalist_info(tmp_path):
    dl = tmp_path / "dl.json"
    dl.write_text(
        json.dumps(
            {
                "name": "syn",
                "modality": "CT",
                "labels": {"0": "bg", "1": "spleen"},
                "intensity_window": [-125, 275],
                "training": [],
            }
        )
    )
    info = load_datalist_info(dl)
    assert info == {
        "name": "syn",
        "modality": "CT",
        "labels": {"0": "bg", "1": "spleen"},
        "intensity_window": [-125, 275],
    }


# ---------------------------------------------------------------------------------------------
# ACDC
# ---------------------------------------------------------------------------------------------


def test_acdc_split_file_is_the_standard_split():
    train, val, test = ACDC_SPLIT["train"], ACDC_SPLIT["validation"], ACDC_SPLIT["test"]
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    every = {f"patient{i:03d}" for i in range(1, 101)}
    assert set(train) | set(val) | set(test) == every
    assert not (set(train) & set(val)) and not (set(test) & (set(train) | set(val)))
    one, three, seven = (ACDC_SPLIT["labeled"][k] for k in ("1", "3", "7"))
    assert one == three[:1] and three == seven[:3] and set(seven) <= set(train)


def test_build_acdc_standard_split_counts(tmp_path):
    present_test = ACDC_SPLIT["test"][:5]
    root = fake_acdc(tmp_path / "ACDC", ACDC_SPLIT["train"] + ACDC_SPLIT["validation"] + present_test)
    with pytest.warns(UserWarning, match="15 ACDC test patient"):
        out = build_acdc(root, tmp_path / "out" / "acdc_7.json", labeled=7)
    data = read_datalist(out)
    assert data["modality"] == "MRI"
    assert data["labels"] == {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}
    assert [len(data[s]) for s in ("training", "unlabeled", "validation", "test")] == [14, 126, 20, 10]
    assert {i.rsplit("_", 1)[0] for i in ids(data, "training")} == set(ACDC_SPLIT["labeled"]["7"])
    assert "patient099_frame12" in ids(data, "training")  # frame numbers other than 01/02 are found
    assert all(e["label"].endswith("_gt.nii.gz") for e in data["training"] + data["validation"])
    assert all(e["true_label"] == e["image"].replace(".nii.gz", "_gt.nii.gz") for e in data["unlabeled"])
    assert {i.rsplit("_", 1)[0] for i in ids(data, "test")} == set(present_test)
    all_ids = sum((ids(data, s) for s in ("training", "unlabeled", "validation", "test")), [])
    assert len(all_ids) == len(set(all_ids))
    assert not any("_4d" in i for i in all_ids)


@pytest.fixture
def small_split(tmp_path) -> Path:
    split = {
        "train": ["patient003", "patient004", "patient005"],
        "validation": ["patient002"],
        "test": ["patient001", "patient007"],
        "labeled": {"1": ["patient004"]},
    }
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    return path


def test_build_acdc_standard_and_nonstandard_labeled(tmp_path, small_split):
    root = fake_acdc(
        tmp_path / "ACDC", ["patient002", "patient003", "patient004", "patient005", "patient001"], frames=("01", "02")
    )
    with pytest.warns(UserWarning, match=r"1 ACDC test patient\(s\) not under .*\['patient007'\]"):
        data = read_datalist(build_acdc(root, tmp_path / "a1.json", labeled=1, split=small_split))
    assert ids(data, "training") == ["patient004_frame01", "patient004_frame02"]
    assert ids(data, "test") == ["patient001_frame01", "patient001_frame02"]  # patient007 missing: skipped
    with pytest.warns(UserWarning, match="labeled=2 is not a standard ACDC setting"):
        data = read_datalist(build_acdc(root, tmp_path / "a2.json", labeled=2, include_test=False, split=small_split))
    assert [i[:10] for i in ids(data, "training")] == ["patient003"] * 2 + ["patient004"] * 2
    assert data["test"] == []


def test_build_acdc_labeled_seed_draws_other_labeled_patients(tmp_path, small_split):
    root = fake_acdc(tmp_path / "ACDC", ["patient002", "patient003", "patient004", "patient005"], frames=("01",))
    drawn = {}
    for seed in range(6):
        data = read_datalist(
            build_acdc(
                root, tmp_path / f"s{seed}.json", labeled=2, split=small_split, include_test=False, labeled_seed=seed
            )
        )
        patients = sorted({i[:10] for i in ids(data, "training")})
        assert len(patients) == 2 and data["labeled_patients"] == patients and data["labeled_seed"] == seed
        assert {i[:10] for i in ids(data, "unlabeled")} == {"patient003", "patient004", "patient005"} - set(patients)
        drawn[seed] = tuple(patients)
    assert len(set(drawn.values())) > 1  # different seeds, different labeled patients
    again = read_datalist(
        build_acdc(root, tmp_path / "again.json", labeled=2, split=small_split, include_test=False, labeled_seed=3)
    )
    assert tuple(again["labeled_patients"]) == drawn[3]  # the same seed, the same patients


def test_build_acdc_original_layout_subfolder(tmp_path, small_split):
    root = tmp_path / "ACDC"
    fake_acdc(root / "database" / "training", ["patient002", "patient003", "patient004", "patient005"])
    data = read_datalist(build_acdc(root, tmp_path / "dl.json", labeled=1, split=small_split, include_test=False))
    assert ids(data, "validation") == ["patient002_frame01", "patient002_frame12"]


def test_build_acdc_missing_train_patient_names_folder(tmp_path, small_split):
    root = fake_acdc(tmp_path / "ACDC", ["patient002", "patient003", "patient004"])
    with pytest.raises(FileNotFoundError, match=r"ACDC/patient005.*train"):
        build_acdc(root, tmp_path / "dl.json", labeled=1, split=small_split)
    assert not (tmp_path / "dl.json").exists()


def test_build_acdc_unlabeled_without_gt_and_labeled_without_gt(tmp_path, small_split):
    root = fake_acdc(tmp_path / "ACDC", ["patient002", "patient004"])
    fake_acdc(root, ["patient003", "patient005"], gt=False)
    data = read_datalist(build_acdc(root, tmp_path / "dl.json", labeled=1, split=small_split, include_test=False))
    assert [sorted(e) for e in data["unlabeled"]] == [["id", "image"]] * 4
    with pytest.warns(UserWarning):
        with pytest.raises(
            DatalistError, match=r"labeled ACDC patient patient003: no ground truth patient003_frame01_gt"
        ):
            build_acdc(root, tmp_path / "dl2.json", labeled=3, split=small_split)


def test_build_acdc_labeled_out_of_range(tmp_path, small_split):
    root = fake_acdc(tmp_path / "ACDC", ["patient002", "patient003", "patient004", "patient005"])
    with pytest.raises(DatalistError, match="labeled=4"):
        build_acdc(root, tmp_path / "dl.json", labeled=4, split=small_split)


def test_build_acdc_empty_patient_folder(tmp_path, small_split):
    root = fake_acdc(tmp_path / "ACDC", ["patient002", "patient003", "patient004"])
    (root / "patient005").mkdir()
    with pytest.raises(DatalistError, match=r"patient005 holds no patient005_frameNN"):
        build_acdc(root, tmp_path / "dl.json", labeled=1, split=small_split)


# ---------------------------------------------------------------------------------------------
# Synapse
# ---------------------------------------------------------------------------------------------


def fake_synapse(root: Path, cases, img_dir="img", lab_dir="label") -> Path:
    for c in cases:
        touch(root / img_dir / f"img{c}.nii.gz")
        touch(root / lab_dir / f"label{c}.nii.gz")
    return root


def test_build_synapse_split_and_mapping(tmp_path):
    root = fake_synapse(tmp_path / "BTCV" / "RawData" / "Training", SYNAPSE_SPLIT["train"] + SYNAPSE_SPLIT["test"])
    data = read_datalist(build_synapse(tmp_path / "BTCV", tmp_path / "syn.json", labeled=4, num_validation=2))
    train = SYNAPSE_SPLIT["train"]
    assert ids(data, "training") == [f"case{c}" for c in train[:4]]
    assert ids(data, "validation") == [f"case{c}" for c in train[-2:]]
    assert ids(data, "unlabeled") == [f"case{c}" for c in train[4:-2]]
    assert all(e["true_label"].endswith(f"label{e['id'][4:]}.nii.gz") for e in data["unlabeled"])
    assert sorted(ids(data, "test")) == sorted(
        f"case{c}" for c in "0001 0002 0003 0004 0008 0022 0025 0029 0032 0035 0036 0038".split()
    )
    assert str(root / "img" / "img0001.nii.gz") in [e["image"] for e in data["test"]]
    assert data["modality"] == "CT" and data["intensity_window"] == [-125, 275]
    assert len(data["labels"]) == 9 and data["labels"]["5"] == "liver" and data["labels"]["8"] == "pancreas"
    # the mapping, applied as the training configs do (MONAI MapLabelValued)
    from monai.transforms import MapLabelValued

    mapping = data["label_mapping"]
    raw = np.arange(14, dtype=np.int64).reshape(1, 14, 1, 1)
    mapped = MapLabelValued("label", mapping["orig"], mapping["target"])({"label": raw})["label"]
    assert np.asarray(mapped).ravel().tolist() == [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]


@pytest.mark.parametrize("img_dir,lab_dir", [("imagesTr", "labelsTr"), (".", ".")])
def test_build_synapse_other_layouts(tmp_path, img_dir, lab_dir):
    root = fake_synapse(tmp_path / "syn", SYNAPSE_SPLIT["train"], img_dir, lab_dir)
    with pytest.warns(UserWarning, match="12 Synapse test case"):
        data = read_datalist(build_synapse(root, tmp_path / "syn.json", labeled=1))
    assert [len(data[s]) for s in ("training", "unlabeled", "validation", "test")] == [1, 17, 0, 0]


def test_build_synapse_missing_train_case(tmp_path):
    root = fake_synapse(tmp_path / "syn", SYNAPSE_SPLIT["train"])
    (root / "label" / "label0040.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"case 0040: no label0040"):
        build_synapse(root, tmp_path / "syn.json")


def test_build_synapse_duplicate_case_and_bad_counts(tmp_path):
    root = fake_synapse(tmp_path / "syn", SYNAPSE_SPLIT["train"])
    touch(root / "copy" / "img0005.nii.gz")
    with pytest.raises(DatalistError, match="case 0005 found twice"):
        build_synapse(root, tmp_path / "syn.json")
    with pytest.raises(DatalistError, match="labeled=10, num_validation=9"):
        build_synapse(tmp_path / "syn", tmp_path / "syn.json", labeled=10, num_validation=9)


# ---------------------------------------------------------------------------------------------
# any folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> tuple[Path, Path]:
    """5 images; labels (values 0..2) for c0..c3 in a separate folder, c4 unlabeled."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    for i in range(5):
        nifti(images / f"c{i}.nii.gz", seed=i)
    for i in range(4):
        lab = np.zeros((8, 8, 3), np.uint8)
        lab[2:5, 2:5, :] = 1 + (i % 2)
        nifti(labels / (f"c{i}.nii.gz" if i % 2 else f"c{i}_seg.nii.gz"), lab)
    return images, labels


def test_build_folder_int_counts(folder, tmp_path):
    images, labels = folder
    data = read_datalist(build_folder(images, labels, tmp_path / "f.json", labeled=2, validation=1, test=1))
    assert ids(data, "test") == ["c4"] and "label" not in data["test"][0]
    assert ids(data, "validation") == ["c3"]  # last labeled case not in test
    assert ids(data, "training") == ["c0", "c1"]
    assert ids(data, "unlabeled") == ["c2"] and data["unlabeled"][0]["true_label"].endswith("c2_seg.nii.gz")
    assert data["training"][0]["label"] == str(labels / "c0_seg.nii.gz")
    assert data["training"][1]["label"] == str(labels / "c1.nii.gz")
    assert data["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}  # found in the labels
    assert data["name"] == "images" and data["modality"] == "MRI"


def test_build_folder_id_lists_and_file(folder, tmp_path):
    images, labels = folder
    id_file = tmp_path / "labeled.txt"
    id_file.write_text("c3\n# a comment\n\nc1\n")
    data = read_datalist(
        build_folder(
            images,
            labels,
            tmp_path / "f.json",
            labeled=str(id_file),
            validation=["c0"],
            test=0,
            modality="CT",
            label_names=["bg", "a", "b"],
        )
    )
    assert ids(data, "training") == ["c1", "c3"]
    assert ids(data, "validation") == ["c0"]
    assert ids(data, "unlabeled") == ["c2", "c4"] and "true_label" not in data["unlabeled"][1]
    assert data["labels"] == {"0": "bg", "1": "a", "2": "b"} and data["modality"] == "CT"


def test_build_folder_same_folder_suffixes(tmp_path):
    for name in ("a", "b", "c"):
        nifti(tmp_path / "d" / f"{name}.nii.gz")
    nifti(tmp_path / "d" / "a_gt.nii.gz", np.zeros((8, 8, 3), np.uint8))
    nifti(tmp_path / "d" / "b_label.nii.gz", np.ones((8, 8, 3), np.uint8))
    data = read_datalist(build_folder(tmp_path / "d", out=tmp_path / "f.json", labeled="a,b"))
    assert ids(data, "training") == ["a", "b"] and ids(data, "unlabeled") == ["c"]
    assert data["training"][1]["label"].endswith("b_label.nii.gz")


def test_build_folder_bad_selections(folder, tmp_path):
    images, labels = folder
    out = tmp_path / "f.json"
    with pytest.raises(DatalistError, match=r"labeled: case\(s\) \['c4'\] have no label"):
        build_folder(images, labels, out, labeled=["c4"])
    with pytest.raises(DatalistError, match=r"unknown case id\(s\) \['nope'\]"):
        build_folder(images, labels, out, labeled=["nope"])
    with pytest.raises(DatalistError, match=r"\['c1'\] are both labeled and validation"):
        build_folder(images, labels, out, labeled=["c1"], validation=["c1"])
    with pytest.raises(DatalistError, match="labeled=5: only 4 eligible"):
        build_folder(images, labels, out, labeled=5)
    with pytest.raises(FileNotFoundError, match="missing"):
        build_folder(tmp_path / "missing", out=out)
    with pytest.raises(DatalistError, match="no NIfTI image"):
        build_folder(images, labels, out, pattern="*.mha")
    assert not out.exists()


def test_cli_prints_summary(folder, tmp_path, capsys):
    images, labels = folder
    out = tmp_path / "cli.json"
    main(["folder", "--images", str(images), "--labels", str(labels), "--out", str(out), "--labeled", "2"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(out)) and "training 2, unlabeled 3, validation 0, test 0" in line
    assert len(load_datalist(out, "training")) == 2
