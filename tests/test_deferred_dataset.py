"""scripts.data.deferred_dataset: the unlabeled half's cache is built when training starts, not when the config is parsed."""

from __future__ import annotations

from monai.data import DataLoader
from monai.transforms import Compose, RandGaussianNoised
from torch.utils.data import RandomSampler

from scripts.data.deferred_dataset import DeferredCacheDataset, build_deferred
from scripts.data.semi_supervised_data import SemiSupervisedLoader


def _entries(calls: list):
    def entries():
        calls.append(1)
        return [{"x": float(i)} for i in range(3)]

    return entries


def test_nothing_is_read_until_training_asks_and_then_once():
    calls: list = []
    transform = Compose([RandGaussianNoised(keys="x", prob=0.0)])
    dataset = DeferredCacheDataset(_entries(calls), transform=transform, cache_rate=1.0, num_workers=0)
    sampler = RandomSampler(dataset, replacement=True, num_samples=4)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=0)  # seeds the transform: still not built
    assert calls == [] and not dataset.built and dataset.transform is transform
    build_deferred(loader)
    assert calls == [1] and dataset.built and len(dataset) == 3 and [d["x"] for d in dataset.data] == [0.0, 1.0, 2.0]
    build_deferred(loader)
    assert calls == [1]  # built once


def test_the_semi_supervised_loader_builds_before_drawing_batches():
    calls: list = []
    dataset = DeferredCacheDataset(_entries(calls), transform=Compose([]), cache_rate=1.0, num_workers=0)
    unlabeled = DataLoader(dataset, batch_size=1, sampler=RandomSampler(dataset, replacement=True, num_samples=2))
    labeled = DataLoader([{"x": 9.0}], batch_size=1)
    batches = list(SemiSupervisedLoader(labeled, unlabeled, epoch_length=2))
    assert calls == [1] and len(batches) == 2 and float(batches[0]["unlabeled"]["x"][0]) in (0.0, 1.0, 2.0)
