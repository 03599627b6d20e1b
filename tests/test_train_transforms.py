"""The training data pipeline declared in configs/train.yaml: 3D volumes in, aligned 2D patches out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data.atomic_io import save_nifti

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def datalist(tmp_path) -> Path:
    """One volume whose image is exactly label / 3, so alignment can be read off any patch."""
    label = np.zeros((40, 34, 6), np.uint8)
    label[8:30, 6:20, 1:5] = 1
    label[14:24, 20:30, 1:5] = 2
    label[16:22, 10:16, 2:4] = 3
    affine = np.diag([1.6, 1.4, 9.0, 1.0])
    save_nifti(label.astype(np.float32) / 3.0, affine, tmp_path / "img.nii.gz")
    save_nifti(label, affine, tmp_path / "lab.nii.gz")
    entry = {"id": "c0", "image": "img.nii.gz", "label": "lab.nii.gz"}
    path = tmp_path / "datalist.json"
    path.write_text(
        json.dumps({"labels": {"0": "bg", "1": "a", "2": "b", "3": "c"}, "training": [entry], "validation": [entry]})
    )
    return path


def test_patches_have_patch_size_and_stay_aligned(datalist):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    parser["datalist_file"] = str(datalist)
    parser["patch_size"] = [48, 48]
    parser["device_sampling"] = False  # the MONAI per-slice chain (tests/test_device_slices.py: the device sampler)
    transform = parser.get_parsed_content("train#preprocessing")
    transform.set_random_state(0)
    item = parser.get_parsed_content("train#datalist")[0]
    distinct = set()
    for _ in range(30):
        out = transform(dict(item))
        image, label = out["image"], out["label"]
        assert image.shape == label.shape == (1, 48, 48)
        assert image.dtype == torch.float32
        values = set(torch.unique(label).tolist())
        assert values <= {0.0, 1.0, 2.0, 3.0}, values
        # image == label / 3 before augmentation; bilinear vs nearest may differ only along edges
        agree = (torch.round(image * 3) == label).float().mean().item()
        assert agree > 0.9, agree
        distinct.add(label.numpy().tobytes())
    assert len(distinct) > 10  # slices and augmentations vary between draws
    # the slice index is recorded for later registration lookups
    assert 0 <= out["slice_index"] < 6 and out["slice_axis"] == 2


@pytest.mark.parametrize("mode, aligned", [("nearest-exact", True), ("nearest", False)])
def test_label_resized_with_its_image_stays_aligned(mode, aligned):
    """216 -> 128: on average over square positions (which cancels the quantisation of each edge), the label's
    centroid stays within a tenth of a pixel of its bilinear image's; the legacy 'nearest' rule
    (label_resize_mode: nearest) shifts every label by about half an output pixel."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    parser["patch_size"] = [128, 128]
    parser["label_resize_mode"] = mode
    resize = parser.get_parsed_content("train#slice_transforms")[-1]

    def centroid(w):
        w = torch.as_tensor(w)[0].float()
        ii, jj = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
        return torch.stack([(ii * w).sum(), (jj * w).sum()]) / w.sum()

    shifts = []
    for offset in range(27):
        mask = torch.zeros(1, 216, 216)
        mask[0, 40 + offset : 130 + offset, 50 + offset : 141 + offset] = 1.0
        out = resize({"image": mask.clone(), "label": mask.clone()})
        shifts.append(centroid(out["image"]) - centroid(out["label"]))
    shift = torch.stack(shifts).mean(0).abs().max().item()
    assert (shift < 0.1) == aligned, shift


def test_random_crop_keeps_image_label_and_coordinates_together(datalist):
    """crop_min_scale < 1: patches still have the patch size and stay aligned, and the REPS coordinate maps
    show that only part of the slice was kept (the patch-to-slice frame follows the crop)."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    parser["datalist_file"] = str(datalist)
    parser["patch_size"] = [48, 48]
    parser["crop_min_scale"] = 0.5
    parser["device_sampling"] = False  # the MONAI per-slice chain (tests/test_device_slices.py: the device sampler)
    transform = parser.get_parsed_content("train#preprocessing")
    transform.set_random_state(0)
    item = parser.get_parsed_content("train#datalist")[0]
    spans = []
    for _ in range(20):
        out = transform(dict(item))
        assert out["image"].shape == out["label"].shape == (1, 48, 48)
        assert (torch.round(out["image"] * 3) == out["label"]).float().mean().item() > 0.9
        coords = torch.as_tensor(out["slice_coords"])
        spans.append(float(coords[0].max() - coords[0].min()))
    assert min(spans) < 0.8 * max(spans)  # crops of different sizes were taken


def test_random_crop_is_on_by_default_and_can_be_switched_off(datalist):
    for value, expected in ((None, True), ("null", False)):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "train.yaml"))
        parser["datalist_file"] = str(datalist)
        if value == "null":
            parser["crop_min_scale"] = None
        names = [type(t).__name__ for t in parser.get_parsed_content("train#slice_transforms")]
        assert ("RandScaleCropd" in names) == expected, names
        if expected:  # before the resize, after the slice and its coordinates
            assert parser.get_parsed_content("crop_min_scale") == 0.8
            assert names.index("RandScaleCropd") < names.index("Resized") and names.index(
                "SliceCoordinatesd"
            ) < names.index("RandScaleCropd")


def _flip_arm(files: list[str]) -> list[str]:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    return [type(t).__name__ for t in parser.get_parsed_content("train#augmentation").transforms[0].transforms]


def test_ct_overlay_keeps_left_and_right_apart():
    """Cardiac: rot90 + mirror flip (SSL4MIS). CT: no mirror flip, which would turn a left kidney into a right one."""
    assert _flip_arm(["train.yaml"]) == ["RandRotate90d", "RandAxisFlipd"]
    assert _flip_arm(["train.yaml", "dataset_acdc.yaml"]) == ["RandRotate90d", "RandAxisFlipd"]
    assert _flip_arm(["train.yaml", "dataset_synapse.yaml"]) == ["RandRotate90d"]


def _handedness_signs(files: list[str], draws: int = 40) -> tuple[set[int], int]:
    """Signs of the handedness of three labelled blobs over ``draws`` draws of the training augmentation,
    and the sign before augmentation."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    aug = parser.get_parsed_content("train#augmentation")
    aug.set_random_state(0)
    label = torch.zeros(1, 32, 32)
    label[0, 14:18, 8:12] = 1.0  # right of the patient (left of the image)
    label[0, 14:18, 20:24] = 2.0  # left of the patient
    label[0, 8:12, 14:18] = 3.0  # anterior
    signs = set()
    for _ in range(draws):
        signs.add(_handedness(aug({"image": label.clone(), "label": label.clone()})["label"][0]))
    return signs, _handedness(label[0])


def _handedness(label: torch.Tensor) -> int:
    p = [torch.nonzero(label == k).float().mean(0) for k in (1, 2, 3)]
    a, b = p[1] - p[0], p[2] - p[0]
    return int(torch.sign(a[0] * b[1] - a[1] * b[0]))


def test_ct_augmentation_never_mirrors_a_slice():
    """Rotations keep the handedness of (right organ, left organ, anterior organ); a mirror flip reverses it.
    The cardiac augmentation draws both signs (so the check can fail); the CT one only the original."""
    cardiac, original = _handedness_signs(["train.yaml"])
    assert cardiac == {-1, 1}
    ct, original = _handedness_signs(["train.yaml", "dataset_synapse.yaml"])
    assert ct == {original}
