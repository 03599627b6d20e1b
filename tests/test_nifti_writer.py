"""Predictions keep their input's NIfTI qform/sform codes (MONAI's writer stamps 1/1)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged, SaveImaged

from scripts.inference.nifti_writer import AtomicNibabelWriter

AFFINE = np.array([[0.0, 0.0, 8.0, 1.0], [1.4, 0.0, 0.0, -2.0], [0.0, 1.4, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize("qform, sform", [(0, 2), (1, 1), (2, 0), (1, 4)])
def test_prediction_keeps_input_header_codes(tmp_path, qform, sform):
    src = nib.Nifti1Image(np.random.default_rng(0).random((6, 5, 3)).astype(np.float32), AFFINE)
    src.set_qform(AFFINE, code=qform)
    src.set_sform(AFFINE, code=sform)
    path = tmp_path / "vol.nii.gz"
    nib.save(src, str(path))
    data = LoadImaged(keys="image", image_only=True, ensure_channel_first=True)({"image": str(path)})
    out = tmp_path / "out"
    SaveImaged(
        keys="image",
        output_dir=str(out),
        output_postfix="seg",
        resample=False,
        separate_folder=False,
        writer=AtomicNibabelWriter,
        print_log=False,
        output_dtype=np.uint8,
    )(data)
    pred = nib.load(out / "vol_seg.nii.gz")
    assert (int(pred.header["qform_code"]), int(pred.header["sform_code"])) == (qform, sform)
    np.testing.assert_allclose(pred.affine, nib.load(str(path)).affine, atol=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["vol_seg.nii.gz"]  # no temporary left behind
