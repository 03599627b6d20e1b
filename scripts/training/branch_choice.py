"""Validation chooses what a two-network model segments with: the mean of both logits, network A or B.

With ``ensemble_branch: best`` (the default since 0.10.0) every validation scores three predictions of
the same pass: the mean of both networks' logits (the key metric, which still selects the checkpoint,
as before), network A alone and network B alone. Each time the best model is saved,
``models/model_config.json`` records the one of the three that scored best at that validation as the
model's ``branch``, so that ``run inference`` (``--branch`` unset) segments with it. Ties keep the mean.

Why (docs/results.md, 0.10.0): at 3 and 7 labeled ACDC patients the Transformer is the weaker student
and the mean of the two is below the CNN alone in every measured run, at 1 labeled patient the mean is
level with or above the CNN.

:class:`AllBranches` is the evaluator's view of the validated network (the saved ``state_dict`` is the
network's own), :class:`SplitBranches` splits its output into ``pred`` (the mean), ``pred_a`` and
``pred_b`` before the post-processing, and :func:`choose` picks the branch from the evaluator's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from torch import nn

from scripts.training.mean_teacher import unwrap
from scripts.training.networks import EnsembleNet

__all__ = ["AllBranches", "SplitBranches", "BRANCH_METRICS", "choose", "evaluated_network"]

# the evaluator's metric of each branch; "mean" is the key metric (selection), read under its own name
BRANCH_METRICS = {"a": "val_mean_dice_a", "b": "val_mean_dice_b"}


def _ensemble(network: nn.Module) -> EnsembleNet | None:
    net = unwrap(network)
    return net if isinstance(net, EnsembleNet) else None


class AllBranches(nn.Module):
    """The mean, A's and B's logits of a two-network model, stacked on the channel axis (``3 C`` channels).

    A one-network model's logits pass through unchanged (``C`` channels; :class:`SplitBranches` then gives
    all three keys the same prediction, so :func:`choose` keeps the mean).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        net = _ensemble(self.network)
        if net is None:
            return self.network(image)
        a, b = net.net_a(image), net.net_b(image)
        return torch.cat([0.5 * (a + b), a, b], dim=1)


def evaluated_network(network: nn.Module, choose_branch: bool) -> nn.Module:
    """What the validation evaluator runs: :class:`AllBranches` when validation chooses the branch, else the network."""
    return AllBranches(network) if choose_branch else network


class SplitBranches(MapTransform):
    """Split ``pred`` of :class:`AllBranches` (``3 C`` channels) into ``pred`` (mean), ``pred_a`` and ``pred_b``.

    ``C`` channels (one network): ``pred_a`` and ``pred_b`` are copies of ``pred``.
    """

    def __init__(self, num_classes: int, keys: KeysCollection = "pred", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            channels = pred.shape[0]  # decollated: channel first, no batch axis
            if channels == 3 * self.num_classes:
                mean, a, b = torch.split(pred, self.num_classes, dim=0)
            elif channels == self.num_classes:
                mean, a, b = pred, pred, pred
            else:
                raise ValueError(
                    f"SplitBranches: {key!r} has {channels} channels, expected {self.num_classes} or "
                    f"{3 * self.num_classes} (num_classes {self.num_classes})"
                )
            d[key] = mean
            d[f"{key}_a"], d[f"{key}_b"] = a, b
        return d


def choose(metrics: Mapping[str, float], mean_metric: str) -> str:
    """The branch (``mean``, ``a`` or ``b``) with the highest validation Dice in ``metrics``; ties keep the mean.

    ``metrics`` lacking a branch's metric (a validation without :class:`AllBranches`) gives ``mean``.
    """
    best, value = "mean", float(metrics[mean_metric])
    for branch, name in BRANCH_METRICS.items():
        if name in metrics and float(metrics[name]) > value:
            best, value = branch, float(metrics[name])
    return best
