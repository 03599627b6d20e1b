"""How good are the pseudo-labels? Dice of each network's and of the registered labels on unlabeled volumes.

Semi-supervised training learns from pseudo-labels: the other network's argmax (cross teaching)
and the registered labels (RSL). Where the unlabeled training volumes have true labels (kept in the
datalist as ``true_label``, never trained on), :class:`PseudoLabelMonitor` scores, once per
validation round, each network's whole-volume prediction (slice by slice, as at inference) and the
registered label against the true label: the per-class Dice averaged over volumes, and its mean
over the foreground classes (the CCT-R paper's Figure 4). Registered labels do not change during
training; they are scored once.

Results go to the trainer's ``state.metrics`` (``pseudo_dice_<name>``: the mean over classes), to
the log, to TensorBoard (``pseudo_dice/<name>/<class>``) when a ``log_dir`` is given, and to a
JSON history file (one record per round), written atomically.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torch import nn

from scripts.data.atomic_io import write_json
from scripts.data.datalist import load_datalist
from scripts.training.mean_teacher import unwrap

logger = logging.getLogger(__name__)

__all__ = ["monitored_entries", "PseudoLabelMonitor"]


def monitored_entries(datalist: str | os.PathLike, max_volumes: int | None = None) -> list[dict]:
    """Unlabeled entries that have a ``true_label``: ``{"id", "image", "true_label"[, "registered_label"]}``.

    The first ``max_volumes`` by id (all when ``None``); an empty list when none has a true label.
    """
    try:
        entries = load_datalist(datalist, "unlabeled")
    except KeyError:
        return []
    keep = ("id", "image", "true_label", "registered_label")
    out = [{k: e[k] for k in keep if e.get(k)} for e in entries if e.get("true_label")]
    out.sort(key=lambda e: str(e.get("id")))
    return out if max_volumes is None else out[: int(max_volumes)]


def _volume_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-class (foreground) Dice of two label maps ``(1, 1, X, Y, Z)``; NaN where the truth lacks a class."""
    dice = compute_dice(one_hot(pred, num_classes), one_hot(truth, num_classes), include_background=False)
    return dice[0].cpu().numpy().astype(np.float64)


def _summary(per_volume: Sequence[np.ndarray], class_names: Sequence[str]) -> dict[str, float]:
    """Per-class Dice averaged over volumes (NaN ignored) and their mean (``"mean"``)."""
    values = np.stack(per_volume)
    with warnings.catch_warnings():  # a class absent from every volume: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = np.nanmean(values, axis=0)
    out = {name: float(v) for name, v in zip(class_names, per_class)}
    finite = per_class[np.isfinite(per_class)]
    out["mean"] = float(finite.mean()) if finite.size else float("nan")
    return out


class PseudoLabelMonitor:
    """Score pseudo-labels on labeled-for-monitoring unlabeled volumes every ``interval`` epochs.

    Args:
        data_loader: batches of one whole volume: ``image`` ``(1, C, X, Y, Z)`` (MetaTensor, for the
            slice axis), ``true_label``, optionally ``registered_label`` (see :func:`monitored_entries`).
        networks: name -> network to score (e.g. ``{"cnn": ..., "transformer": ...}``).
        inferer: the whole-volume inferer of validation (:class:`scripts.inference.inferer.SliceResizeInferer`).
        class_names: all class names, background first.
        output_file: the JSON history (list of rounds); ``None`` for none.
        log_dir: TensorBoard folder; ``None`` for no TensorBoard.
        interval: epochs between rounds.
        device: where the networks run.
        amp: autocast on CUDA.
        label_key, registered_key: data keys of the true and the registered labels.
    """

    def __init__(
        self,
        data_loader: Iterable,
        networks: Mapping[str, nn.Module],
        inferer,
        class_names: Sequence[str],
        output_file: str | os.PathLike | None = None,
        log_dir: str | os.PathLike | None = None,
        interval: int = 1,
        device: torch.device | str = "cpu",
        amp: bool = False,
        label_key: str = "true_label",
        registered_key: str = "registered_label",
    ):
        if "registered" in networks:
            raise ValueError(
                "PseudoLabelMonitor: 'registered' is reserved for the registered labels; rename that network"
            )
        self.data_loader = data_loader
        self.networks = dict(networks)
        self.inferer = inferer
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.output_file = output_file
        self.log_dir = log_dir
        self.interval = int(interval)
        self.device = torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.label_key, self.registered_key = label_key, registered_key
        self.history: list[dict] = []
        self._registered: dict[str, float] | None = None
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _writer_or_none(self):
        if self.log_dir is None:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """One round: ``{name: {class_name: dice, ..., "mean": dice}}`` (+ ``"registered"``); ``{}`` if no volume."""
        fg_names = self.class_names[1:]
        scores: dict[str, list[np.ndarray]] = {name: [] for name in self.networks}
        registered: list[np.ndarray] = []
        modes = {name: unwrap(net).training for name, net in self.networks.items()}
        for net in self.networks.values():
            unwrap(net).eval()
        try:
            for batch in self.data_loader:
                image = batch["image"].to(self.device)
                truth = torch.as_tensor(batch[self.label_key]).to(self.device).long()
                for name, net in self.networks.items():
                    with torch.autocast("cuda", enabled=self.amp):
                        logits = self.inferer(image, unwrap(net))
                    pred = torch.as_tensor(logits).argmax(dim=1, keepdim=True)
                    scores[name].append(_volume_dice(pred, truth, self.num_classes))
                if self._registered is None and batch.get(self.registered_key) is not None:
                    reg = torch.as_tensor(batch[self.registered_key]).to(self.device).long()
                    registered.append(_volume_dice(reg, truth, self.num_classes))
        finally:
            for name, net in self.networks.items():
                unwrap(net).train(modes[name])
        if not any(scores.values()):
            return {}
        result = {name: _summary(values, fg_names) for name, values in scores.items()}
        if self._registered is None and registered:
            self._registered = _summary(registered, fg_names)
        if self._registered is not None:
            result["registered"] = dict(self._registered)
        return result

    def __call__(self, engine: Engine) -> None:
        result = self.evaluate()
        if not result:
            return
        iteration, epoch = int(engine.state.iteration), int(engine.state.epoch)
        writer = self._writer_or_none()
        for name, dice in result.items():
            engine.state.metrics[f"pseudo_dice_{name}"] = dice["mean"]
            if writer is not None:
                for cls, value in dice.items():
                    writer.add_scalar(f"pseudo_dice/{name}/{cls}", value, iteration)
        if writer is not None:
            writer.flush()
        logger.info(
            "pseudo-label Dice at iteration %d: %s",
            iteration,
            ", ".join(f"{name} {dice['mean']:.4f}" for name, dice in result.items()),
        )
        self.history.append({"epoch": epoch, "iteration": iteration, "dice": result})
        if self.output_file is not None:
            write_json(self.output_file, self.history)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: Mapping) -> None:
        self.history = list(state.get("history", []))
