"""Half-labeled batches: registered labels stay aligned through slicing and augmentation; loader and datalist helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, MetaTensor

from scripts.data.atomic_io import save_nifti
from scripts.data.semi_supervised_data import (
    FillMissingLabeld,
    MissingRegisteredLabelError,
    SemiSupervisedLoader,
    SemiSupervisedPrepareBatch,
    fully_labeled_entries,
    unlabeled_entries,
)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _label_volume() -> np.ndarray:
    """An asymmetric label volume, different on every slice (flips and rotations show)."""
    label = np.zeros((40, 34, 6), np.uint8)
    for k in range(6):
        label[6 + k : 30, 4 : 18 + k, k] = 1
        label[12:22, 20 : 31 - k, k] = 2
        label[14 + k : 20 + k, 8:13, k] = 3
    return label


@pytest.fixture()
def datalist(tmp_path) -> Path:
    """Two unlabeled volumes: one registered label equal to the truth (image = label / 3), one failed registration."""
    label = _label_volume()
    affine = np.array([[0.0, 1.4, 0.0, 3.0], [1.6, 0.0, 0.0, -7.0], [0.0, 0.0, 9.0, 2.0], [0, 0, 0, 1]])
    save_nifti(label.astype(np.float32) / 3.0, affine, tmp_path / "img.nii.gz")
    save_nifti(label, affine, tmp_path / "lab.nii.gz")
    data = {
        "labels": {"0": "bg", "1": "a", "2": "b", "3": "c"},
        "training": [{"id": "l0", "image": "img.nii.gz", "label": "lab.nii.gz"}],
        "unlabeled": [
            {
                "id": "u0",
                "image": "img.nii.gz",
                "true_label": "lab.nii.gz",
                "registered_label": "lab.nii.gz",
                "brs_score": 2.0,
            },
            {"id": "u1", "image": "img.nii.gz", "true_label": "lab.nii.gz", "registered_label": None},
        ],
        "validation": [{"id": "v0", "image": "img.nii.gz", "label": "lab.nii.gz"}],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    return path


def _parser(datalist: Path, *extra: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("train.yaml", *extra)])
    parser["datalist_file"] = str(datalist)
    parser["use_reps"] = False  # a hand-made registered datalist: no registration transforms for REPS
    if not extra:  # the default with CCT-R's RSL (off since 0.8.0): registered labels in the unlabeled batches
        parser["rsl_weight"] = 1.0
    parser["patch_size"] = [48, 48]
    parser["device_sampling"] = False  # the MONAI per-slice chain (tests/test_device_slices.py: the device sampler)
    return parser


def test_registered_label_stays_aligned_through_augmentation(datalist):
    parser = _parser(datalist)
    transform = parser.get_parsed_content("train#unlabeled#preprocessing")
    transform.set_random_state(0)
    entry = parser.get_parsed_content("train#unlabeled#datalist")()[0]
    # the true label never reaches training; the RSL weight from the BRS rank does (one scored volume: 1)
    assert (
        set(entry) == {"id", "image", "registered_label", "registered_label_weight"}
        and entry["registered_label_weight"] == 1.0
    )
    distinct, flipped_agreement = set(), []
    for _ in range(40):
        out = transform(dict(entry))
        image, registered = out["image"], out["registered_label"]
        assert image.shape == registered.shape == (1, 48, 48)
        assert set(torch.unique(registered).tolist()) <= {0.0, 1.0, 2.0, 3.0}
        assert out["registered_label_valid"].item() == 1.0
        # image == registered label / 3 before augmentation; bilinear vs nearest differ only along edges
        agree = (torch.round(image * 3) == registered).float().mean().item()
        assert agree > 0.9, agree
        flipped_agreement.append((torch.round(image * 3) == registered.flip(-1)).float().mean().item())
        distinct.add(registered.numpy().tobytes())
    assert len(distinct) > 15  # slices and augmentations vary between draws
    assert min(flipped_agreement) < 0.8  # the check would catch a registered label flipped apart from its image


def test_labeled_and_registered_labels_get_identical_transforms(datalist):
    """Through the labeled pipeline, a registered label equal to the label comes out equal to it, bit for bit."""
    parser = _parser(datalist)
    transform = parser.get_parsed_content("train#preprocessing")
    transform.set_random_state(1)
    entry = {
        "image": str(datalist.parent / "img.nii.gz"),
        "label": str(datalist.parent / "lab.nii.gz"),
        "registered_label": str(datalist.parent / "lab.nii.gz"),
    }
    for _ in range(20):
        out = transform(dict(entry))
        torch.testing.assert_close(torch.as_tensor(out["registered_label"]), torch.as_tensor(out["label"]))


def test_failed_registration_gets_blank_label_and_batches_collate(datalist):
    parser = _parser(datalist)
    entries = parser.get_parsed_content("train#unlabeled#datalist")()  # read when training starts
    assert "registered_label" not in entries[1]
    dataset = Dataset(entries, parser.get_parsed_content("train#unlabeled#preprocessing"))
    batch = next(iter(DataLoader(dataset, batch_size=2, shuffle=False, num_workers=0)))
    assert batch["registered_label"].shape == (2, 1, 48, 48)
    assert batch["registered_label_valid"].tolist() == [1.0, 0.0]
    assert batch["registered_label"][1].eq(0).all()


def test_cts_drops_registered_labels(datalist):
    parser = _parser(datalist, "variant_cts.yaml")
    entries = parser.get_parsed_content("train#unlabeled#datalist")()  # read when training starts
    assert all(set(e) == {"id", "image"} for e in entries)
    out = parser.get_parsed_content("train#unlabeled#preprocessing")(dict(entries[0]))
    assert "registered_label" not in out


def test_unlabeled_entries_errors_name_the_file(tmp_path, datalist):
    data = json.loads(datalist.read_text())
    for e in data["unlabeled"]:
        e.pop("registered_label")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(data))
    assert len(unlabeled_entries(plain)) == 2
    with pytest.raises(MissingRegisteredLabelError, match="plain.json"):
        unlabeled_entries(plain, with_registered_label=True)
    data["unlabeled"][0]["registered_label"] = "gone.nii.gz"
    plain.write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match="plain.json.*gone.nii.gz.*'u0'"):
        unlabeled_entries(plain, with_registered_label=True)
    data["unlabeled"] = []
    plain.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="plain.json.*empty"):
        unlabeled_entries(plain)


def test_fully_labeled_entries_use_true_labels(tmp_path, datalist):
    entries = fully_labeled_entries(datalist)
    assert [e["id"] for e in entries] == ["l0", "u0", "u1"]
    assert all(e["label"].endswith("lab.nii.gz") and Path(e["label"]).is_absolute() for e in entries)
    data = json.loads(datalist.read_text())
    del data["unlabeled"][1]["true_label"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'u1'.*true_label"):
        fully_labeled_entries(bad)


def test_loader_zips_halves_for_a_fixed_epoch_length():
    labeled = DataLoader([{"image": torch.full((1, 4, 4), float(i))} for i in range(3)], batch_size=2)  # 2 batches
    unlabeled = DataLoader([{"image": torch.zeros(1, 4, 4)} for _ in range(8)], batch_size=3)
    loader = SemiSupervisedLoader(labeled, unlabeled, epoch_length=5)
    batches = list(loader)
    assert len(loader) == len(batches) == 5  # the labeled loader restarts when it runs out
    assert [b["labeled"]["image"].shape[0] for b in batches] == [2, 1, 2, 1, 2]
    assert all(b["unlabeled"]["image"].shape[0] in (3, 2) for b in batches)
    with pytest.raises(ValueError, match="epoch_length"):
        SemiSupervisedLoader(labeled, unlabeled, epoch_length=0)


def test_prepare_batch_gives_plain_tensors_and_checks_keys():
    image = MetaTensor(torch.rand(2, 1, 4, 4))
    batch = {
        "labeled": {"image": image, "label": MetaTensor(torch.zeros(2, 1, 4, 4))},
        "unlabeled": {
            "image": image,
            "registered_label": torch.ones(2, 1, 4, 4),
            "registered_label_valid": torch.tensor([1.0, 0.0]),
        },
    }
    out = SemiSupervisedPrepareBatch()(batch, torch.device("cpu"))
    assert type(out.labeled_image) is torch.Tensor and type(out.label) is torch.Tensor
    assert out.num_labeled == 2 and out.images().shape == (4, 1, 4, 4)
    assert out.registered_valid.tolist() == [1.0, 0.0]
    with pytest.raises(KeyError, match="labeled half.*label"):
        SemiSupervisedPrepareBatch()({"labeled": {"image": image}, "unlabeled": {"image": image}})
    with pytest.raises(ValueError, match="SemiSupervisedLoader"):
        SemiSupervisedPrepareBatch()({"image": image})


def test_fill_missing_label_needs_reference():
    out = FillMissingLabeld()({"image": torch.zeros(1, 5, 6)})
    assert out["registered_label"].shape == (1, 5, 6) and out["registered_label_valid"].item() == 0.0
    with pytest.raises(KeyError, match="reference"):
        FillMissingLabeld()({"label": torch.zeros(1, 5, 6)})
