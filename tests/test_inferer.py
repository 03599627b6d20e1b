"""Slice-wise inference: resize to the patch and back, output on the input grid."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.inference.inferer import SliceResizeInferer


class SliceFingerprint(torch.nn.Module):
    """Two output channels: the input itself, and the mean of each input slice broadcast."""

    def __init__(self, patch):
        super().__init__()
        self.patch = tuple(patch)

    def forward(self, x):
        assert tuple(x.shape[2:]) == self.patch, "network must see the patch size"
        mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        return torch.cat([x, mean], 1)


@pytest.mark.parametrize("spacing, axis", [((1.5, 1.5, 10.0), 2), ((10.0, 1.5, 1.5), 0)])
def test_output_keeps_input_shape_and_slices(spacing, axis):
    shape = [1, 1, 12, 10, 9]
    shape[2 + axis] = 4
    vol = torch.zeros(shape)
    for s in range(4):  # each slice has its own constant value
        vol.select(2 + axis, s).fill_(float(s + 1))
    img = MetaTensor(vol, affine=torch.as_tensor(np.diag([*spacing, 1.0])))
    out = SliceResizeInferer(patch_size=(16, 16), sw_batch_size=3)(img, SliceFingerprint((16, 16)))
    assert out.shape == (1, 2, *shape[2:])
    assert isinstance(out, MetaTensor)
    for s in range(4):
        torch.testing.assert_close(
            out[:, 1].select(1 + axis, s), torch.full_like(out[:, 1].select(1 + axis, s), s + 1.0)
        )
    # constant slices survive resize -> network -> resize back
    torch.testing.assert_close(out[:, 0], vol[:, 0])


def test_resize_round_trip_of_smooth_image_is_close():
    x = torch.linspace(0, 1, 40)
    plane = x[:, None] * x[None, :]
    vol = plane[None, None, :, :, None].repeat(1, 1, 1, 1, 3)
    out = SliceResizeInferer(patch_size=(64, 64))(vol, lambda t: t)
    assert out.shape == vol.shape
    assert (out - vol).abs().max() < 0.02


def test_flip_tta_averages_the_four_mirror_images_mirrored_back():
    """A network that sees position (a ramp added to its output) gives a different map per mirror image;
    TTA returns the mean of the four, each mirrored back, and leaves an equivariant network unchanged."""
    torch.manual_seed(0)
    vol = torch.rand(1, 1, 8, 8, 2)
    ramp = torch.arange(64.0).reshape(1, 1, 8, 8)

    def positional(t):
        return t + ramp

    out = SliceResizeInferer(patch_size=(8, 8), flip_tta=True)(vol, positional)
    mirrored = [ramp, ramp.flip(2), ramp.flip(3), ramp.flip((2, 3))]
    expected = vol + (sum(mirrored) / 4.0)[..., None]
    torch.testing.assert_close(out, expected)
    plain = SliceResizeInferer(patch_size=(8, 8))(vol, positional)
    assert not torch.allclose(plain, out)
    torch.testing.assert_close(SliceResizeInferer(patch_size=(8, 8), flip_tta=True)(vol, lambda t: 2 * t), 2 * vol)


def test_flip_tta_is_refused_for_a_model_trained_without_flips():
    from scripts.training.model_config import ModelConfigError, checked_flip_tta

    assert checked_flip_tta({"flip_augmentation": True}, True) is True
    assert checked_flip_tta({}, True) is True  # descriptions before 0.4.2: trained with flips
    assert checked_flip_tta({"flip_augmentation": False}, False) is False
    with pytest.raises(ModelConfigError, match="without mirror flips"):
        checked_flip_tta({"flip_augmentation": False}, True)


def test_rejects_non_volume_input():
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        SliceResizeInferer(patch_size=(8, 8))(torch.rand(1, 1, 8, 8), lambda t: t)
    with pytest.raises(ValueError, match="2D"):
        SliceResizeInferer(patch_size=(8, 8, 8))


def test_evaluation_inputs_pair_images_and_labels_in_one_folder(tmp_path):
    """One folder with case.nii.gz and case_gt.nii.gz: each image gets its label, the labels are not cases,
    and an image without a label is named."""
    import nibabel as nib
    import numpy as np
    import pytest

    from scripts.data.data_checks import DataCheckError
    from scripts.inference.inference_inputs import collect_labeled_inputs

    rng = np.random.default_rng(0)
    for name in ("a", "a_gt", "b", "b_seg"):  # images hold anatomy (a constant image is refused), labels may be empty
        data = rng.random((6, 6, 3)).astype(np.float32) if "_" not in name else np.zeros((6, 6, 3), np.uint8)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    items = collect_labeled_inputs(image_dir=str(tmp_path), label_dir=str(tmp_path))
    assert [(p["image"].split("/")[-1], p["label"].split("/")[-1]) for p in items] == [
        ("a.nii.gz", "a_gt.nii.gz"),
        ("b.nii.gz", "b_seg.nii.gz"),
    ]
    nib.save(nib.Nifti1Image(rng.random((6, 6, 3)).astype(np.float32), np.eye(4)), str(tmp_path / "c.nii.gz"))
    with pytest.raises(DataCheckError, match="c.nii.gz: no label for this image"):
        collect_labeled_inputs(image_dir=str(tmp_path), label_dir=str(tmp_path))
