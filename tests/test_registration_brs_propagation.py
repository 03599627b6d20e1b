"""BRS picks the partner known to register best; propagation puts labels on the target grid."""

import numpy as np
import pytest
from monai.transforms import LoadImaged

from scripts.data.atomic_io import save_nifti
from scripts.registration.brs import BestRegistrationSelector
from scripts.registration.engine import PairResult
from scripts.registration.propagation import PropagateLabeld, PropagationError, majority_vote, warp_to_grid
from scripts.registration.store import TransformTable
from scripts.registration.synthetic import known_affine, oblique_affine, render
from scripts.registration.transform import PairTransform

A_J = oblique_affine((2.5, 2.5, 9.0), (48, 48, 7), (4, -3, 2))
A_Q = oblique_affine((2.2, 2.4, 10.0), (52, 50, 6), (-5, 4, 3), centre=(3, -2, 1))


def _dice(a, b, c):
    return 2 * np.sum((a == c) & (b == c)) / max(1, np.sum(a == c) + np.sum(b == c))


def _table(pairs):
    return TransformTable.from_results([PairResult(f, m, PairTransform(t)) for (f, m), t in pairs.items()])


@pytest.fixture()
def target(tmp_path):
    im, lab = render((48, 48, 7), A_J)
    save_nifti(im, A_J, tmp_path / "j.nii.gz")
    save_nifti(lab, A_J, tmp_path / "j_label.nii.gz", dtype=np.uint8)
    return str(tmp_path / "j.nii.gz"), lab


def test_brs_prefers_the_consistent_round_trip(target):
    path, _ = target
    t = known_affine((0, 0, 6), (1.03, 0.98, 1.0), (4, -2, 1))
    bad = known_affine((0, 0, -3), (1.0, 1.0, 1.0), (6, 5, 0))
    table = _table(
        {
            ("j", "good"): t,
            ("good", "j"): np.linalg.inv(t),
            ("j", "poor"): t,
            ("poor", "j"): np.linalg.inv(t) @ bad,
            ("j", "slight"): t,
            ("slight", "j"): np.linalg.inv(t) @ known_affine((0, 0, 1), (1, 1, 1), (1, 0, 0)),
        }
    )
    sel = BestRegistrationSelector(w_rmse=0.1, w_mi=1.0, spacing=5.0)
    ranked = sel.rank(table, "j", path, ["poor", "slight", "good", "missing"])
    assert [s.partner for s in ranked] == ["good", "slight", "poor", "missing"]
    assert ranked[0].rmse == pytest.approx(0.0, abs=1e-6) and ranked[0].mi == pytest.approx(1.0, abs=1e-3)
    assert ranked[2].rmse > ranked[1].rmse > 0 and ranked[2].mi < ranked[0].mi
    assert ranked[-1].score == float("inf")
    # MI alone also ranks them
    only_mi = BestRegistrationSelector(w_rmse=0.0, w_mi=1.0, spacing=5.0).rank(table, "j", path, ["poor", "good"])
    assert only_mi[0].partner == "good"
    # a single labeled volume: nothing to choose, still works
    assert [s.partner for s in sel.rank(table, "j", path, ["poor"])] == ["poor"]


@pytest.mark.parametrize("mode", ["nearest", "onehot"])
def test_propagated_label_matches_the_target_anatomy(target, mode):
    _, lab_j = target
    t_jq = known_affine((0, 0, 7), (1.04, 0.96, 1.0), (5, -4, 2))  # j -> q
    _, lab_q = render((52, 50, 6), A_Q, np.linalg.inv(t_jq))  # q's anatomy = j's through T_jq
    out = warp_to_grid(lab_q, A_Q, (48, 48, 7), A_J, PairTransform(t_jq), mode=mode, num_classes=4)
    assert out.shape == lab_j.shape
    inside = lab_j > 0
    assert np.mean(out[inside] == lab_j[inside]) > 0.75  # slices are 10 mm apart: edges differ
    for c in (1, 2, 3):
        assert _dice(out, lab_j, c) > 0.7
    wrong = warp_to_grid(lab_q, A_Q, (48, 48, 7), A_J, PairTransform(np.linalg.inv(t_jq)), mode=mode, num_classes=4)
    assert _dice(wrong, lab_j, 3) < _dice(out, lab_j, 3) - 0.1  # direction matters


def test_identity_warp_onto_a_permuted_grid_is_exact():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, (6, 5, 4)).astype(np.uint8)
    a = oblique_affine((2.0, 2.0, 8.0), (6, 5, 4), (3, 2, 1))
    # the same voxels indexed in reverse along axis 0
    flip = a.copy()
    flip[:3, 0] = -a[:3, 0]
    flip[:3, 3] = a[:3, 3] + 5 * a[:3, 0]
    out = warp_to_grid(lab, a, (6, 5, 4), flip, PairTransform(np.eye(4)), mode="nearest")
    np.testing.assert_array_equal(out, lab[::-1])


def test_propagate_labeld_caches_on_the_image_grid(tmp_path, target):
    path, lab_j = target
    _, lab_q = render((52, 50, 6), A_Q)
    save_nifti(lab_q, A_Q, tmp_path / "q_label.nii.gz", dtype=np.uint8)
    table = _table({("j", "q"): np.eye(4)})
    tr = PropagateLabeld("registered_label", table, {"q": str(tmp_path / "q_label.nii.gz")}, tmp_path / "cache")
    d = tr({"id": "j", "image": path, "partner": "q"})
    assert d["registered_label"].endswith("j__from__q.nii.gz")
    loaded = LoadImaged(["image", "registered_label"], image_only=True)(d)
    assert loaded["registered_label"].shape == loaded["image"].shape
    np.testing.assert_allclose(loaded["registered_label"].affine, loaded["image"].affine, atol=1e-5)
    assert _dice(np.asarray(loaded["registered_label"]), lab_j, 3) > 0.7
    with pytest.raises(PropagationError, match="no successful transform"):
        tr({"id": "j", "image": path, "partner": "q2"}) if False else PropagateLabeld(
            "registered_label", table, {"q2": "x"}, tmp_path / "cache"
        )({"id": "j", "image": path, "partner": "q2"})


def test_majority_vote_breaks_ties_towards_the_first_map():
    a = np.array([1, 1, 2, 0])
    b = np.array([1, 2, 3, 3])
    c = np.array([2, 2, 3, 0])
    np.testing.assert_array_equal(majority_vote([a, b, c], 4), [1, 2, 3, 0])
    np.testing.assert_array_equal(majority_vote([a, b], 4), [1, 1, 2, 0])
    single = majority_vote([c.astype(np.int64)], 4)
    assert single.dtype == np.uint8
    np.testing.assert_array_equal(single, c)


def test_usable_partners_drop_failed_pairs_and_keep_the_ranking_order():
    import math

    from scripts.registration.brs import BRSScore, usable

    ranked = [
        BRSScore("t", "a", 0.5, 1.0, 0.1),
        BRSScore("t", "b", 0.9, 2.0, 0.1),
        BRSScore("t", "c", math.inf, math.nan, math.nan),
    ]
    assert [s.partner for s in usable(ranked)] == ["a", "b"]
    assert [s.partner for s in usable(ranked, 1)] == ["a"]
    assert usable(ranked[2:], 3) == []
