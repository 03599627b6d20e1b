"""What a training run tells the person watching it: one ETA for the whole run, one line per validation,
and the training curves as a picture.

* :class:`RunProgress` - a progress bar over the whole iteration budget (iterations left over the
  whole run, so its ETA is the run's, not the round's; a resumed run starts at its iteration), and
  after each validation one line: the key metric, its classes, the best so far, where it was saved.
* :class:`TrainingCurves` - after each validation, ``curves.png`` in the run's output folder: the
  loss terms (mean over the round), validation Dice per class and, for the semi-supervised methods,
  the pseudo-label Dice of each network and of the registered labels. Its history is part of the
  training state, so a resumed run draws the whole run.

Both attach to the trainer *after* the validation handler (the configs list them after it).
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

from ignite.engine import Engine, Events
from tqdm import tqdm

from scripts.training.branch_choice import BRANCH_METRICS
from scripts.training.tracking import loss_and_terms

__all__ = ["RunProgress", "TrainingCurves"]

logger = logging.getLogger(__name__)


def _loss_terms(output) -> dict[str, float]:
    """The loss terms of one iteration's engine output (cross teaching: each network's terms and totals;
    supervised: ``loss``), read with :func:`scripts.training.tracking.loss_and_terms`."""
    scalars = loss_and_terms(output)
    if isinstance(scalars, (int, float)):
        return {"loss": float(scalars)}
    if not isinstance(scalars, Mapping):
        return {}
    terms = {k: v for k, v in scalars.items() if k.startswith(("sup", "cps", "rsl", "cl", "loss", "tac"))}
    return terms or {"loss": scalars["train_loss"]}


def _class_dice(metrics: Mapping, prefix: str, class_names: Sequence[str]) -> dict[str, float]:
    """Per-class scalars ``<prefix><class>`` (see :class:`scripts.evaluation.metrics.SplitClassMetric`)."""
    return {n: float(metrics[prefix + n]) for n in class_names[1:] if prefix + n in metrics}


class RunProgress:
    """Progress bar with the whole run's ETA, and one line per validation.

    Args:
        num_iterations: the run's iteration budget.
        evaluator: the validation engine (its key metric and per-class metric are reported).
        best_model: the :class:`scripts.training.checkpoint.BestModelSaver` (best value, where saved).
        val_interval: iterations per validation round (to report the best model's iteration).
        class_names: background first.
        class_metric: the name prefix of the evaluator's per-class Dice scalars.
        progress: show the bar (the per-validation lines are logged either way).
        branch_names: names of networks A and B, for the Dice of each alone (``ensemble_branch: best``).
    """

    def __init__(
        self,
        num_iterations: int,
        evaluator: Engine,
        best_model,
        val_interval: int,
        class_names: Sequence[str],
        class_metric: str = "val_dice_",
        progress: bool = True,
        loss_log=None,
        branch_names: Sequence[str] = ("a", "b"),
    ) -> None:
        self.num_iterations = int(num_iterations)
        self.evaluator = evaluator
        self.best_model = best_model
        self.val_interval = int(val_interval)
        self.class_names = list(class_names)
        self.class_metric = class_metric
        self.progress = bool(progress)
        self.branch_names = list(branch_names)
        self.loss_log = loss_log  # a LossLog: the bar shows its host copy (no device read per iteration)
        self._bar: tqdm | None = None
        self._open = False  # STARTED seen, bar not yet opened

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.validated)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)
        engine.add_event_handler(Events.TERMINATE, self.close)

    def started(self, engine: Engine) -> None:
        # the bar opens at the first iteration: a resumed run's checkpoint is loaded after STARTED handlers, and
        # the bar must start at the resumed iteration (its ETA is the rest of the run's)
        self._open = True

    def iteration_completed(self, engine: Engine) -> None:
        if self._bar is None and self._open:
            self._open = False
            self._bar = tqdm(
                total=self.num_iterations,
                initial=int(engine.state.iteration) - 1,
                desc="training",
                unit="it",
                dynamic_ncols=True,
                disable=not self.progress,
                smoothing=0.05,
            )
        if self._bar is not None:
            self._bar.update(1)
            if self.loss_log is not None:
                if self.loss_log.iteration == engine.state.iteration and self.loss_log.loss is not None:
                    self._bar.set_postfix(loss=f"{self.loss_log.loss:.4f}", refresh=False)
                return
            terms = _loss_terms(engine.state.output)
            loss = terms.get("loss", sum(v for k, v in terms.items() if k.startswith("loss_")) if terms else None)
            if loss is not None and engine.state.iteration % 10 == 0:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def best_iteration(self) -> int | None:
        epoch = getattr(self.best_model, "best_epoch", -1)
        return min(epoch * self.val_interval, self.num_iterations) if epoch is not None and epoch > 0 else None

    def validated(self, engine: Engine) -> None:
        metrics = self.evaluator.state.metrics
        key = getattr(self.evaluator.state, "key_metric_name", None)
        if not key or key not in metrics:
            return
        classes = _class_dice(metrics, self.class_metric, self.class_names)
        per_class = ", ".join(f"{n} {v:.4f}" for n, v in classes.items())
        best = getattr(self.best_model, "best_metric", None)
        where = getattr(self.best_model, "save_path", "?")
        best_text = (
            f"best {best:.4f} at iteration {self.best_iteration()} -> {where}"
            if best is not None
            else "no model saved yet"
        )
        alone = [
            f"{name} {float(metrics[metric]):.4f}"
            for name, metric in zip(self.branch_names, BRANCH_METRICS.values())
            if metric in metrics
        ]
        branch = getattr(self.best_model, "best_branch", None)
        if alone and branch:
            best_text += f" (inference: {dict(zip(('a', 'b'), self.branch_names)).get(branch, branch)})"
        line = (
            f"iteration {engine.state.iteration}/{self.num_iterations}: {key} {float(metrics[key]):.4f}"
            + (f" ({per_class})" if per_class else "")
            + (f"; alone: {', '.join(alone)}" if alone else "")
            + f"; {best_text}"
        )
        logger.info(line)

    def completed(self, engine: Engine) -> None:
        self.close()
        best = getattr(self.best_model, "best_metric", None)
        if best is not None:
            logger.info(
                "training finished at iteration %d: best %.4f at iteration %s, model in %s",
                engine.state.iteration,
                best,
                self.best_iteration(),
                self.best_model.save_path,
            )

    def _failed(self, engine: Engine, error: BaseException) -> None:
        # ignite re-raises an exception only when no EXCEPTION_RAISED handler exists: re-raise it here
        self.close()
        raise error

    def close(self, *_) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TrainingCurves:
    """Draw ``curves.png`` after every validation (loss terms, validation Dice per class, pseudo-label Dice).

    Args:
        path: the PNG to write.
        evaluator: the validation engine.
        class_names: background first.
        class_metric: the name prefix of the evaluator's per-class Dice scalars.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        evaluator: Engine,
        class_names: Sequence[str],
        class_metric: str = "val_dice_",
        loss_log=None,
    ) -> None:
        self.path = str(path)
        self.evaluator = evaluator
        self.class_names = list(class_names)
        self.class_metric = class_metric
        self.history: dict[str, dict[str, list[tuple[int, float]]]] = {
            "loss terms": {},
            "validation Dice": {},
            "pseudo-label Dice": {},
        }
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self.loss_log = loss_log  # a LossLog: the epoch means of its host copies (no device read per iteration)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        if self.loss_log is not None:
            return
        for k, v in _loss_terms(engine.state.output).items():
            if math.isfinite(v):
                self._sums[k] += v
        self._count += 1

    def _add(self, panel: str, name: str, iteration: int, value: float) -> None:
        self.history[panel].setdefault(name, []).append((iteration, float(value)))

    def epoch_completed(self, engine: Engine) -> None:
        it = int(engine.state.iteration)
        if self.loss_log is not None:
            self._sums, self._count = defaultdict(float, self.loss_log.epoch_means()), 1
        for k, total in self._sums.items():
            self._add("loss terms", k, it, total / max(1, self._count))
        self._sums.clear()
        self._count = 0
        metrics = self.evaluator.state.metrics
        for name, value in _class_dice(metrics, self.class_metric, self.class_names).items():
            self._add("validation Dice", name, it, value)
        key = getattr(self.evaluator.state, "key_metric_name", None)
        if key in metrics:
            self._add("validation Dice", "mean", it, float(metrics[key]))
        for k, v in engine.state.metrics.items():
            if k.startswith("pseudo_dice_"):
                self._add("pseudo-label Dice", k[len("pseudo_dice_") :], it, float(v))
        from scripts.evaluation.figures import write_curves

        write_curves(self.path, self.history)

    def state_dict(self) -> dict:
        return {"history": {p: {k: [list(x) for x in v] for k, v in s.items()} for p, s in self.history.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        for panel, series in state.get("history", {}).items():
            self.history[panel] = {k: [tuple(x) for x in v] for k, v in series.items()}
