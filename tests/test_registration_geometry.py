"""Conventions: RAS/LPS, SimpleITK export, closed-form RMSE, slice axis, in-plane shrink, point mapping."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from scripts.data.atomic_io import save_nifti
from scripts.registration.geometry import (
    GeometryError,
    affine_rmse,
    apply_affine,
    grid_moments,
    sitk_image_affine,
    sitk_image_from_array,
    slice_axis,
)
from scripts.registration.point_mapping import map_slice_points
from scripts.registration.synthetic import known_affine, oblique_affine
from scripts.registration.transform import PairTransform
from scripts.registration.volumes import Volume, shrink_in_plane

FLIP = np.array([-1.0, -1.0, 1.0])


def _field_transform():
    rng = np.random.default_rng(0)
    field = rng.normal(0, 2.0, (3, 4, 5, 3)).astype(np.float32)
    grid = oblique_affine((20.0, 18.0, 30.0), (4, 5, 3), (5, 3, -4))
    return PairTransform(known_affine(), field, grid)


def test_sitk_reads_nifti_affine_like_nibabel(tmp_path):
    affine = oblique_affine((1.7, 1.9, 9.0), (12, 10, 5), (12, -7, 4), centre=(3, -20, 40))
    save_nifti(np.zeros((12, 10, 5), np.float32), affine, tmp_path / "v.nii.gz")
    img = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    np.testing.assert_allclose(sitk_image_affine(img), affine, atol=1e-4)
    img2 = sitk_image_from_array(np.zeros((12, 10, 5)), affine)
    assert img2.GetSize() == (12, 10, 5)
    np.testing.assert_allclose(sitk_image_affine(img2), affine, atol=1e-9)


@pytest.mark.parametrize("deformable", [False, True])
def test_pair_transform_sitk_round_trip_maps_same_points(deformable):
    t = _field_transform() if deformable else PairTransform(known_affine())
    pts = np.random.default_rng(1).uniform(-25, 25, (50, 3))
    ours = t.map_points(pts)
    tx = t.to_sitk()
    theirs = np.array([tx.TransformPoint(tuple(p * FLIP)) for p in pts]) * FLIP
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    back = PairTransform.from_sitk(tx)
    np.testing.assert_allclose(back.map_points(pts), ours, atol=1e-4)
    assert back.is_affine == (not deformable)


def test_displacement_is_zero_far_outside_field_grid():
    t = _field_transform()
    far = np.array([[1e4, 1e4, 1e4]])
    np.testing.assert_allclose(t.displacement(far), 0.0)


def test_slice_axis_largest_spacing_ties_to_axis_2():
    assert slice_axis(np.diag([1.5, 1.5, 10.0, 1])) == 2
    assert slice_axis(np.diag([8.0, 1.5, 1.5, 1])) == 0
    assert slice_axis(np.diag([2.0, 2.0, 2.0, 1])) == 2
    assert slice_axis(oblique_affine((1.0, 9.0, 2.0), (4, 4, 4))) == 1


def test_affine_rmse_closed_form_matches_brute_force():
    affine = oblique_affine((2.0, 2.5, 9.0), (9, 7, 5), (5, 6, 7), centre=(10, 4, -3))
    m = known_affine((0, 0, 4.0), (1.02, 0.97, 1.01), (1.0, -2.0, 0.5))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in (9, 7, 5)], indexing="ij"), -1).reshape(-1, 3)
    pts = apply_affine(affine, idx.astype(float))
    brute = np.sqrt(np.mean(np.sum((apply_affine(m, pts) - pts) ** 2, axis=1)))
    mean, cov = grid_moments((9, 7, 5), affine)
    assert affine_rmse(m, mean, cov) == pytest.approx(brute, rel=1e-9)
    assert affine_rmse(np.eye(4), mean, cov) == pytest.approx(0.0, abs=1e-12)


def test_shrink_in_plane_keeps_world_positions_and_slices():
    affine = oblique_affine((1.5, 1.5, 10.0), (12, 9, 4), (5, 0, 10))
    arr = np.random.default_rng(0).random((12, 9, 4)).astype(np.float32)
    small = shrink_in_plane(Volume(arr, affine), 3.0)
    assert small.shape == (6, 4, 4)
    # the world centre of a shrunk voxel is the mean of its block's centres; its value their mean
    block = np.array([[0, 2, 1], [1, 2, 1], [0, 3, 1], [1, 3, 1]], float)
    np.testing.assert_allclose(
        apply_affine(small.affine, np.array([[0.0, 1.0, 1.0]]))[0], apply_affine(affine, block).mean(0), atol=1e-9
    )
    assert small.array[0, 1, 1] == pytest.approx(arr[0:2, 2:4, 1].mean(), rel=1e-6)


def test_map_slice_points_matches_explicit_composition_numpy_and_torch():
    a_i = oblique_affine((1.6, 1.6, 8.0), (20, 22, 6), (3, 4, 5))
    a_j = oblique_affine((1.4, 1.8, 10.0), (24, 20, 5), (-5, 2, 0), centre=(4, 4, 4))
    t = known_affine()
    pix = np.array([[0.0, 0.0], [3.5, 7.0], [19.0, 21.0]])
    out = map_slice_points(t, a_i, a_j, 2, pix)
    vox_i = np.c_[pix, np.full(3, 2.0)]
    expect = apply_affine(np.linalg.inv(a_j) @ t @ a_i, vox_i)
    np.testing.assert_allclose(out, expect, atol=1e-9)
    out_t = map_slice_points(torch.tensor(t), a_i, a_j, 2, torch.tensor(pix, dtype=torch.float32))
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (3, 3)
    np.testing.assert_allclose(out_t.numpy(), expect, atol=1e-4)
    # a PairTransform with a field goes through the same path
    tf = _field_transform()
    out_f = map_slice_points(tf, a_i, a_j, 2, pix)
    np.testing.assert_allclose(out_f, apply_affine(np.linalg.inv(a_j), tf.map_points(apply_affine(a_i, vox_i))))
    with pytest.raises(GeometryError):
        map_slice_points(t, a_i, a_j, 2, np.zeros((3, 3)))
