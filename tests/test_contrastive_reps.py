"""REPS: memory-bank FIFO / replacement / capacity, coordinate frames through augmentation, and
registered positive look-up on phantom volumes with an exactly known transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandAxisFlipd, RandRotate90d, RandRotated, Resized
from scipy.spatial.transform import Rotation

from scripts.contrastive.memory_bank import SliceFeatureBank, bank_capacity, registered_positives
from scripts.contrastive.registered_correspondence import RegisteredCorrespondence
from scripts.contrastive.slice_coordinates import SliceCoordinatesd, fit_patch_frames
from scripts.data.phantom import sample_subjects, true_transform, with_pose
from scripts.registration import map_slice_points

torch.set_num_threads(1)
IDENTITY_FRAME = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)


def _push(bank, vol, sl, value):
    bank.push(torch.tensor([vol]), torch.tensor([sl]), torch.full((1, 2, 3, 3), float(value)), IDENTITY_FRAME)


def test_bank_fifo_replacement_and_capacity():
    bank = SliceFeatureBank(capacity=3, channels=2, height=3, width=3, num_volumes=4, max_slices=5)
    for n, key in enumerate([(0, 0), (0, 1), (1, 0)]):
        _push(bank, *key, n)
    assert bank.keys() == [(0, 0), (0, 1), (1, 0)]
    _push(bank, 0, 0, 10)  # replacement: same key, new content, becomes the newest, nothing evicted
    assert bank.keys() == [(0, 1), (1, 0), (0, 0)] and len(bank) == 3
    _push(bank, 2, 4, 20)  # full: the oldest (0, 1) leaves
    assert bank.keys() == [(1, 0), (0, 0), (2, 4)]
    assert int(bank.slot_of[0, 1]) == -1
    uv = torch.tensor([[1.0, 1.0]] * 3, dtype=torch.float64)
    feats, found = bank.lookup(torch.tensor([0, 2, 0]), torch.tensor([0, 4, 1]), uv, torch.ones(3, dtype=torch.bool))
    assert found.tolist() == [True, True, False]
    assert feats[:, 0].tolist() == [10.0, 20.0, 0.0]
    assert bank.bytes_per_slice == 2 * 3 * 3 * 4 + 6 * 8
    assert bank_capacity(40, 160) == 40 and bank_capacity(40, 160, max_slices=25) == 25 and bank_capacity(1, 0) == 1


def test_bank_state_restores_maps_and_fifo_order(tmp_path):
    """A checkpointed bank (state -> torch.save -> load -> from_state) looks up and evicts like the original."""
    bank = SliceFeatureBank(capacity=3, channels=2, height=3, width=3, num_volumes=4, max_slices=5, dtype=torch.float16)
    for n, key in enumerate([(0, 0), (0, 1), (1, 0), (0, 0)]):  # (0, 0) replaced: the FIFO order is not the slot order
        _push(bank, *key, n + 1)
    torch.save(bank.state(), tmp_path / "bank.pt")
    restored = SliceFeatureBank.from_state(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert restored.keys() == bank.keys() == [(0, 1), (1, 0), (0, 0)]
    assert restored.features.dtype == torch.float16 and restored.capacity == 3
    uv = torch.tensor([[1.0, 1.0]] * 4, dtype=torch.float64)
    query = (torch.tensor([0, 1, 0, 3]), torch.tensor([0, 0, 1, 4]), uv, torch.ones(4, dtype=torch.bool))
    for b in (bank, restored):
        _push(b, 2, 4, 9)  # full: both evict (0, 1), the oldest
    (f1, ok1), (f2, ok2) = bank.lookup(*query), restored.lookup(*query)
    assert restored.keys() == bank.keys() == [(1, 0), (0, 0), (2, 4)]
    assert ok1.tolist() == ok2.tolist() == [True, True, False, False]
    assert torch.equal(f1, f2) and f1[:, 0].tolist() == [4.0, 3.0, 0.0, 0.0]
    empty = SliceFeatureBank.from_state(SliceFeatureBank(2, 2, 3, 3, 4, 5).state())
    assert len(empty) == 0


def test_bank_bilinear_lookup_and_bounds():
    bank = SliceFeatureBank(capacity=1, channels=1, height=4, width=4, num_volumes=1, max_slices=1)
    ramp = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)  # value = 4 r + c
    bank.push(torch.tensor([0]), torch.tensor([0]), ramp, IDENTITY_FRAME)
    uv = torch.tensor([[1.5, 2.25], [3.0, 3.0], [5.0, 1.0]], dtype=torch.float64)
    feats, found = bank.lookup(
        torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), uv, torch.ones(3, dtype=torch.bool)
    )
    assert found.tolist() == [True, True, False]
    assert feats[:2, 0].tolist() == pytest.approx([4 * 1.5 + 2.25, 15.0])


def test_patch_frames_recover_the_augmentation():
    u, v = np.meshgrid(np.arange(40.0), np.arange(52.0), indexing="ij")
    image = MetaTensor(torch.as_tensor((3 * u + 7 * v)[None], dtype=torch.float32))
    keys = ["image", "slice_coords"]
    aug = Compose(
        [
            SliceCoordinatesd(),
            RandRotate90d(keys, prob=1.0, max_k=3),
            RandAxisFlipd(keys, prob=1.0),
            RandRotated(keys, range_x=0.35, prob=1.0, mode="bilinear", padding_mode="zeros"),
            Resized(keys, spatial_size=(32, 32), mode="bilinear"),
        ]
    )
    aug.set_random_state(5)
    out = aug({"image": image})
    frames, ok = fit_patch_frames(out["slice_coords"][None].as_tensor())
    assert bool(ok[0])
    r, c = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    f = frames[0].numpy()
    uu, vv = f[0, 0] * r + f[0, 1] * c + f[0, 2], f[1, 0] * r + f[1, 1] * c + f[1, 2]
    inside = (uu > 2) & (uu < 37) & (vv > 2) & (vv < 49)
    assert inside.sum() > 300
    np.testing.assert_allclose(out["image"][0].numpy()[inside], (3 * uu + 7 * vv)[inside], atol=0.05)


def test_registered_positive_is_the_true_corresponding_point():
    base = sample_subjects(seed=7, count=1)[0]
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler("z", 9, degrees=True).as_matrix()
    turn[:3, 3] = [4.0, -3.0, 2.5]
    moved = with_pose(base, turn @ base.canonical_to_world)
    moved.id = "moved"
    t = true_transform(base, moved)  # world of volume 0 -> world of volume 1
    corr = RegisteredCorrespondence(
        [base.id, "moved"],
        [base.grid_affine, moved.grid_affine],
        [base.shape, moved.shape],
        {(base.id, "moved"): t, ("moved", base.id): np.linalg.inv(t)},
    )
    # bank of volume 1: every slice's map holds its own voxel coordinates (u, v, slice), identity frame
    h, w, s = moved.shape
    bank = SliceFeatureBank(capacity=s, channels=3, height=h, width=w, num_volumes=2, max_slices=s)
    uu, vv = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    maps = torch.stack([torch.stack([uu, vv, torch.full_like(uu, k)]) for k in range(s)])
    bank.push(torch.ones(s, dtype=torch.long), torch.arange(s), maps, IDENTITY_FRAME.expand(s, 2, 3))
    g = torch.Generator().manual_seed(0)
    n = 200
    z = torch.randint(1, base.shape[2] - 1, (n,), generator=g)
    uv = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [h * 0.5, w * 0.5], dtype=torch.float64
    ) + torch.tensor([h * 0.25, w * 0.25], dtype=torch.float64)
    reg, available = registered_positives(corr, bank, torch.zeros(n, dtype=torch.long), z, uv)
    assert available.float().mean() > 0.5
    truth = np.concatenate(
        [
            map_slice_points(t, base.grid_affine, moved.grid_affine, int(k), uv[m : m + 1].numpy())
            for m, k in enumerate(z.tolist())
        ]
    )
    got = reg[available].double().numpy()
    expected = truth[available.numpy()]
    np.testing.assert_allclose(got[:, :2], expected[:, :2], atol=1e-3)  # in-plane: exactly the mapped point
    np.testing.assert_allclose(
        got[:, 2], np.round(expected[:, 2]), atol=1e-4
    )  # through-plane: the nearest stored slice
    # the looked-up point is the true anatomical correspondence: back in world, it is T(p) up to slice rounding
    world_true = (t @ base.grid_affine @ np.c_[uv.numpy(), z.numpy(), np.ones(n)].T).T[available.numpy(), :3]
    world_got = (moved.grid_affine @ np.c_[got, np.ones(len(got))].T).T[:, :3]
    assert np.abs(world_got - world_true).max() <= 0.5 * moved.spacing[2] + 1e-3
    # a volume never finds itself, and a missing slice gives no positive
    reg0, avail0 = registered_positives(
        corr, bank, torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), uv[:3]
    )
    assert not avail0.any()


def test_map_to_partners_equals_mapping_to_every_volume_on_registered_pairs():
    rng = np.random.default_rng(4)
    ids = [f"v{i}" for i in range(5)]
    affines = [np.diag([1.5, 1.5, 10.0, 1.0]) for _ in ids]
    transforms = {}
    for i in ids:
        for j in ids:
            if i != j and rng.random() < 0.5:
                t = np.eye(4)
                t[:3, 3] = rng.normal(0, 3, 3)
                transforms[(i, j)] = t
    corr = RegisteredCorrespondence(ids, affines, [(20, 20, 6)] * 5, transforms)
    volume = torch.tensor([0, 1, 2, 3, 4, 2])
    slices = torch.tensor([0, 5, 2, 3, 1, 4])
    uv = torch.rand(6, 2, dtype=torch.float64) * 19
    z_all, uv_all, ok_all = corr.map_slice_points(volume, slices, uv)
    rows, targets, z, uv_j, ok = corr.map_to_partners(volume, slices, uv)
    expected = {(a, j) for a in range(6) for j in range(5) if (ids[int(volume[a])], ids[j]) in transforms}
    real = corr.partner_mask[volume].reshape(-1)  # fixed size: each point gets the most partners of any volume, padded
    assert len(rows) == 6 * corr.partner_table.shape[1]
    assert set(zip(rows[real].tolist(), targets[real].tolist())) == expected and int(real.sum()) == len(expected)
    assert not ok[~real].any()
    assert torch.equal(z[real], z_all[rows, targets][real]) and torch.allclose(uv_j[real], uv_all[rows, targets][real])
    assert torch.equal(ok[real], ok_all[rows, targets][real])
    assert not ok_all[~corr.available[volume]].any()  # unregistered pairs are never usable


def test_reps_refuses_a_registration_folder_without_training_pairs(tmp_path):
    """REPS on registrations that link no two training volumes would silently be SCL: refused, with what to do."""
    import numpy as np

    from scripts.contrastive.registered_correspondence import RegisteredCorrespondence
    from scripts.data.phantom import ensure_phantom_dataset
    from scripts.registration.engine import PairResult
    from scripts.registration.in_training import RegistrationSetupError
    from scripts.registration.store import TransformStore
    from scripts.registration.transform import PairTransform

    datalist = ensure_phantom_dataset(tmp_path / "ph", n_labeled=1, n_unlabeled=1, n_validation=1, n_test=0, seed=2)
    store = TransformStore(tmp_path / "reg", settings={"engine": "test"})
    store.commit([PairResult("phantom_000", "phantom_002", PairTransform(np.eye(4)))])  # labeled <-> validation only
    store.consolidate()
    with pytest.raises(RegistrationSetupError, match="reps_partners"):
        RegisteredCorrespondence.from_datalist(datalist, tmp_path / "reg")
    store.commit([PairResult("phantom_001", "phantom_000", PairTransform(np.eye(4)))])  # unlabeled <-> labeled
    store.consolidate()
    assert len(RegisteredCorrespondence.from_datalist(datalist, tmp_path / "reg")) == 2


def test_reps_correspondence_applies_deformable_fields():
    """A transform with a displacement field maps points as PairTransform.map_points does (not by its affine part)."""
    from scripts.registration.transform import PairTransform

    rng = np.random.default_rng(5)
    ids = ["v0", "v1", "v2"]
    affines = [np.diag([1.5, 1.5, 10.0, 1.0]), np.diag([1.2, 1.4, 8.0, 1.0]), np.diag([1.5, 1.5, 10.0, 1.0])]
    affines[1][:3, 3] = [2.0, -3.0, 5.0]
    shapes = [(20, 20, 6)] * 3
    matrix = np.eye(4)
    matrix[:3, 3] = [1.0, -2.0, 3.0]
    grid_affine = np.diag([6.0, 6.0, 12.0, 1.0])
    grid_affine[:3, 3] = -3.0
    field = rng.normal(0, 2.0, (3, 7, 7, 7)).astype(np.float32)  # a smooth-enough random displacement (mm)
    deformable = PairTransform(matrix, field, grid_affine)
    corr = RegisteredCorrespondence(ids, affines, shapes, {("v0", "v1"): deformable, ("v0", "v2"): matrix})
    volume, slices = torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 2, 3, 5])
    uv = torch.as_tensor(rng.uniform(0, 19, (5, 2)))
    rows, targets, z, uv_j, ok = corr.map_to_partners(volume, slices, uv)
    for r, t, zz, p, good in zip(rows.tolist(), targets.tolist(), z.tolist(), uv_j, ok.tolist()):
        transform = deformable if t == 1 else matrix
        expected = map_slice_points(transform, affines[0], affines[t], int(slices[r]), uv[r : r + 1])[0]
        assert torch.allclose(p, expected[:2].to(p.dtype), atol=1e-6)
        assert good == (0 <= round(float(expected[2])) < 6) and (not good or zz == round(float(expected[2])))
    affine_only = map_slice_points(matrix, affines[0], affines[1], 0, uv[:1])[0]
    assert not torch.allclose(uv_j[(rows == 0) & (targets == 1)][0], affine_only[:2].to(torch.float64), atol=0.1)
