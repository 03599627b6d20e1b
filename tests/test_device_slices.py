"""The device data pipeline: exact patch-to-slice maps, the MONAI chain's augmentation distribution, the loader."""

from __future__ import annotations

import math

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from scripts.contrastive.slice_coordinates import fit_patch_frames
from scripts.data.device_slices import DeviceSliceLoader, SliceAugmentation, SliceStack, sample_patches
from tests.cross_teaching_fixtures import ROOT

torch.set_num_threads(1)

H, W, S, P = 60, 84, 6, 32
AFFINE = torch.diag(torch.tensor([1.5, 1.5, 8.0, 1.0]))  # the third axis is the slice axis


def _ramp_volume(value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    u, v = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    image = torch.stack([u * 100 + v + value + 10000 * z for z in range(S)], dim=-1)[None]  # (1, H, W, S)
    label = torch.stack([((u > 30).float() + (v > 50).float()) for _ in range(S)], dim=-1)[None]
    return MetaTensor(image, affine=AFFINE), MetaTensor(label, affine=AFFINE)


def _uv(frames: torch.Tensor) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(P, dtype=torch.float64), torch.arange(P, dtype=torch.float64), indexing="ij")
    rc1 = torch.stack([r, c, torch.ones_like(r)], dim=-1)
    return torch.einsum("bij,pqj->bpqi", frames, rc1)  # (B, P, P, 2) slice (u, v) of every patch pixel


def test_patches_sample_the_slice_where_the_frames_say():
    image, label = _ramp_volume()
    stack = SliceStack([{"id": "a", "image": image, "label": label}], ["image", "label"])
    assert stack.buffers["label"].dtype == torch.uint8 and stack.depth.tolist() == [S]
    g = torch.Generator().manual_seed(0)
    sl = torch.randint(S, (64,), generator=g)
    frames, crop = SliceAugmentation(patch_size=(P, P)).draw(stack.height[sl], stack.width[sl], g)
    args = (stack.start[sl], stack.width[sl], frames.float(), crop.float(), (P, P))
    img = sample_patches(stack.buffers["image"], *args, "bilinear")[:, 0].double()
    lab = sample_patches(stack.buffers["label"], *args, "nearest")[:, 0]
    uv = _uv(frames)
    u0, v0, hc, wc = (crop[:, i, None, None] for i in range(4))
    inside = (uv[..., 0] >= u0) & (uv[..., 0] <= u0 + hc - 1) & (uv[..., 1] >= v0) & (uv[..., 1] <= v0 + wc - 1)
    assert 0.9 < inside.double().mean() < 1.0  # the rotated crops' corners fall outside
    expected = uv[..., 0] * 100 + uv[..., 1] + 10000 * sl[:, None, None]  # a linear ramp: bilinear is exact
    assert (img - expected).abs()[inside].max() < 0.05
    assert torch.all(img[~(inside | _near_border(uv, u0, v0, hc, wc))] == 0)
    # labels: the class of the nearest voxel, so they stay on their image
    near_u, near_v = torch.floor(uv[..., 0] + 0.5), torch.floor(uv[..., 1] + 0.5)
    expected_lab = (near_u > 30).float() + (near_v > 50).float()
    assert torch.equal(lab[inside], expected_lab[inside])


def _near_border(uv, u0, v0, hc, wc):
    return (
        (uv[..., 0] >= u0 - 0.5)
        & (uv[..., 0] <= u0 + hc - 0.5)
        & (uv[..., 1] >= v0 - 0.5)
        & (uv[..., 1] <= v0 + wc - 0.5)
    )


def _branch_statistics(frames: torch.Tensor, crop_area: torch.Tensor) -> dict[str, float]:
    lin = frames[:, :, :2]
    det = torch.linalg.det(lin)
    off = lin[:, 0, 1].abs() + lin[:, 1, 0].abs()
    rotation = (det > 0) & (off > 1e-3)
    angle = torch.atan2(lin[:, 1, 0], lin[:, 0, 0])[rotation]
    centre = (frames[:, :, :2] @ torch.full((2, 1), (P - 1) / 2, dtype=torch.float64))[..., 0] + frames[:, :, 2]
    return {
        "reflected": (det < 0).double().mean().item(),
        "rotated": rotation.double().mean().item(),
        "identity": ((det > 0) & (off <= 1e-3)).double().mean().item(),
        "angle_std": angle.std().item(),
        "angle_max": angle.abs().max().item(),
        "scale": (det.abs() * P * P / (H * W)).mean().item(),  # the crop's share of the slice
        "centre_u": centre[:, 0].mean().item() / H,
        "centre_v": centre[:, 1].mean().item() / W,
        "centre_u_std": centre[:, 0].std().item() / H,
    }


