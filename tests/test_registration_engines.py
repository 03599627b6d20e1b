"""Both engines recover a known world transform; T_ij direction; failures are recorded, not raised."""

import numpy as np
import pytest
import torch

from scripts.data.atomic_io import save_nifti
from scripts.registration.engine import PairSpec, make_engine
from scripts.registration.synthetic import grid_points, known_affine, oblique_affine, render

SHAPE_I, SHAPE_J = (56, 56, 8), (60, 52, 7)
FAST_TORCH = dict(levels=(5.0, 2.5), iterations=(60, 40), num_points=1024, lr=0.03)
FAST_SITK = dict(levels=(5.0, 2.5), iterations=(60, 40), sampling=0.3)


def _pair(tmp_path, t_true, name="j", angles=(-6, 5, -4)):
    """Volume i and volume j whose anatomy is i's seen through T_ij = t_true (i -> j)."""
    a_i = oblique_affine((2.5, 2.5, 9.0), SHAPE_I, (5, -4, 3))
    a_j = oblique_affine((2.3, 2.7, 10.0), SHAPE_J, angles, centre=(4, 3, -2))
    im_i, lab_i = render(SHAPE_I, a_i)
    im_j, _ = render(SHAPE_J, a_j, np.linalg.inv(t_true))
    save_nifti(im_i, a_i, tmp_path / "i.nii.gz")
    save_nifti(im_j, a_j, tmp_path / f"{name}.nii.gz")
    pts = grid_points(SHAPE_I, a_i)[lab_i.ravel() > 0]
    return PairSpec("i", str(tmp_path / "i.nii.gz"), name, str(tmp_path / f"{name}.nii.gz")), pts


def _errors(result, pts, t_true):
    est = result.transform.map_points(pts)
    err = np.linalg.norm(est - (pts @ t_true[:3, :3].T + t_true[:3, 3]), axis=1)
    inv = np.linalg.inv(t_true)
    err_inv = np.linalg.norm(est - (pts @ inv[:3, :3].T + inv[:3, 3]), axis=1)
    return err.mean(), err_inv.mean()


@pytest.mark.parametrize(
    "engine,settings",
    [
        ("torch", FAST_TORCH),
        ("torch", dict(FAST_TORCH, roi_fraction=0.7, search_extent=20.0, search_step=10.0, init="moments")),
        ("sitk", FAST_SITK),
    ],
)
def test_engine_recovers_known_affine_in_the_ij_direction(tmp_path, engine, settings):
    torch.set_num_threads(1)
    t_true = known_affine((0, 0, 7.0), (1.05, 0.95, 1.0), (6.0, -5.0, 3.0))
    spec, pts = _pair(tmp_path, t_true)
    (res,) = make_engine(engine, **settings).register_batch([spec])
    assert res.ok, res.reason
    err, err_inv = _errors(res, pts, t_true)
    assert err < 0.5 * 2.5, f"mean point error {err:.2f} mm is not well below a voxel"
    assert err_inv > 3 * err + 2.0  # the result is T_ij (i -> j), not its inverse


def test_torch_batch_pairs_are_independent(tmp_path):
    torch.set_num_threads(1)
    t1 = known_affine((0, 0, 6.0), (1.0, 1.0, 1.0), (5.0, 0.0, 0.0))
    t2 = known_affine((0, 0, -5.0), (0.95, 1.05, 1.0), (-4.0, 6.0, 2.0))
    s1, pts = _pair(tmp_path, t1, "j1")
    s2, _ = _pair(tmp_path, t2, "j2", angles=(3, -2, 8))
    r1, r2 = make_engine("torch", **FAST_TORCH).register_batch([s1, s2])
    assert _errors(r1, pts, t1)[0] < 1.25 and _errors(r2, pts, t2)[0] < 1.25


@pytest.mark.parametrize(
    "engine,settings",
    [
        ("torch", dict(FAST_TORCH, deformable=True, field_iterations=30, field_spacing=(25.0, 25.0, 30.0))),
        ("sitk", dict(FAST_SITK, bspline=True, bspline_spacing=40.0, bspline_iterations=15)),  # affine + B-spline (CT)
        (
            "sitk",
            dict(FAST_SITK, bspline=True, bspline_spacing=40.0, bspline_iterations=15, bspline_metric="meansquares"),
        ),
    ],
)
def test_deformable_exports_a_field_and_stays_accurate(tmp_path, engine, settings):
    torch.set_num_threads(1)
    t_true = known_affine((0, 0, 5.0), (1.0, 1.0, 1.0), (4.0, -3.0, 0.0))
    spec, pts = _pair(tmp_path, t_true)
    (res,) = make_engine(engine, **settings).register_batch([spec])
    assert res.ok and not res.transform.is_affine
    assert res.transform.field.shape[0] == 3
    assert _errors(res, pts, t_true)[0] < 2.5  # within a voxel: the field must not wreck the affine


@pytest.mark.parametrize("engine,settings", [("torch", FAST_TORCH), ("sitk", FAST_SITK)])
def test_failing_pair_is_recorded_with_reason(tmp_path, engine, settings):
    """An unreadable volume is an input error (retried by the next run), told apart from a failed registration."""
    from scripts.registration.engine import INPUT_ERROR

    spec, _ = _pair(tmp_path, known_affine())
    bad = PairSpec("i", spec.fixed_path, "missing", str(tmp_path / "missing.nii.gz"))
    results = make_engine(engine, **dict(settings, iterations=(5, 5))).register_batch([spec, bad])
    assert [r.moving_id for r in results] == ["j", "missing"]
    assert results[0].ok
    assert results[1].status == INPUT_ERROR and "missing.nii.gz" in results[1].reason


