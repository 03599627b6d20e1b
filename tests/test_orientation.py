"""Anatomy, not storage order: one canonical orientation before slicing (scripts.data.orientation).

The same physical volume stored with permuted axes, either in-plane axis mirrored, or as LPS must be
segmented identically voxel for voxel once the predictions are mapped back to one orientation; a
training set that mixes orientations must train exactly as a consistent one; REPS' registered
correspondences stay exact; constant volumes (no anatomy) are refused with one line naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, LoadImaged, Orientationd

from scripts.contrastive.registered_correspondence import RegisteredCorrespondence
from scripts.data.atomic_io import save_nifti
from scripts.data.data_checks import DataCheckError, check_datalist, check_image_file
from scripts.data.orientation import checked_orientation, model_orientation, orientation_transform, oriented_geometry
from scripts.data.phantom import ensure_phantom_dataset
from scripts.inference.inference_inputs import collect_inputs, collect_labeled_inputs
from scripts.training.model_config import build_model, write_model_config
from tests.cross_teaching_fixtures import ROOT, run_bundle

#: storage orientations of the same physical volume: the phantom's own (oblique, closest to LIP), axes
#: permuted, each in-plane axis mirrored, and the two DICOM-style ones
ORIENTATIONS = ["SRA", "LPS", "RAS", "RPS", "LAS", "ASR"]


def store_as(src: str | Path, dst: Path, codes: str) -> Path:
    """``src`` saved at ``dst`` with its voxel array reordered to the closest ``codes`` (same world image)."""
    img = nib.load(str(src))
    transform = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt(codes))
    out = img.as_reoriented(transform)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(np.asarray(out.dataobj), out.affine, dst, dtype=img.get_data_dtype())
    return dst


def to_reference(pred_path: Path, reference: Path) -> np.ndarray:
    """A prediction's voxels in the reference file's array order (exact: flips and a permutation)."""
    img, ref = nib.load(str(pred_path)), nib.load(str(reference))
    transform = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.io_orientation(ref.affine))
    out = img.as_reoriented(transform)
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-3)
    return np.asarray(out.dataobj)


def random_model(bundle_root: Path, classes: list[str], flips: bool, orientation: str | None, intensity: dict) -> None:
    """A randomly initialised U-Net with its description: predictions depend on what it sees, pixel by pixel."""
    config = {
        "variant": "ls",
        "networks": {
            "a": {
                "type": "BasicUNet",
                "spatial_dims": 2,
                "in_channels": 1,
                "out_channels": len(classes),
                "features": [8, 8, 16, 16, 32, 8],
                "dropout": 0.0,
            }
        },
        "branch": "mean",
        "patch_size": [32, 32],
        "slice_axis": "auto",
        "class_names": classes,
        "intensity": intensity,
        "label_mapping": None,
        "flip_augmentation": flips,
    }
    if orientation != "absent":
        config["orientation"] = orientation
    torch.manual_seed(0)
    net = build_model(config)
    (bundle_root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), bundle_root / "models" / "model.pt")
    write_model_config(bundle_root / "models" / "model_config.json", config)


def segment_all_orientations(tmp_path: Path, image: Path, bundle_root: Path, datalist: str) -> dict[str, np.ndarray]:
    inputs = tmp_path / "inputs"
    for codes in ORIENTATIONS:
        store_as(image, inputs / f"case_{codes}.nii.gz", codes)
    out = tmp_path / "out"
    run_bundle(
        bundle_root,
        ["inference.yaml"],
        datalist,
        "--input_dir",
        str(inputs),
        "--output_dir",
        str(out),
        run_id="inference",
    )
    preds = {}
    for codes in ORIENTATIONS:
        pred = out / f"case_{codes}_seg.nii.gz"
        src = nib.load(str(inputs / f"case_{codes}.nii.gz"))
        assert nib.load(str(pred)).shape == src.shape  # written back in the input's own array order
        np.testing.assert_allclose(nib.load(str(pred)).affine, src.affine, atol=1e-4)
        preds[codes] = to_reference(pred, image)
    return preds


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    return ensure_phantom_dataset(
        tmp_path_factory.mktemp("phantom"), n_labeled=2, n_unlabeled=2, n_validation=1, n_test=1, seed=3
    )


def _entries(datalist: str, section: str) -> list[dict]:
    data = json.loads(Path(datalist).read_text())
    return [
        {k: (str(Path(datalist).parent / v) if k in ("image", "label", "true_label") else v) for k, v in e.items()}
        for e in data[section]
    ]


def test_checked_orientation_and_geometry_match_monai(tmp_path, phantom):
    assert (
        checked_orientation("ras") == "RAS"
        and checked_orientation(None) is None
        and checked_orientation("null") is None
    )
    with pytest.raises(ValueError, match="one of L/R"):
        checked_orientation("RRS")
    assert (
        model_orientation({}) is None and model_orientation({"orientation": "LPS"}) == "LPS"
    )  # older models: stored order
    image = _entries(phantom, "training")[0]["image"]
    for codes in ORIENTATIONS:
        path = store_as(image, tmp_path / f"{codes}.nii.gz", codes)
        loaded = Compose(
            [LoadImaged("image", image_only=True, ensure_channel_first=True), orientation_transform("image", "RAS")]
        )({"image": str(path)})["image"]
        header = nib.load(str(path))
        affine, shape = oriented_geometry(header.affine, header.shape, "RAS")
        assert tuple(loaded.shape[1:]) == shape and nib.aff2axcodes(affine) == ("R", "A", "S")
        np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-4)
    assert isinstance(orientation_transform("image", "RAS"), Orientationd)


def test_cardiac_model_segments_every_storage_order_identically(tmp_path, phantom):
    image = Path(_entries(phantom, "test")[0]["image"])
    root = tmp_path / "bundle"
    random_model(
        root,
        ["background", "RV", "myocardium", "LV"],
        True,
        "RAS",
        {"type": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0},
    )
    preds = segment_all_orientations(tmp_path / "ras", image, root, phantom)
    reference = preds["RAS"]
    assert len(np.unique(reference)) > 1  # the model predicts something orientation-dependent
    for codes, pred in preds.items():
        assert np.array_equal(pred, reference), (
            f"stored as {codes}: {np.mean(pred != reference):.2%} of the voxels differ"
        )


def test_ct_model_keeps_left_and_right_organs_on_their_side(tmp_path):
    """A CT model trained without mirror flips: a mirrored or LPS file must not swap the kidneys."""
    from scripts.data.ct_phantom import ensure_ct_phantom_dataset

    datalist = ensure_ct_phantom_dataset(tmp_path / "ct", n_labeled=1, n_unlabeled=0, n_validation=1, n_test=0)
    entry = _entries(datalist, "validation")[0]
    image = Path(entry["image"])
    classes = [
        "background",
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "liver",
        "stomach",
        "aorta",
        "pancreas",
    ]
    window = {
        "type": "ScaleIntensityRanged",
        "keys": "image",
        "a_min": -125.0,
        "a_max": 275.0,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    }
    root = tmp_path / "bundle"
    random_model(root, classes, False, "RAS", window)
    preds = segment_all_orientations(tmp_path / "ras", image, root, datalist)
    reference = preds["RAS"]
    for codes, pred in preds.items():
        for organ in (2, 3):  # right / left kidney: the same voxels of the world, whatever the storage
            assert np.array_equal(pred == organ, reference == organ), f"stored as {codes}: {classes[organ]} moved"
        assert np.array_equal(pred, reference), codes
    # without a canonical orientation (a model from before it was recorded) the storage order shows: the test can fail
    old = tmp_path / "old"
    random_model(old, classes, False, "absent", window)
    before = segment_all_orientations(tmp_path / "old_run", image, old, datalist)
    assert not all(np.array_equal(p, before["RAS"]) for p in before.values())


def _mixed_copy(datalist: str, root: Path) -> str:
    """The datalist with every other volume (and its labels) stored in another orientation."""
    data = json.loads(Path(datalist).read_text())
    n = 0
    for section in ("training", "unlabeled", "validation", "test"):
        for entry in data.get(section, []):
            codes = ORIENTATIONS[n % len(ORIENTATIONS)]
            n += 1
            for key in ("image", "label", "true_label", "registered_label"):
                if key in entry:
                    src = Path(entry[key]) if os.path.isabs(entry[key]) else Path(datalist).parent / entry[key]
                    entry[key] = str(store_as(src, root / codes / key / src.name, codes))
    out = root / "mixed.json"
    out.write_text(json.dumps(data))
    return str(out)


def _losses(run_dir: Path, configs: list[str], datalist: str, **overrides) -> list[float]:
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from scripts.training.tracking import train_loss

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in configs])
    from tests.cross_teaching_fixtures import FAST

    parser.update(
        {
            **FAST,
            "bundle_root": str(run_dir),
            "datalist_file": datalist,
            "num_iterations": 3,
            "val_interval": 3,
            "monitor_max_volumes": 0,
            **overrides,
        }
    )
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        set_determinism(seed=0)
        trainer = parser.get_parsed_content("train#trainer")
        losses: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(train_loss(e.state.output)))
        trainer.run()
    finally:
        os.chdir(cwd)
    return losses


@pytest.mark.parametrize(
    "configs,overrides",
    [
        (["train.yaml", "variant_ls.yaml"], {}),
        (["train.yaml", "variant_cts.yaml"], {"rsl_weight": 1.0}),  # two networks, cross teaching and RSL labels
    ],
)
def test_a_training_set_of_mixed_orientations_trains_as_a_consistent_one(tmp_path, configs, overrides):
    from tests.cross_teaching_fixtures import make_rsl_datalist

    rsl = make_rsl_datalist(tmp_path / "data")["rsl"]
    consistent = _losses(tmp_path / "a", configs, rsl, **overrides)
    mixed = _losses(tmp_path / "b", configs, _mixed_copy(rsl, tmp_path / "mixed"), **overrides)
    assert len(consistent) == 3
    np.testing.assert_allclose(mixed, consistent, rtol=1e-5)
    # in the stored order (orientation null, bundle <= 0.5) the mixed set shows the networks other images
    stored = _losses(tmp_path / "c", configs, _mixed_copy(rsl, tmp_path / "mixed2"), orientation=None, **overrides)
    assert not np.allclose(stored, consistent, rtol=1e-5)


def test_reps_correspondence_is_exact_for_a_reoriented_volume(tmp_path, phantom):
    """Volume v1 = v0 stored LPS with the identity registration: in the networks' (RAS) voxels a point of v0
    maps onto the same voxel of v1; in stored voxels it would land mirrored."""
    image = _entries(phantom, "training")[0]["image"]
    stored = {"v0": nib.load(image), "v1": nib.load(str(store_as(image, tmp_path / "v1.nii.gz", "LPS")))}
    geometry = {k: oriented_geometry(v.affine, v.shape, "RAS") for k, v in stored.items()}
    corr = RegisteredCorrespondence(
        ["v0", "v1"],
        [geometry[k][0] for k in ("v0", "v1")],
        [geometry[k][1] for k in ("v0", "v1")],
        {("v0", "v1"): np.eye(4)},
    )
    uv = torch.tensor([[3.0, 5.0], [20.0, 7.5], [40.0, 2.0]])
    z = torch.tensor([1, 4, 6])
    slice_j, uv_j, ok = corr.map_slice_points(torch.zeros(3, dtype=torch.long), z, uv)
    assert ok[:, 1].all()
    assert torch.equal(slice_j[:, 1], z)
    torch.testing.assert_close(uv_j[:, 1], uv.double(), atol=1e-4, rtol=0)  # the affines are stored as float32
    # in stored voxel coordinates (no reorientation) the same points land mirrored: the networks' frame matters
    raw = RegisteredCorrespondence(
        ["v0", "v1"],
        [stored[k].affine for k in ("v0", "v1")],
        [stored[k].shape for k in ("v0", "v1")],
        {("v0", "v1"): np.eye(4)},
    )
    _, uv_raw, _ = raw.map_slice_points(torch.zeros(3, dtype=torch.long), z, uv)
    assert (uv_raw[:, 1] - uv.double()).abs().max() > 1.0


def _constant_volume(path: Path, value: float, dtype=np.float32) -> Path:
    save_nifti(np.full((20, 18, 5), value, dtype=dtype), np.diag([1.5, 1.5, 8.0, 1.0]), path, dtype=dtype)
    return path


def test_constant_volumes_are_refused_in_data_check_inference_and_evaluation(tmp_path, phantom):
    empty = _constant_volume(tmp_path / "empty.nii.gz", 0.0)
    with pytest.raises(DataCheckError, match=r"empty\.nii\.gz: image is constant \(every voxel is 0\)"):
        check_image_file(empty)
    with pytest.raises(DataCheckError, match="empty.nii.gz: image is constant"):
        collect_inputs([str(empty)])
    label = _constant_volume(tmp_path / "label.nii.gz", 0, np.uint8)
    with pytest.raises(DataCheckError, match="empty.nii.gz: image is constant") as err:
        collect_labeled_inputs([str(empty)], [str(label)])
    assert len(err.value.problems) == 1  # an all-background label is a valid label
    # the data check of training
    data = json.loads(Path(phantom).read_text())
    data["unlabeled"][0]["image"] = str(empty)
    data["unlabeled"][0].pop("true_label", None)
    for section in ("training", "validation", "test", "unlabeled"):
        for e in data.get(section, []):
            for k in ("image", "label", "true_label"):
                if k in e and not os.path.isabs(e[k]):
                    e[k] = str(Path(phantom).parent / e[k])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataCheckError, match="empty.nii.gz: image is constant") as err:
        check_datalist(bad, num_classes=4)
    assert len(err.value.problems) == 1
    # CT: a volume entirely below the HU window is constant after the normalisation
    air = tmp_path / "air.nii.gz"
    save_nifti(
        np.random.default_rng(0).integers(-1024, -900, (20, 18, 5)).astype(np.int16),
        np.diag([1.5, 1.5, 8.0, 1.0]),
        air,
        dtype=np.int16,
    )
    window = {
        "type": "ScaleIntensityRanged",
        "keys": "image",
        "a_min": -125.0,
        "a_max": 275.0,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    }
    check_image_file(air)  # not constant as stored
    with pytest.raises(
        DataCheckError, match=r"air\.nii\.gz: image is constant after the intensity window \[-125, 275\]"
    ):
        collect_inputs([str(air)], intensity=window)