def test_the_augmentation_distribution_is_the_monai_chains():
    """The device sampler against configs/train.yaml's MONAI slice transforms on the same volume, 600 draws each."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    parser.update({"patch_size": [P, P], "device_sampling": False})
    chain = parser.get_parsed_content("train#slice_transforms")
    for t in chain:
        if hasattr(t, "set_random_state"):
            t.set_random_state(seed=3)
    image, label = _ramp_volume()
    n = 600
    maps = []
    for _ in range(n):
        d = {"image": image.clone(), "label": label.clone()}
        for t in chain:
            d = t(d)
        maps.append(d["slice_coords"].as_tensor())
    monai_frames, ok = fit_patch_frames(torch.stack(maps))
    assert ok.all()
    aug = SliceAugmentation(
        patch_size=(P, P),
        crop_min_scale=parser.get_parsed_content("crop_min_scale"),
        flips=True,
        weights=parser.get_parsed_content("augmentation_weights"),
        max_angle=parser.get_parsed_content("rotation_range"),
    )
    g = torch.Generator().manual_seed(4)
    frames, crop = aug.draw(torch.full((n,), H), torch.full((n,), W), g)
    ours, theirs = _branch_statistics(frames, crop), _branch_statistics(monai_frames, None)
    assert ours["reflected"] == pytest.approx(0.5, abs=0.07) and theirs["reflected"] == pytest.approx(0.5, abs=0.07)
    for key in ("reflected", "rotated", "identity"):
        assert ours[key] == pytest.approx(theirs[key], abs=0.08), key
    assert ours["angle_max"] <= math.radians(20) + 1e-9 and theirs["angle_max"] <= math.radians(20) + 1e-3
    assert ours["angle_std"] == pytest.approx(theirs["angle_std"], rel=0.2)
    for key in ("scale", "centre_u", "centre_v", "centre_u_std"):
        assert ours[key] == pytest.approx(theirs[key], rel=0.06, abs=0.01), key


def _loader_items():
    labeled, unlabeled = [], []
    for i in range(2):
        image, label = _ramp_volume(value=0.0)
        labeled.append({"id": f"lab{i}", "image": image, "label": label})
    for i in range(3):
        image, label = _ramp_volume()
        item = {"id": f"unl{i}", "image": image, "registered_label_weight": 0.5 * i}
        if i != 1:  # the second unlabeled volume's registration failed: a blank label, valid 0
            item["registered_label"] = label
        unlabeled.append(item)
    return labeled, unlabeled


def _loader(**kwargs) -> DeviceSliceLoader:
    labeled, unlabeled = _loader_items()
    defaults = dict(epoch_length=3, labeled_batch_size=4, unlabeled_batch_size=6, seed=7)
    return DeviceSliceLoader(
        labeled, unlabeled, augmentation=SliceAugmentation(patch_size=(P, P)), **{**defaults, **kwargs}
    )


def test_loader_yields_semi_supervised_batches_with_the_registration_flags():
    loader = _loader()
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    b = batches[0]
    lab, unl = b["labeled"], b["unlabeled"]
    assert lab["image"].shape == (4, 1, P, P) and lab["label"].shape == (4, 1, P, P)
    assert unl["image"].shape == (6, 1, P, P) and unl["registered_label"].shape == (6, 1, P, P)
    assert b["slice_frames"].shape == (10, 2, 3) and b["slice_frames"].dtype == torch.float64
    for batch in batches:
        u = batch["unlabeled"]
        blank = torch.tensor([i == "unl1" for i in u["id"]])
        assert torch.equal(u["registered_label_valid"], (~blank).float())
        assert torch.equal(u["registered_label_weight"], torch.tensor([0.5 * int(i[-1]) for i in u["id"]]))
        assert torch.all(u["registered_label"][blank] == 0)
        # the slice index says which slice was drawn: the ramp's 10000 * z offset at the patch's centre
        centre = batch["labeled"]["image"][:, 0, P // 2, P // 2]
        assert torch.equal(torch.floor(centre / 10000).long(), batch["labeled"]["slice_index"])
    assert {i for batch in batches for i in batch["unlabeled"]["id"]} <= {"unl0", "unl1", "unl2"}


def test_loader_resumes_its_draws_and_labeled_only_batches():
    loader = _loader()
    first = next(iter(loader))
    state = loader.state_dict()
    expected = next(iter(loader))
    again = _loader(seed=99)  # another seed, then the saved generator state
    again.load_state_dict(state)
    got = next(iter(again))
    assert torch.equal(got["unlabeled"]["image"], expected["unlabeled"]["image"])
    assert not torch.equal(got["labeled"]["image"], first["labeled"]["image"])
    labeled, _ = _loader_items()
    only = DeviceSliceLoader(labeled, None, 2, 8, augmentation=SliceAugmentation(patch_size=(P, P)))
    batch = next(iter(only))
    assert set(batch) == {"image", "label", "id", "slice_index"} and batch["image"].shape == (8, 1, P, P)


def test_volumes_over_the_limit_stay_in_host_memory():
    loader = _loader(max_device_gib=0.0)
    labeled, unlabeled = loader.build()
    assert labeled.device.type == "cpu" and unlabeled.device.type == "cpu"
    assert next(iter(loader))["labeled"]["image"].shape == (4, 1, P, P)


def test_a_label_on_another_grid_is_named():
    image, label = _ramp_volume()
    wrong = MetaTensor(label[:, :-1], affine=AFFINE)
    with pytest.raises(ValueError, match="volume 'bad': label has shape"):
        SliceStack([{"id": "bad", "image": image, "label": wrong}], ["image", "label"])
