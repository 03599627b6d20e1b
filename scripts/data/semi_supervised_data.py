"""Training batches of the semi-supervised methods: half labeled slices, half unlabeled slices.

Two MONAI ``DataLoader`` s, one over the labeled volumes and one over the unlabeled volumes, each
drawing slices with replacement, are zipped by :class:`SemiSupervisedLoader` into batches
``{"labeled": {...}, "unlabeled": {...}}`` for a fixed number of iterations per epoch (one
validation interval). Both halves go through the same slice sampling and augmentation; the unlabeled
half may carry a ``registered_label`` (the label of a labeled volume registered onto it, on the
unlabeled volume's voxel grid), listed among the same transform keys as ``label`` so that every
spatial transform moves it with the image.

:class:`SemiSupervisedPrepareBatch` turns such a batch into a :class:`SemiSupervisedBatch` of plain
tensors on the training device. The datalist helpers select the entries each method trains on:
:func:`unlabeled_entries` (with or without registered labels) and :func:`fully_labeled_entries`
(the ``fs`` upper bound: the unlabeled volumes' true labels used as labels).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.data.datalist import load_datalist
from scripts.data.deferred_dataset import build_deferred
from scripts.user_errors import BundleInputError

__all__ = [
    "REGISTERED_LABEL",
    "REGISTERED_VALID",
    "MissingRegisteredLabelError",
    "unlabeled_entries",
    "fully_labeled_entries",
    "FillMissingLabeld",
    "SemiSupervisedLoader",
    "SemiSupervisedBatch",
    "SemiSupervisedPrepareBatch",
]

#: The datalist / data key of the registered label of an unlabeled volume.
REGISTERED_LABEL = "registered_label"
#: The key of the per-sample flag saying whether the registered label is real (1) or a blank stand-in (0).
REGISTERED_VALID = "registered_label_valid"


#: The key of the per-sample RSL weight (registration reliability; 1 when not weighted).
REGISTERED_WEIGHT = "registered_label_weight"
#: How :func:`unlabeled_entries` turns BRS scores into RSL weights.
RELIABILITY_MODES = ("none", "rank")


def reliability_weights(scores: Mapping[str, float]) -> dict[str, float]:
    """RSL weights from BRS scores (lower score = more reliable registration), linear in the rank.

    The most reliable volume gets 2, the least reliable 0, evenly spaced by rank in between (mean 1,
    so the RSL term keeps its overall scale); one volume gets 1. Ties share the mean of their ranks.
    """
    ids = sorted(scores, key=lambda k: scores[k])
    n = len(ids)
    if n == 1:
        return {ids[0]: 1.0}
    ranks: dict[str, float] = {}
    i = 0
    while i < n:
        j = i
        while j + 1 < n and scores[ids[j + 1]] == scores[ids[i]]:
            j += 1
        for k in ids[i : j + 1]:
            ranks[k] = (i + j) / 2
        i = j + 1
    return {k: 2.0 * (1.0 - r / (n - 1)) for k, r in ranks.items()}


class MissingRegisteredLabelError(BundleInputError):
    """Registration supervision was requested but the datalist has no registered labels."""


def unlabeled_entries(
    datalist: str | os.PathLike, with_registered_label: bool = False, reliability: str = "none"
) -> list[dict]:
    """The ``unlabeled`` section as training entries: ``{"id", "image"}`` (+ ``"registered_label"``).

    With ``reliability="rank"`` (and registered labels), every entry also gets
    ``registered_label_weight``: :func:`reliability_weights` of the entries' ``brs_score`` (0 for an
    entry without a registered label), which scales that volume's RSL term.

    ``true_label`` is dropped: unlabeled volumes are never trained on with their true labels.
    With ``with_registered_label``, each entry keeps its ``registered_label`` path; an entry whose
    registration failed (``registered_label`` null) is kept without it (it still serves the
    unsupervised terms, see :class:`FillMissingLabeld`).

    Raises:
        MissingRegisteredLabelError: ``with_registered_label`` and no entry has a registered label
            (the datalist was not written by the registration step); the message names the file.
        FileNotFoundError: a registered label file does not exist (named, with the datalist).
        ValueError: the ``unlabeled`` section is empty.
        KeyError: the datalist has no ``unlabeled`` section.
    """
    entries = load_datalist(datalist, "unlabeled")
    if not entries:
        raise ValueError(
            f"datalist {datalist}: the 'unlabeled' section is empty; semi-supervised training needs unlabeled volumes"
        )
    out = []
    for e in entries:
        item = {"id": e.get("id"), "image": e["image"]}
        if with_registered_label and e.get(REGISTERED_LABEL):
            if not os.path.isfile(e[REGISTERED_LABEL]):
                raise FileNotFoundError(
                    f"datalist {datalist}: registered label {e[REGISTERED_LABEL]} of unlabeled entry {e.get('id')!r} does not exist"
                )
            item[REGISTERED_LABEL] = e[REGISTERED_LABEL]
        out.append(item)
    if with_registered_label and not any(REGISTERED_LABEL in e for e in out):
        raise MissingRegisteredLabelError(
            f"datalist {datalist}: no unlabeled entry has a {REGISTERED_LABEL!r}; registration supervision needs the "
            "rsl_datalist.json written by the registration step (python -m monai.bundle run registration "
            "--config_file configs/registration.yaml), passed as --datalist_file"
        )
    if reliability not in RELIABILITY_MODES:
        raise ValueError(f"rsl_reliability must be one of {RELIABILITY_MODES}, got {reliability!r}")
    if with_registered_label and reliability == "rank":
        scored = {i: e for i, e in enumerate(entries) if REGISTERED_LABEL in out[i]}
        missing = [e.get("id") for e in scored.values() if e.get("brs_score") is None]
        if missing:
            raise ValueError(
                f"datalist {datalist}: rsl_reliability 'rank' needs a 'brs_score' on every entry with a "
                f"registered label; {missing[:3]} have none (write the datalist with the registration step, or train "
                "with --rsl_reliability none)"
            )
        weights = reliability_weights({i: float(e["brs_score"]) for i, e in scored.items()})
        for i, item in enumerate(out):
            item[REGISTERED_WEIGHT] = weights.get(i, 0.0)
    return out


def fully_labeled_entries(datalist: str | os.PathLike) -> list[dict]:
    """The labeled ``training`` entries plus every ``unlabeled`` entry with its ``true_label`` as ``label``.

    The training set of the fully supervised upper bound (``fs``).

    Raises:
        ValueError: an unlabeled entry has no ``true_label`` (the message names it and the file).
    """
    labeled = [
        {"id": e.get("id"), "image": e["image"], "label": e["label"]} for e in load_datalist(datalist, "training")
    ]
    try:
        unlabeled = load_datalist(datalist, "unlabeled")
    except KeyError:
        unlabeled = []
    for e in unlabeled:
        if not e.get("true_label"):
            raise ValueError(
                f"datalist {datalist}: unlabeled entry {e.get('id')!r} ({e['image']}) has no 'true_label'; "
                "the fully supervised variant (fs) needs the true labels of every training volume"
            )
        labeled.append({"id": e.get("id"), "image": e["image"], "label": e["true_label"]})
    return labeled


class FillMissingLabeld(MapTransform):
    """Give every sample a ``key``: a blank (all-background) label shaped like ``reference`` where missing.

    ``key`` becomes a plain tensor in every sample (its metadata is not needed after augmentation).

    Sets ``valid_key`` to 1.0 where the sample had its own ``key`` and 0.0 where it was filled in,
    so that batches collate and losses on ``key`` can skip the blank ones. Place it after the
    spatial transforms (it costs nothing to move a blank label).
    """

    def __init__(self, keys: str = REGISTERED_LABEL, reference: str = "image", valid_key: str = REGISTERED_VALID):
        super().__init__(keys, allow_missing_keys=True)
        self.reference = reference
        self.valid_key = valid_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.reference not in d:
            raise KeyError(f"FillMissingLabeld: reference key {self.reference!r} not in the data (keys: {list(d)})")
        for key in self.keys:
            present = d.get(key) is not None
            if present:  # plain tensors for all samples, so real and blank labels collate together
                value = d[key]
                d[key] = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            else:
                ref = d[self.reference]
                d[key] = torch.zeros((1, *ref.shape[1:]), dtype=torch.float32)
            d[self.valid_key] = torch.tensor(1.0 if present else 0.0)
        return d


class SemiSupervisedLoader:
    """Zip a labeled and an unlabeled data loader into ``epoch_length`` batches per pass.

    Each loader should sample with replacement (``RandomSampler(replacement=True)`` or, under DDP,
    ``DistributedWeightedRandomSampler``) so that it never runs out; if one does, it is restarted.

    Yields:
        ``{"labeled": labeled_batch, "unlabeled": unlabeled_batch}``.
    """

    def __init__(self, labeled: torch.utils.data.DataLoader, unlabeled: torch.utils.data.DataLoader, epoch_length: int):
        if int(epoch_length) < 1:
            raise ValueError(f"SemiSupervisedLoader: epoch_length must be >= 1, got {epoch_length!r}")
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.epoch_length = int(epoch_length)

    def __len__(self) -> int:
        return self.epoch_length

    @staticmethod
    def _next(loader, iterator):
        try:
            return next(iterator), iterator
        except StopIteration:
            iterator = iter(loader)
            return next(iterator), iterator

    def __iter__(self) -> Iterator[dict]:
        build_deferred(self.labeled, self.unlabeled)  # before the loaders fork their workers: one cache, built here
        labeled_it, unlabeled_it = iter(self.labeled), iter(self.unlabeled)
        for _ in range(self.epoch_length):
            labeled, labeled_it = self._next(self.labeled, labeled_it)
            unlabeled, unlabeled_it = self._next(self.unlabeled, unlabeled_it)
            yield {"labeled": labeled, "unlabeled": unlabeled}


@dataclass
class SemiSupervisedBatch:
    """One training batch as plain tensors on the device.

    ``labeled_image`` ``(L, C, H, W)`` with ``label`` ``(L, 1, H, W)``; ``unlabeled_image``
    ``(U, C, H, W)``; ``registered_label`` ``(U, 1, H, W)`` and ``registered_valid`` ``(U,)`` when the
    unlabeled half carries registered labels, else ``None``.
    """

    labeled_image: torch.Tensor
    label: torch.Tensor
    unlabeled_image: torch.Tensor
    registered_label: torch.Tensor | None = None
    registered_valid: torch.Tensor | None = None
    registered_weight: torch.Tensor | None = None  # (U,) RSL weights (registration reliability), None: all 1

    @property
    def num_labeled(self) -> int:
        return int(self.labeled_image.shape[0])

    def images(self) -> torch.Tensor:
        """Labeled then unlabeled images in one ``(L + U, C, H, W)`` tensor (one forward pass per network)."""
        return torch.cat([self.labeled_image, self.unlabeled_image], dim=0)


def _plain(x, device: torch.device | str, non_blocking: bool) -> torch.Tensor:
    x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return x.to(device=device, non_blocking=non_blocking)


class SemiSupervisedPrepareBatch:
    """``prepare_batch`` for :class:`scripts.training.cross_teaching.CrossTeachingTrainer`.

    Takes a :class:`SemiSupervisedLoader` batch and returns a :class:`SemiSupervisedBatch`; the
    MetaTensors become plain tensors (metadata is not needed past augmentation).
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        registered_key: str = REGISTERED_LABEL,
        valid_key: str = REGISTERED_VALID,
        weight_key: str = REGISTERED_WEIGHT,
    ):
        self.image_key, self.label_key = image_key, label_key
        self.registered_key, self.valid_key, self.weight_key = registered_key, valid_key, weight_key

    def __call__(
        self, batchdata: Mapping, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
    ) -> SemiSupervisedBatch:
        if not isinstance(batchdata, Mapping) or not {"labeled", "unlabeled"} <= set(batchdata):
            got = list(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__
            raise ValueError(
                f"semi-supervised batch must be {{'labeled': ..., 'unlabeled': ...}} (SemiSupervisedLoader), got {got}"
            )
        device = device if device is not None else "cpu"
        labeled, unlabeled = batchdata["labeled"], batchdata["unlabeled"]
        for name, half, keys in (
            ("labeled", labeled, (self.image_key, self.label_key)),
            ("unlabeled", unlabeled, (self.image_key,)),
        ):
            missing = [k for k in keys if k not in half]
            if missing:
                raise KeyError(f"the {name} half of the batch lacks {missing}; it has {sorted(map(str, half))}")
        registered = valid = weight = None
        if self.registered_key in unlabeled:
            registered = _plain(unlabeled[self.registered_key], device, non_blocking)
            if self.valid_key in unlabeled:
                valid = _plain(unlabeled[self.valid_key], device, non_blocking).reshape(-1)
            if self.weight_key in unlabeled:
                weight = _plain(unlabeled[self.weight_key], device, non_blocking).reshape(-1).float()
        return SemiSupervisedBatch(
            labeled_image=_plain(labeled[self.image_key], device, non_blocking),
            label=_plain(labeled[self.label_key], device, non_blocking),
            unlabeled_image=_plain(unlabeled[self.image_key], device, non_blocking),
            registered_label=registered,
            registered_valid=valid,
            registered_weight=weight,
        )
