"""Checkpoints: the best inference model as a flat ``model.pt``, and the full training state for resume.

Two files, two purposes:

* ``models/model.pt`` — the ``state_dict`` of the inference network (``network_def``) only, flat, as
  the Model Zoo expects; rewritten whenever the validation key metric improves.
* ``models/train_state.pt`` — every network, optimizer and LR scheduler, the ignite trainer (epoch,
  iteration), the best-model saver's record and the random number generators; rewritten at the end of
  each validation interval, and loaded at start when resuming.

Both are written to a temporary name and renamed (MONAI's ``CheckpointSaver`` writes in place).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.transforms import Randomizable

from scripts.data.atomic_io import atomic_path
from scripts.user_errors import RunStopped, quiet_engine_error_logs

logger = logging.getLogger(__name__)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the destination folder, then rename."""
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(obj, tmp)


def _randomizables(transform, seen: set[int] | None = None) -> list[Randomizable]:
    """Every MONAI ``Randomizable`` reachable from ``transform``, in a fixed order.

    Follows ``Compose``/``OneOf`` children and attributes, because dictionary transforms keep
    their own generator apart from the array transform they wrap (``RandAxisFlipd.flipper``).
    """
    seen = set() if seen is None else seen
    if id(transform) in seen:
        return []
    seen.add(id(transform))
    found: list[Randomizable] = [transform] if isinstance(transform, Randomizable) else []
    children = []
    for value in vars(transform).values() if hasattr(transform, "__dict__") else ():
        if isinstance(value, (list, tuple)):
            children.extend(v for v in value if hasattr(v, "__dict__") and callable(v))
        elif isinstance(value, Randomizable) or hasattr(value, "transforms"):
            children.append(value)
    for child in children:
        found.extend(_randomizables(child, seen))
    return found


class RNGState:
    """The random generators as a checkpointable object.

    Holds the process-wide generators (Python, NumPy, torch CPU and CUDA) and, when ``transforms``
    is given, the private generator of every random MONAI transform in it. With data loading in the
    main process (``num_workers=0``) this makes a resumed run draw exactly the slices and
    augmentations the uninterrupted run would have drawn; worker processes keep their own
    generators, which are not captured.
    """

    def __init__(self, transforms=None):
        self.transforms = _randomizables(transforms) if transforms is not None else []

    def state_dict(self) -> dict:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "transforms": [t.R.get_state() for t in self.transforms],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        saved = state.get("transforms", [])
        if len(saved) == len(self.transforms):
            for t, s in zip(self.transforms, saved):
                t.R.set_state(s)
        elif saved:
            logger.warning(
                "RNGState: %d transform generators saved, %d now; not restored", len(saved), len(self.transforms)
            )