def test_blank_moving_volume_is_recorded_as_failed(tmp_path):
    spec, _ = _pair(tmp_path, known_affine())
    a = oblique_affine((2.5, 2.5, 9.0), (30, 30, 6), (0, 0, 0), centre=(4000, 0, 0))  # no overlap at all
    save_nifti(np.zeros((30, 30, 6), np.float32), a, tmp_path / "far.nii.gz")
    far = PairSpec("i", spec.fixed_path, "far", str(tmp_path / "far.nii.gz"))
    (res,) = make_engine("torch", **dict(FAST_TORCH, init="identity", iterations=(5, 5))).register_batch([far])
    assert res.status == "failed" and res.reason


def test_sitk_bspline_settings_name_the_metric_and_the_evaluation_cap():
    engine = make_engine("sitk", bspline=True, bspline_metric="meansquares", bspline_evaluations=50)
    assert engine.settings()["bspline_metric"] == "meansquares" and engine.settings()["bspline_evaluations"] == 50
    assert "bspline_metric" not in make_engine("sitk").settings()  # affine-only folders keep their names
    with pytest.raises(ValueError, match="bspline_metric"):
        make_engine("sitk", bspline=True, bspline_metric="ncc")


def test_unknown_engine_and_bad_settings_raise():
    with pytest.raises(ValueError, match="unknown registration engine"):
        make_engine("elastix")
    with pytest.raises(ValueError, match="metric"):
        make_engine("torch", metric="ssd")


def test_inplane_dof_never_tilts_the_slice_plane(tmp_path):
    spec, _ = _pair(tmp_path, known_affine((0, 0, 7.0), (1.05, 0.95, 1.0), (6.0, -5.0, 3.0)))
    (res,) = make_engine("torch", **dict(FAST_TORCH, dof="inplane", iterations=(20, 10))).register_batch([spec])
    assert res.ok
    a_i = oblique_affine((2.5, 2.5, 9.0), SHAPE_I, (5, -4, 3))
    q, _ = np.linalg.qr(a_i[:3, :3])
    m = q.T @ res.transform.matrix[:3, :3] @ q
    np.testing.assert_allclose([m[0, 2], m[1, 2], m[2, 0], m[2, 1]], 0.0, atol=1e-5)
    assert abs(m[0, 1]) > 1e-3  # but it did rotate in-plane


def _device_pair(tmp_path):
    t_true = known_affine((0, 0, 5.0), (1.0, 1.0, 1.0), (4.0, -3.0, 0.0))
    return _pair(tmp_path, t_true)[0]


def test_torch_engine_device_choice_and_cpu_fallback(tmp_path, caplog):
    """'auto' picks CUDA only when present; 'cuda' without a GPU registers on the CPU (warning) with the CPU's
    results; the device is not part of the settings that name the registration folder."""
    torch.set_num_threads(1)
    from scripts.registration.torch_engine import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    settings = dict(FAST_TORCH, deformable=True, field_iterations=10, field_spacing=(25.0, 25.0, 30.0))
    cpu = make_engine("torch", device="cpu", **settings)
    assert (
        "device" not in cpu.settings() and cpu.settings() == make_engine("torch", device="auto", **settings).settings()
    )
    if torch.cuda.is_available():
        pytest.skip("the CPU fallback is only reachable without a GPU (the CUDA comparison is the next test)")
    spec = _device_pair(tmp_path)
    with caplog.at_level("WARNING"):
        fallback = make_engine("torch", device="cuda", **settings)
    assert fallback.device.type == "cpu" and "CUDA is not available" in caplog.text
    (a,), (b,) = cpu.register_batch([spec]), fallback.register_batch([spec])
    assert (
        a.ok
        and np.array_equal(a.transform.matrix, b.transform.matrix)
        and np.array_equal(a.transform.field, b.transform.field)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_torch_engine_on_cuda_matches_the_cpu(tmp_path):
    torch.set_num_threads(1)
    spec = _device_pair(tmp_path)
    settings = dict(FAST_TORCH, deformable=True, field_iterations=10, field_spacing=(25.0, 25.0, 30.0))
    (a,) = make_engine("torch", device="cpu", **settings).register_batch([spec])
    (b,) = make_engine("torch", device="cuda", **settings).register_batch([spec])
    assert a.ok and b.ok
    pts = grid_points(SHAPE_I, oblique_affine((2.5, 2.5, 9.0), SHAPE_I, (5, -4, 3)))
    gap = np.linalg.norm(a.transform.map_points(pts) - b.transform.map_points(pts), axis=1)
    assert gap.max() < 0.25, f"CPU and CUDA transforms differ by up to {gap.max():.3f} mm"


def test_sitk_engine_is_deterministic_with_seed_zero(tmp_path):
    """ITK reads a sampling seed of 0 as 'from the wall clock'; the engine's seeds (0 included) must repeat."""
    spec, _ = _pair(tmp_path, known_affine((0, 0, 5.0), (1.0, 1.0, 1.0), (4.0, -3.0, 0.0)))
    engine = make_engine("sitk", **dict(FAST_SITK, iterations=(20, 10), seed=0))
    (r1,), (r2,) = engine.register_batch([spec]), engine.register_batch([spec])
    assert np.allclose(r1.transform.matrix, r2.transform.matrix, rtol=0, atol=1e-6)  # float noise only
