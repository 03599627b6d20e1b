"""Experiment tracking (``--tracking mlflow``) for the bundle's trainers.

MONAI's tracking settings add an ``MLFlowHandler`` to ``train#handlers`` that reads the engine output
with ``from_engine(['loss'], first=True)``: a scalar for ``SupervisedTrainer``'s list of per-sample
dicts, but a 1-tuple for the cross-teaching trainer's output dict (``{"loss": ..., "terms": ...}``),
which MLflow cannot log. :func:`for_trainer` gives such handlers the run's loss instead, and logs
every loss term of the cross-teaching step next to it (``train_loss``, ``sup_a``, ``cps_b``, ...).
The store is the SQLite file ``eval/mlruns.db`` (``tracking_uri`` in ``configs/train.yaml``); see it
with ``mlflow ui --backend-store-uri sqlite:///eval/mlruns.db``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["for_trainer", "loss_and_terms", "train_loss"]


def _scalar(value) -> float:
    return float(torch.as_tensor(value).detach())


def loss_and_terms(output) -> dict[str, float] | float:
    """The scalars to track from one iteration's engine output."""
    if isinstance(output, Mapping) and "loss" in output:
        terms = output.get("terms") or {}
        return {"train_loss": _scalar(output["loss"]), **{k: _scalar(v) for k, v in terms.items()}}
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        return _scalar(output[0]["loss"])
    return output


def train_loss(output) -> float:
    """The iteration's loss as a float, from either trainer's engine output (for stats and TensorBoard)."""
    scalars = loss_and_terms(output)
    return scalars["train_loss"] if isinstance(scalars, dict) else float(scalars)


def for_trainer(handlers: Iterable, loss_log=None) -> list:
    """The trainer's handlers without disabled ones (``None``); MLflow handlers log scalar losses: with a
    :class:`scripts.training.loss_log.LossLog`, its host copy every ``log_every`` iterations (no device read)."""
    out = []
    for handler in handlers:
        if handler is None:
            continue
        if type(handler).__name__ == "MLFlowHandler":
            if loss_log is not None:
                handler.output_transform = loss_log.scalars
                handler.iteration_log = loss_log.log_now
            else:
                handler.output_transform = loss_and_terms
        out.append(handler)
    return out
