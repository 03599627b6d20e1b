"""Atomic writes leave either the whole new file or the old one, never a partial file."""

import os

import nibabel as nib
import numpy as np
import pytest

from scripts.data.atomic_io import atomic_path, save_nifti, write_json


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_old_content(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{bro")
            raise RuntimeError
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_save_nifti_geometry_and_dtype(tmp_path):
    affine = np.array([[0, -1.5, 0, 10], [1.4, 0, 0, -3], [0, 0, 9.0, 2], [0, 0, 0, 1]])
    arr = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    path = tmp_path / "x.nii.gz"
    save_nifti(arr, affine, path, dtype=np.uint8)
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, affine)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
