"""Slice-axis choice and random slice sampling."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.slicing import RandSliced, extract_slice, resolve_slice_axis, through_plane_axis, voxel_spacing


def _affine(spacing, rotation=None):
    a = np.eye(4)
    r = np.eye(3) if rotation is None else rotation
    a[:3, :3] = r @ np.diag(spacing)
    a[:3, 3] = [10.0, -20.0, 5.0]
    return a


def _rot_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


@pytest.mark.parametrize(
    "spacing, axis",
    [((1.5, 1.5, 10.0), 2), ((10.0, 1.5, 1.5), 0), ((1.2, 8.0, 1.2), 1), ((1.0, 1.0, 1.0), 2), ((2.0, 2.0, 1.0), 1)],
)
def test_through_plane_axis_is_largest_spacing_ties_to_last(spacing, axis):
    assert through_plane_axis(_affine(spacing)) == axis
    # an oblique direction does not change which voxel axis is through-plane
    assert through_plane_axis(_affine(spacing, _rot_z(33))) == axis
    np.testing.assert_allclose(voxel_spacing(_affine(spacing, _rot_z(33))), spacing)


def test_resolve_slice_axis_fixed_and_invalid():
    assert resolve_slice_axis(0, _affine((1, 1, 9))) == 0
    assert resolve_slice_axis("auto", _affine((1, 1, 9))) == 2
    with pytest.raises(ValueError, match="slice_axis"):
        resolve_slice_axis(3, np.eye(4))


def test_rand_sliced_same_index_for_all_keys_and_geometry_kept():
    vol = torch.arange(1 * 6 * 5 * 4, dtype=torch.float32).reshape(1, 6, 5, 4)
    aff = _affine((1.5, 1.5, 10.0))
    data = {
        "image": MetaTensor(vol, affine=torch.as_tensor(aff)),
        "label": MetaTensor(vol * 2, affine=torch.as_tensor(aff)),
    }
    t = RandSliced(["image", "label"])
    seen = set()
    for seed in range(20):
        t.set_random_state(seed)
        out = t(data)
        z = out["slice_index"]
        seen.add(z)
        assert out["slice_axis"] == 2
        assert out["image"].shape == (1, 6, 5)
        assert torch.equal(out["image"].as_tensor(), vol[..., z])
        assert torch.equal(out["label"].as_tensor(), 2 * vol[..., z])
        # in-plane geometry of the slice: spacing kept
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out["image"].affine)[:2, :2], axis=0), [1.5, 1.5])
    assert seen == {0, 1, 2, 3}  # every slice reachable


def test_rand_sliced_uses_through_plane_axis_of_file():
    vol = torch.rand(1, 3, 7, 8)
    data = {"image": MetaTensor(vol, affine=torch.as_tensor(_affine((9.0, 1.4, 1.4))))}
    out = RandSliced("image")(data)
    assert out["slice_axis"] == 0 and out["image"].shape == (1, 7, 8)
    assert torch.equal(out["image"].as_tensor(), vol[:, out["slice_index"]])


def test_extract_slice_rejects_2d():
    with pytest.raises(ValueError, match="channel-first 3D"):
        extract_slice({"image": torch.rand(1, 4, 4)}, ["image"], 2, 0)
