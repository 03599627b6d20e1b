"""A cached dataset built on first use, from entries known only then.

The unlabeled half of training and the pseudo-label monitor read the registration's datalist (each
unlabeled volume's registered label), which exists only once the registration step has run. Built by
the config like every other object, their datasets would register the volumes as soon as anything
parses the trainer: MONAI's workflow property check (``create_workflow(...).check_properties()``), a
tool that only inspects the config. :class:`DeferredCacheDataset` takes a function that returns the
entries and builds its ``CacheDataset`` the first time its length or an item is asked for: when
training starts (:class:`scripts.data.semi_supervised_data.SemiSupervisedLoader` asks before any
loader starts its worker processes, so that the cache is built once, in the main process).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from monai.data import CacheDataset
from torch.utils.data import Dataset

__all__ = ["DeferredCacheDataset", "build_deferred"]


class DeferredCacheDataset(Dataset):
    """``CacheDataset(data=entries(), transform=transform, **kwargs)``, built on the first ``len()`` or item.

    ``transform`` is an attribute from the start, as it is of a ``CacheDataset``: MONAI's ``DataLoader``
    seeds the random transforms it finds on its dataset when it is created, before anything is built.

    Args:
        entries: returns the dataset's entries (called once).
        transform: the transform of every entry.
        kwargs: the other ``CacheDataset`` arguments (``cache_rate``, ``num_workers``, ...).
    """

    def __init__(self, entries: Callable[[], Sequence], transform: Callable, **kwargs: Any) -> None:
        self.entries = entries
        self.transform = transform
        self.kwargs = kwargs
        self._dataset: CacheDataset | None = None

    @property
    def built(self) -> bool:
        return self._dataset is not None

    @property
    def dataset(self) -> CacheDataset:
        if self._dataset is None:
            self._dataset = CacheDataset(data=list(self.entries()), transform=self.transform, **self.kwargs)
        return self._dataset

    @property
    def data(self) -> Sequence:
        return self.dataset.data

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


def build_deferred(*loaders) -> None:
    """Build the deferred dataset of each data loader given (a no-op for any other dataset)."""
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        if isinstance(dataset, DeferredCacheDataset):
            len(dataset)
