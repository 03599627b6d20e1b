"""Input checks (scripts/data/data_checks.py): a good datalist passes, each kind of bad input is reported
with the file name and the problem, and all problems come back together."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.atomic_io import save_nifti, write_json
from scripts.data.data_checks import DataCheckError, check_datalist, check_image_file, cli

AFFINE = np.array([[0.0, 0.0, 8.0, 1.0], [1.5, 0.0, 0.0, -2.0], [0.0, 1.5, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
LABELS4 = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}


def image(path: Path, shape=(8, 8, 3), affine=AFFINE, seed: int = 0) -> str:
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return str(path)


def label(path: Path, values=(0, 1, 2, 3), shape=(8, 8, 3), affine=AFFINE, dtype=np.uint8) -> str:
    data = np.zeros(shape, dtype=dtype)
    flat = data.reshape(-1)
    flat[: len(values)] = values
    save_nifti(data, affine, path, dtype=dtype)
    return str(path)


def case(root: Path, name: str, **label_kw) -> dict:
    return {"id": name, "image": image(root / f"{name}.nii.gz"), "label": label(root / f"{name}_gt.nii.gz", **label_kw)}


def datalist(root: Path, training=None, unlabeled=None, validation=None, test=None, **meta) -> Path:
    """A datalist with one good case per section unless told otherwise."""
    good = lambda name: case(root, name)  # noqa: E731
    data = {
        "name": "t",
        "modality": "MRI",
        "labels": LABELS4,
        "training": [good("tr")] if training is None else training,
        "unlabeled": [
            {"id": "un", "image": image(root / "un.nii.gz", seed=1), "true_label": label(root / "un_gt.nii.gz")}
        ]
        if unlabeled is None
        else unlabeled,
        "validation": [good("va")] if validation is None else validation,
        "test": [] if test is None else test,
        **meta,
    }
    path = root / "datalist.json"
    write_json(path, data)
    return path


def problems_of(path: Path, **kw) -> tuple[str, list[str]]:
    with pytest.raises(DataCheckError) as err:
        check_datalist(path, **kw)
    return str(err.value), err.value.problems


# ---------------------------------------------------------------------------------------------


def test_good_datalist_passes_with_report(tmp_path):
    report = check_datalist(datalist(tmp_path))
    assert report["sections"] == {"training": 1, "unlabeled": 1, "validation": 1}
    assert report["files_checked"] == 6 and report["num_classes"] == 4


def test_relative_paths_and_trailing_singleton_4d_are_accepted(tmp_path):
    image(tmp_path / "a.nii.gz", shape=(8, 8, 3, 1))
    label(tmp_path / "a_gt.nii.gz", shape=(8, 8, 3, 1))
    path = datalist(tmp_path, training=[{"id": "a", "image": "a.nii.gz", "label": "a_gt.nii.gz"}])
    assert check_datalist(path)["sections"]["training"] == 1


def test_missing_file(tmp_path):
    entry = case(tmp_path, "a")
    Path(entry["label"]).unlink()
    message, problems = problems_of(datalist(tmp_path, training=[entry]))
    assert problems == [f"{entry['label']}: label file missing"]
    assert entry["label"] in message


def test_unreadable_file(tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 20)
    _, problems = problems_of(datalist(tmp_path, unlabeled=[{"id": "g", "image": str(bad)}]))
    assert len(problems) == 1 and problems[0].startswith(f"{bad}: image file unreadable")


def test_truncated_gz_image(tmp_path):
    entry = case(tmp_path, "a")
    raw = Path(entry["image"]).read_bytes()
    Path(entry["image"]).write_bytes(raw[: len(raw) - 40])  # header intact, data cut short
    _, problems = problems_of(datalist(tmp_path, training=[entry]))
    assert len(problems) == 1 and problems[0].startswith(entry["image"]) and "truncated" in problems[0]


def test_truncated_uncompressed_image(tmp_path):
    path = Path(image(tmp_path / "a.nii"))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataCheckError, match=r"a\.nii: file truncated"):
        check_image_file(path)


def test_truncated_gz_label(tmp_path):
    entry = case(tmp_path, "a")
    raw = gzip.decompress(Path(entry["label"]).read_bytes())
    Path(entry["label"]).write_bytes(gzip.compress(raw)[:-30])
    _, problems = problems_of(datalist(tmp_path, training=[entry]))
    assert len(problems) == 1 and problems[0].startswith(entry["label"]) and "unreadable" in problems[0]


def test_empty_datalist(tmp_path):
    _, problems = problems_of(datalist(tmp_path, training=[], unlabeled=[], validation=[]))
    assert any("datalist.json: empty datalist" in p for p in problems)


def test_no_labeled_case(tmp_path):
    path = datalist(tmp_path, training=[])
    message, problems = problems_of(path)
    assert problems == [f"datalist {path}: no labeled case (section 'training' is missing or empty)"]
    assert check_datalist(path, require_labeled=False)["sections"]["training"] == 0


def test_required_nonempty_section(tmp_path):
    path = datalist(tmp_path, validation=[])
    assert check_datalist(path)["sections"]["validation"] == 0  # allowed unless asked for
    _, problems = problems_of(path, nonempty=["validation"])
    assert problems == [f"datalist {path}: section 'validation' is empty"]


def test_requested_section_missing(tmp_path):
    path = datalist(tmp_path)
    data = json.loads(path.read_text())
    del data["validation"]
    write_json(path, data)
    _, problems = problems_of(path)
    assert problems == [f"datalist {path}: no section 'validation' (available: ['training', 'unlabeled', 'test'])"]
    assert check_datalist(path, sections="training,unlabeled")["sections"] == {"training": 1, "unlabeled": 1}


def test_2d_image(tmp_path):
    flat = image(tmp_path / "flat.nii.gz", shape=(8, 8))
    _, problems = problems_of(datalist(tmp_path, unlabeled=[{"id": "f", "image": flat}]))
    assert problems == [f"{flat}: image is 2D with shape (8, 8); a 3D volume is required"]


def test_4d_image(tmp_path):
    cine = image(tmp_path / "cine.nii.gz", shape=(8, 8, 3, 5))
    _, problems = problems_of(datalist(tmp_path, unlabeled=[{"id": "c", "image": cine}]))
    assert problems == [
        f"{cine}: image is 4D (non-singleton 4th dimension) with shape (8, 8, 3, 5); a 3D volume is required"
    ]


def test_shape_mismatch(tmp_path):
    entry = case(tmp_path, "a", shape=(8, 8, 4))
    _, problems = problems_of(datalist(tmp_path, validation=[entry]))
    assert problems == [f"{entry['label']}: label shape (8, 8, 4) differs from image {entry['image']} shape (8, 8, 3)"]


def test_geometry_mismatch(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    entry = case(tmp_path, "a", affine=shifted)
    _, problems = problems_of(datalist(tmp_path, training=[entry]))
    assert len(problems) == 1 and problems[0].startswith(f"{entry['label']}: label geometry (affine) differs")
    assert "max difference 0.5" in problems[0]


def test_geometry_within_tolerance_passes(tmp_path):
    nudged = AFFINE.copy()
    nudged[0, 3] += 2e-4  # float32 header rounding is of this order
    entry = case(tmp_path, "a", affine=nudged)
    assert check_datalist(datalist(tmp_path, training=[entry]))["files_checked"] == 6


def test_label_values_out_of_range(tmp_path):
    entry = case(tmp_path, "a", values=(0, 1, 4, 7))
    _, problems = problems_of(datalist(tmp_path, training=[entry]))
    assert problems == [f"{entry['label']}: label values [4, 7] outside 0..3 (4 classes)"]
    assert check_datalist(datalist(tmp_path, training=[entry]), num_classes=8)["num_classes"] == 8


def test_negative_label_values(tmp_path):
    entry = case(tmp_path, "a", values=(0, -1), dtype=np.int16)
    _, problems = problems_of(datalist(tmp_path, training=[entry]))
    assert problems == [f"{entry['label']}: label values [-1] outside 0..3 (4 classes)"]


def test_non_integer_label_values(tmp_path):
    entry = case(tmp_path, "a", values=(0.0, 1.0, 2.5), dtype=np.float32)
    _, problems = problems_of(datalist(tmp_path, training=[entry]))
    assert problems == [f"{entry['label']}: non-integer label values [2.5] (labels must be whole class indices)"]
    whole = case(tmp_path, "b", values=(0.0, 3.0), dtype=np.float32)  # float dtype, whole values: fine
    assert check_datalist(datalist(tmp_path, training=[whole]))["sections"]["training"] == 1


def test_label_mapping(tmp_path):
    mapping = {"orig": list(range(14)), "target": [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]}
    labels9 = {str(i): f"organ{i}" for i in range(9)}
    raw = case(tmp_path, "a", values=(0, 6, 11, 13))  # raw BTCV values: valid once mapped
    path = datalist(tmp_path, training=[raw], unlabeled=[], validation=[], labels=labels9)
    with pytest.raises(DataCheckError, match=r"label values \[11, 13\] outside 0..8"):
        check_datalist(path)  # no mapping: raw values are out of range
    assert check_datalist(path, label_mapping=mapping)["num_classes"] == 9
    write_json(path, {**json.loads(path.read_text()), "label_mapping": mapping})
    assert check_datalist(path)["num_classes"] == 9  # the datalist's own mapping is the default
    bad = case(tmp_path, "b", values=(0, 14, 20))
    _, problems = problems_of(
        datalist(tmp_path, training=[bad], unlabeled=[], validation=[], labels=labels9), label_mapping=mapping
    )
    assert problems == [f"{bad['label']}: label values [14, 20] are not in label_mapping orig {list(range(14))}"]


def test_duplicate_ids(tmp_path):
    a, b = case(tmp_path, "a"), case(tmp_path, "b")
    b["id"] = "a"
    path = datalist(tmp_path, training=[a], validation=[b])
    _, problems = problems_of(path)
    assert problems == [f"datalist {path}: duplicate id 'a' (2 entries, in sections ['training', 'validation'])"]


def test_infinite_scale_slope(tmp_path):
    path = tmp_path / "scaled.nii.gz"
    img = nib.Nifti1Image(np.ones((8, 8, 3), np.int16), AFFINE)
    img.header["scl_slope"], img.header["scl_inter"] = np.inf, 0.0
    nib.save(img, str(path))
    # nibabel's Nifti1Image would reset the fields on save: write the header field directly
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[112:116] = np.array([np.inf], "<f4").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataCheckError) as err:
        check_image_file(path)
    assert err.value.problems == [
        f"{path}: invalid intensity scaling in header (scl_slope=inf, scl_inter=0.0); NaN/inf not allowed"
    ]


def test_nan_scale_intercept(tmp_path):
    path = tmp_path / "scaled.nii.gz"
    img = nib.Nifti1Image(np.ones((8, 8, 3), np.int16), AFFINE)
    nib.save(img, str(path))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[112:120] = np.array([2.0, np.nan], "<f4").tobytes()  # valid slope, NaN intercept
    path.write_bytes(gzip.compress(bytes(raw)))
    _, problems = problems_of(datalist(tmp_path, unlabeled=[{"id": "s", "image": str(path)}]))
    assert problems == [
        f"{path}: invalid intensity scaling in header (scl_slope=2.0, scl_inter=nan); NaN/inf not allowed"
    ]


def test_missing_label_key_in_labeled_section(tmp_path):
    entry = case(tmp_path, "a")
    del entry["label"]
    path = datalist(tmp_path, validation=[entry])
    _, problems = problems_of(path)
    assert problems == [
        f"datalist {path}: validation[0] id='a' ({entry['image']}) has no 'label' (required in section 'validation')"
    ]


def test_all_problems_reported_together(tmp_path):
    gone = case(tmp_path, "gone")
    Path(gone["image"]).unlink()
    wrong_values = case(tmp_path, "vals", values=(0, 9))
    wrong_shape = case(tmp_path, "shape", shape=(4, 8, 3))
    dup = case(tmp_path, "dup")
    dup["id"] = "vals"
    path = datalist(tmp_path, training=[gone, wrong_values], validation=[wrong_shape], unlabeled=[dup])
    message, problems = problems_of(path)
    assert len(problems) == 4
    assert message.startswith(f"4 data problem(s) in {path}:")
    for expected in (
        f"{gone['image']}: image file missing",
        f"{wrong_values['label']}: label values [9]",
        f"{wrong_shape['label']}: label shape (4, 8, 3)",
        "duplicate id 'vals'",
    ):
        assert sum(expected in p for p in problems) == 1, expected


def test_datalist_file_missing_or_invalid(tmp_path):
    with pytest.raises(DataCheckError, match=r"nothere\.json does not exist"):
        check_datalist(tmp_path / "nothere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataCheckError, match=r"bad\.json is not valid JSON"):
        check_datalist(bad)


def test_check_image_file(tmp_path):
    check_image_file(image(tmp_path / "ok.nii.gz"))  # passes silently
    with pytest.raises(DataCheckError, match=r"missing\.nii\.gz: image file missing"):
        check_image_file(tmp_path / "missing.nii.gz")
    with pytest.raises(DataCheckError, match=r"flat\.nii\.gz: image is 2D"):
        check_image_file(image(tmp_path / "flat.nii.gz", shape=(8, 8)))


def test_cli(tmp_path, capsys):
    cli(["--datalist", str(datalist(tmp_path))])
    assert capsys.readouterr().out.startswith(f"OK {tmp_path / 'datalist.json'}: training 1, unlabeled 1, validation 1")
    path = datalist(tmp_path, training=[])
    with pytest.raises(SystemExit) as exit_info:
        cli(["--datalist", str(path)])
    assert exit_info.value.code == 1
    assert "no labeled case" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["nan_all", "nan_one", "inf"])
def test_non_finite_image_values(tmp_path, bad):
    path = tmp_path / "bad.nii.gz"
    data = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    if bad == "nan_all":
        data[:] = np.nan
    elif bad == "nan_one":
        data[3, 4, 2] = np.nan
    else:
        data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    entry = {"id": "bad", "image": str(path), "label": label(tmp_path / "bad_gt.nii.gz")}
    _, problems = problems_of(datalist(tmp_path, training=[entry]))
    assert len(problems) == 1 and problems[0].startswith(f"{path}: image has non-finite values")
    expect = {"nan_all": "192 NaN and 0 inf", "nan_one": "1 NaN and 0 inf", "inf": "0 NaN and 1 inf"}[bad]
    assert expect in problems[0]
    with pytest.raises(DataCheckError) as err:
        check_image_file(path)  # inference inputs get the same check
    assert "non-finite" in err.value.problems[0]


def test_inference_folder_with_one_nan_volume_fails_before_work(tmp_path):
    from scripts.inference.inference_inputs import collect_inputs

    image(tmp_path / "good.nii.gz")
    data = np.full((8, 8, 3), np.nan, np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(DataCheckError) as err:
        collect_inputs(input_dir=str(tmp_path))
    assert len(err.value.problems) == 1 and "nan.nii.gz: image has non-finite values" in err.value.problems[0]
