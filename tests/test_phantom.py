"""Tests of the synthetic cardiac phantom (scripts/data/phantom.py): tiny datasets in tmp_path only."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from scripts.data import phantom
from scripts.data.phantom import (
    PhantomDatasetError,
    PhantomSubject,
    ensure_phantom_dataset,
    load_phantom_subjects,
    render_subject,
    sample_subject,
    sample_subjects,
    true_transform,
    with_pose,
)

SMALL = dict(n_labeled=1, n_unlabeled=1, n_validation=1, n_test=1, seed=3)
ONE = dict(n_labeled=1, n_unlabeled=0, n_validation=0, n_test=0)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("phantom") / "phantom"
    return root, Path(ensure_phantom_dataset(root, **SMALL))


def _assert_same_subject(a: PhantomSubject, b: PhantomSubject) -> None:
    assert a.id == b.id and a.shape == b.shape and a.noise_seed == b.noise_seed
    assert a.anatomy == b.anatomy and a.appearance == b.appearance
    assert np.array_equal(a.canonical_to_world, b.canonical_to_world)
    assert np.array_equal(a.grid_affine, b.grid_affine)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}."))


def test_same_seed_gives_bit_identical_subject_and_volumes():
    first = sample_subject(np.random.default_rng([5, 2]), "a")
    second = sample_subject(np.random.default_rng([5, 2]), "a")
    _assert_same_subject(first, second)
    image_1, label_1 = render_subject(first)
    image_2, label_2 = render_subject(second)
    assert np.array_equal(image_1, image_2) and np.array_equal(label_1, label_2)


def test_different_subjects_differ():
    a, b = sample_subjects(0, 2)
    assert a.id == "phantom_000" and b.id == "phantom_001"
    assert all(a.anatomy[key] != b.anatomy[key] for key in a.anatomy)
    assert not np.allclose(a.canonical_to_world, b.canonical_to_world)
    assert not np.allclose(a.grid_affine, b.grid_affine)
    label_a = render_subject(a)[1]
    # Compare on a common grid: b's anatomy and pose rendered on a's grid.
    label_b_on_a = render_subject(with_pose(b, b.canonical_to_world, a.grid_affine, a.shape))[1]
    assert (label_a != label_b_on_a).mean() > 0.01


@pytest.mark.parametrize("index", [0, 1, 2])
def test_rendered_volume_ranges_classes_and_geometry(index):
    subject = sample_subject(np.random.default_rng([11, index]), f"s{index}")
    image, label = render_subject(subject)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.shape == label.shape == subject.shape
    assert image.min() == 0.0 and image.max() == 1.0
    assert set(np.unique(label)) <= {0, 1, 2, 3}
    assert set(np.unique(label[:, :, subject.shape[2] // 2])) == {0, 1, 2, 3}
    # Bright blood, darker myocardium, as in cine MR.
    assert image[label == 3].mean() > image[label == 2].mean() + 0.2
    assert image[label == 1].mean() > image[label == 2].mean() + 0.2

    spacing = np.array(subject.spacing)
    assert int(np.argmax(spacing)) == 2 and 6.0 <= spacing[2] <= 10.0
    assert np.all((1.25 <= spacing[:2]) & (spacing[:2] <= 2.1))
    assert all(96 <= n <= 128 for n in subject.shape[:2]) and 6 <= subject.shape[2] <= 12
    rotation = subject.grid_affine[:3, :3] / spacing
    assert np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-5) and np.linalg.det(rotation) > 0
    assert not np.allclose(np.abs(rotation), np.eye(3), atol=0.1)  # oblique, not axis-aligned


def test_true_transform_maps_lv_centroid():
    subject = sample_subject(np.random.default_rng([21, 0]), "src")
    grid = subject.grid_affine
    axes = grid[:3, :3] / np.linalg.norm(grid[:3, :3], axis=0)
    # Rotate 10 degrees about the slice axis through the field-of-view centre, then shift a few mm.
    angle = np.deg2rad(10.0)
    rotation = (
        axes
        @ np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
        @ axes.T
    )
    centre = grid[:3, :3] @ ((np.array(subject.shape) - 1) / 2) + grid[:3, 3]
    world_map = np.eye(4)
    world_map[:3, :3] = rotation
    world_map[:3, 3] = centre - rotation @ centre + axes @ np.array([6.0, -6.0, 3.0])
    moved = with_pose(subject, world_map @ subject.canonical_to_world)
    assert np.allclose(true_transform(subject, moved), world_map)
    assert moved.anatomy == subject.anatomy and np.array_equal(moved.grid_affine, grid)

    def lv_centroid_world(s: PhantomSubject) -> np.ndarray:
        ijk = np.argwhere(render_subject(s)[1] == 3).mean(axis=0)
        return grid[:3, :3] @ ijk + grid[:3, 3]

    before, after = lv_centroid_world(subject), lv_centroid_world(moved)
    predicted = true_transform(subject, moved)[:3, :3] @ before + true_transform(subject, moved)[:3, 3]
    error_voxels = np.linalg.solve(grid[:3, :3], predicted - after)
    shift_voxels = np.linalg.solve(grid[:3, :3], after - before)
    assert np.linalg.norm(shift_voxels[:2]) > 3.0  # the LV really moved
    assert np.all(np.abs(error_voxels) < 1.0)


def test_with_pose_copies_and_validates():
    subject = sample_subject(np.random.default_rng([1, 1]), "x")
    original = subject.canonical_to_world.copy()
    moved = with_pose(subject, np.eye(4))
    moved.anatomy["lv_radius"] = -1.0
    assert np.array_equal(subject.canonical_to_world, original) and subject.anatomy["lv_radius"] > 0
    with pytest.raises(ValueError, match="canonical_to_world"):
        with_pose(subject, np.zeros((4, 4)))


def test_dataset_datalist_sections_ids_and_files(small_dataset):
    root, datalist_path = small_dataset
    assert datalist_path == root.absolute() / "datalist.json"
    datalist = json.loads(datalist_path.read_text())
    assert datalist["name"] == "phantom" and datalist["modality"] == "MRI"
    assert datalist["labels"] == {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}
    expected_keys = {"training": "label", "unlabeled": "true_label", "validation": "label", "test": "label"}
    ids = []
    for section, label_key in expected_keys.items():
        assert len(datalist[section]) == 1
        for item in datalist[section]:
            assert set(item) == {"id", "image", label_key}
            ids.append(item["id"])
            for key in ("image", label_key):
                assert not os.path.isabs(item[key]) and (root / item[key]).is_file()
    assert ids == [f"phantom_{i:03d}" for i in range(4)]

    record = json.loads((root / "phantom.json").read_text())
    assert record["seed"] == SMALL["seed"] and record["version"] == phantom.PHANTOM_VERSION
    assert sorted(record["subjects"]) == ids
    assert set(record["subjects"]["phantom_000"]) >= {
        "canonical_to_world",
        "grid_affine",
        "shape",
        "anatomy",
        "appearance",
    }


def test_nifti_on_disk_matches_subject_geometry_and_render(small_dataset):
    root, _ = small_dataset
    loaded = load_phantom_subjects(root)
    expected = sample_subjects(SMALL["seed"], 4)
    for subject in expected:
        _assert_same_subject(loaded[subject.id], subject)

    subject = expected[2]
    image_nii = nib.load(root / "imagesTr" / "phantom_002.nii.gz")
    label_nii = nib.load(root / "labelsTr" / "phantom_002.nii.gz")
    assert np.array_equal(image_nii.affine, subject.grid_affine)
    assert np.array_equal(label_nii.affine, subject.grid_affine)
    assert np.allclose(image_nii.header.get_zooms(), subject.spacing, rtol=1e-6)
    assert image_nii.get_data_dtype() == np.float32 and label_nii.get_data_dtype() == np.uint8
    image, label = render_subject(subject)
    assert np.array_equal(image_nii.get_fdata(dtype=np.float32), image)
    assert np.array_equal(np.asarray(label_nii.dataobj), label)

    # SimpleITK (LPS world) sees the same geometry.
    itk = sitk.ReadImage(str(root / "imagesTr" / "phantom_002.nii.gz"))
    lps = np.diag([-1.0, -1.0, 1.0])
    assert np.allclose(itk.GetSpacing(), subject.spacing, rtol=1e-5)
    assert np.allclose(itk.GetOrigin(), lps @ subject.grid_affine[:3, 3], atol=1e-3)
    direction = np.array(itk.GetDirection()).reshape(3, 3)
    assert np.allclose(direction, lps @ subject.grid_affine[:3, :3] / np.array(subject.spacing), atol=1e-5)


def test_second_call_is_a_no_op(small_dataset):
    root, datalist_path = small_dataset
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_phantom_dataset(root, **SMALL) == str(datalist_path)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert _leftovers(root) == []


def test_interrupted_generation_leaves_no_datalist(tmp_path, monkeypatch):
    root = tmp_path / "phantom"
    real_save = phantom.save_nifti
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save(*args, **kwargs)

    monkeypatch.setattr(phantom, "save_nifti", failing_save)
    with pytest.raises(OSError, match="simulated"):
        ensure_phantom_dataset(root, seed=1, **ONE)
    assert len(calls) == 2
    assert not (root / "datalist.json").exists() and not root.exists()
    assert _leftovers(root) == []


def test_interrupted_regeneration_keeps_previous_dataset(tmp_path, monkeypatch):
    root = tmp_path / "phantom"
    ensure_phantom_dataset(root, seed=1, **ONE)

    def failing_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(phantom, "save_nifti", failing_save)
    with pytest.raises(OSError, match="simulated"):
        ensure_phantom_dataset(root, seed=2, **ONE)
    datalist = json.loads((root / "datalist.json").read_text())
    assert datalist["generator"]["seed"] == 1
    assert all((root / item[key]).is_file() for item in datalist["training"] for key in ("image", "label"))
    assert _leftovers(root) == []

    monkeypatch.undo()
    ensure_phantom_dataset(root, seed=2, **ONE)  # settings changed: regenerated in place
    assert json.loads((root / "datalist.json").read_text())["generator"]["seed"] == 2
    assert load_phantom_subjects(root)["phantom_000"].anatomy == sample_subjects(2, 1)[0].anatomy
    assert _leftovers(root) == []


def test_refuses_foreign_folder_and_bad_counts(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(PhantomDatasetError, match="not a phantom dataset"):
        ensure_phantom_dataset(root, **ONE)
    assert (root / "notes.txt").read_text() == "keep me"
    with pytest.raises(PhantomDatasetError, match="n_labeled"):
        ensure_phantom_dataset(tmp_path / "other", n_labeled=0)
    with pytest.raises(PhantomDatasetError, match="seed"):
        ensure_phantom_dataset(tmp_path / "other", seed=1.5)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_command_line_generates_dataset(tmp_path, monkeypatch, capsys):
    root = tmp_path / "cli"
    argv = [
        "phantom",
        "--root",
        str(root),
        "--seed",
        "4",
        "--n_labeled",
        "1",
        "--n_unlabeled",
        "0",
        "--n_validation",
        "0",
        "--n_test",
        "0",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_module("scripts.data.phantom", run_name="__main__")  # what `python -m scripts.data.phantom ...` runs
    assert str(root / "datalist.json") in capsys.readouterr().out
    assert json.loads((root / "datalist.json").read_text())["generator"]["seed"] == 4