class BestModelSaver:
    """Save the inference network's flat ``state_dict`` whenever a validation metric improves.

    Attach to the evaluator. ``metric_name`` defaults to the evaluator's key metric. The best value
    seen is part of this object's ``state_dict`` so that resuming does not overwrite a better model
    with a worse one. With ``model_config`` (the description of
    :mod:`scripts.training.model_config`), ``model_config.json`` is written beside ``model.pt`` each
    time, so that inference rebuilds exactly the network that was saved. With ``choose_branch`` (a
    two-network model validated through :class:`scripts.training.branch_choice.AllBranches`) its
    ``branch`` is the one that scored best at the saving validation (:func:`scripts.training.branch_choice.choose`).
    """

    def __init__(
        self,
        save_path: str,
        network: torch.nn.Module,
        metric_name: str | None = None,
        greater_is_better: bool = True,
        model_config: Mapping | None = None,
        model_config_path: str | None = None,
        choose_branch: bool = False,
    ):
        self.save_path = str(save_path)
        self.model_config = model_config
        self.model_config_path = model_config_path or os.path.join(os.path.dirname(self.save_path), "model_config.json")
        self.network = network
        self.metric_name = metric_name
        self.greater_is_better = greater_is_better
        self.best_metric: float | None = None
        self.best_epoch: int = -1
        self.choose_branch = bool(choose_branch)
        self.best_branch: str | None = None  # the branch recorded with the best model (choose_branch)
        self._evaluator: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._evaluator = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _improved(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.greater_is_better else value < self.best_metric

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(
                f"BestModelSaver: metric {name!r} not in the evaluator's metrics {list(engine.state.metrics)}"
            )
        value = float(engine.state.metrics[name])
        if not np.isfinite(value) or not self._improved(value):
            return
        net = self.network.module if hasattr(self.network, "module") else self.network
        bad = [
            name for name, t in net.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            logger.error(
                "%s %.4f at epoch %d not saved: %d tensors of the network are non-finite (first: %s)",
                name,
                value,
                int(engine.state.epoch),
                len(bad),
                bad[0],
            )
            return
        self.best_metric, self.best_epoch = value, int(engine.state.epoch)
        config = self.model_config
        if self.choose_branch:
            from scripts.training.branch_choice import choose

            self.best_branch = choose(engine.state.metrics, name)
            config = None if config is None else {**config, "branch": self.best_branch}
        if config is not None:
            from scripts.training.model_config import write_model_config

            write_model_config(self.model_config_path, config)
        save_atomic(net.state_dict(), self.save_path)
        logger.info(
            "best %s %.4f at epoch %d: saved %s%s",
            name,
            value,
            self.best_epoch,
            self.save_path,
            f" (inference branch: {self.best_branch})" if self.best_branch else "",
        )

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch, "best_branch": self.best_branch}

    def load_state_dict(self, state: Mapping) -> None:
        self.best_metric = state["best_metric"]
        self.best_epoch = int(state["best_epoch"])
        self.best_branch = state.get("best_branch")  # absent in train states written before 0.10.0
        if self._evaluator is not None and self.best_metric is not None:
            # the evaluator's own record (its "Got new best metric" / "best value" lines) restarts at -1
            # otherwise, and would call a worse model after the resume the best
            self._evaluator.state.best_metric = self.best_metric
            self._evaluator.state.best_metric_epoch = self.best_epoch


class TrainStateCheckpoint:
    """Save the full training state every ``interval`` epochs, and load it at start when resuming.

    On SIGTERM or SIGINT (Ctrl-C) the run finishes the iteration in progress, saves the state at that
    iteration (atomically, like every save), and stops with one line saying how to resume
    (:class:`scripts.user_errors.RunStopped`, exit status 1); ``--resume true`` continues from that
    iteration (ignite resumes inside the round). A second signal stops at once.

    Args:
        path: the checkpoint file (``models/train_state.pt``).
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (networks, optimizers,
            schedulers, a :class:`BestModelSaver`, an :class:`RNGState`, ...); ``None`` values (parts a
            variant does not have, e.g. UA-MT's second optimizer) are left out. The engine this
            handler is attached to is added as ``"trainer"`` (its epoch and iteration).
        resume: load ``path`` when training starts, if it exists.
        interval: epochs between saves (one epoch = one validation interval in these configs).
    """

    def __init__(
        self,
        path: str,
        save_dict: Mapping[str, object],
        resume: bool = False,
        interval: int = 1,
        stop_signals: tuple[str, ...] = ("SIGTERM", "SIGINT"),
    ):
        self.path = str(path)
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.resume = bool(resume)
        self.interval = int(interval)
        self.stop_signals = tuple(stop_signals)
        self._stop_requested: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self._owner_pid = os.getpid()

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)
        if self.stop_signals:
            engine.add_event_handler(Events.STARTED, self._install_signal_handlers)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_requested)
            engine.add_event_handler(Events.TERMINATE, self._stopped)
            engine.add_event_handler(Events.COMPLETED, self._restore_signal_handlers)
            engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    # -- stop on SIGTERM / SIGINT ----------------------------------------------------------------

    def _install_signal_handlers(self, engine: Engine) -> None:
        quiet_engine_error_logs()  # a stop (or a refused batch) prints its one line, not the engines' error logs
        if threading.current_thread() is not threading.main_thread():
            return
        self._owner_pid = os.getpid()
        for name in self.stop_signals:
            signum = getattr(signal, name)
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def _restore_signal_handlers(self, *_) -> None:
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        self._previous_handlers = {}

    def _failed(self, engine: Engine, error: BaseException) -> None:
        # ignite re-raises an exception only when no EXCEPTION_RAISED handler exists: re-raise it here
        self._restore_signal_handlers()
        raise error

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested is not None or os.getpid() != self._owner_pid:  # a second signal, or a forked worker
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._stop_requested = signum
        logger.warning(
            "%s received: saving the training state after this iteration, then stopping "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def _stop_if_requested(self, engine: Engine) -> None:
        if self._stop_requested is not None:
            self.save(engine)
            engine.terminate()

    def _stopped(self, engine: Engine) -> None:
        self._restore_signal_handlers()
        if self._stop_requested is None:
            return
        name = signal.Signals(self._stop_requested).name
        raise RunStopped(
            f"training stopped by {name} at iteration {engine.state.iteration}; its state is saved in {self.path}. "
            "Run the same command with --resume true to continue from there"
        )

    def save(self, engine: Engine | None = None) -> None:
        state = {}
        for name, obj in self.save_dict.items():
            obj = obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
            state[name] = obj.state_dict()
        save_atomic(state, self.path)

    def load(self, engine: Engine | None = None) -> None:
        if not os.path.exists(self.path):
            logger.info("resume requested but %s does not exist: starting from scratch", self.path)
            return
        try:
            checkpoint = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # a clear message naming the file, not a pickle traceback
            raise RuntimeError(f"cannot resume: {self.path} is not a readable training-state checkpoint ({e})") from e
        missing = [k for k in self.save_dict if k not in checkpoint]
        if missing:
            raise KeyError(f"cannot resume: {self.path} lacks {missing}; it holds {sorted(checkpoint)}")
        max_epochs = engine.state.max_epochs if engine is not None else None
        Checkpoint.load_objects(to_load=self.save_dict, checkpoint=checkpoint)
        if engine is not None:
            # the length of this run comes from this run's config, so a finished run can be extended
            engine.state.max_epochs = max_epochs
            logger.info(
                "resumed from %s at epoch %d, iteration %d", self.path, engine.state.epoch, engine.state.iteration
            )
