"""The CPU threads of a training shared with the other trainings on the same cores.

PyTorch gives each process one intra-op thread per core it may use. Two trainings side by side on a
2-core machine then run four busy threads on two cores, and each iteration took ten times as long
(36 s instead of 3.5 s, issue 32). With ``num_threads: null`` (the default) a training registers itself
in a folder of the machine's temporary directory (one file per process, named by its pid) and uses
``cores // trainings``: the cores it may use (its CPU affinity: ``taskset`` narrows it) divided among the
live trainings registered there whose cores overlap its own (itself included), at least one, and never
more than PyTorch's own count at the start (``OMP_NUM_THREADS`` lowers it). It looks
again every ``every`` iterations, so a run that started alone gives up threads when another starts and
takes them back when it ends. A number given for ``num_threads`` is kept as it is, and such a training
registers too, with its number: the sharing ones divide only the cores it leaves (seen here: a default
training beside two one-thread ACDC runs took both cores and ran at 21 s per iteration instead of 1.2).
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from scripts.config_values import optional

__all__ = ["ThreadShare", "shared_threads"]

logger = logging.getLogger(__name__)

REGISTRY = Path(tempfile.gettempdir()) / "cct_r_trainings"


def _cores(pid: int = 0) -> set[int]:
    try:
        return set(os.sched_getaffinity(pid))
    except (AttributeError, OSError):  # not Linux, or the process is gone
        return set(range(os.cpu_count() or 1)) if pid == 0 else set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _fixed_threads(entry: Path) -> int:
    """The thread count a registered training fixed (its file's text), 0 for one that shares."""
    try:
        text = entry.read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def shared_threads(registry: Path = REGISTRY, pid: int | None = None, limit: int | None = None) -> int:
    """``(cores - fixed) // n`` for this process: of the live registered trainings whose cores overlap its own,
    ``fixed`` sums the threads of those with a fixed number and ``n`` counts those that share (itself included);
    ``limit`` caps the cores (PyTorch's own count, which ``OMP_NUM_THREADS`` lowers)."""
    pid = os.getpid() if pid is None else pid
    mine = _cores(0)
    sharing, fixed = {pid}, 0
    for entry in registry.glob("*") if registry.is_dir() else []:
        if not entry.name.isdigit():
            continue
        other = int(entry.name)
        if other == pid or not _alive(other):
            continue
        cores = _cores(other)
        if not cores or cores & mine:
            threads = _fixed_threads(entry)
            if threads:
                fixed += threads
            else:
                sharing.add(other)
    cores = len(mine) if limit is None else min(len(mine), int(limit))
    return max(1, (cores - fixed) // len(sharing))


class ThreadShare:
    """Handler: register this training, share the cores with the others (see the module docstring).

    Args:
        num_threads: the configured ``num_threads``; ``None`` (or null spelled as text) shares the cores;
            a number is kept (the config's ``initialize`` sets it) and registered for the others to leave.
        every: iterations between looks at the other trainings.
        registry: the folder of the registrations.
    """

    def __init__(self, num_threads: int | str | None = None, every: int = 50, registry: str | os.PathLike = REGISTRY):
        value = optional(num_threads)  # null as the command line may spell it
        self.fixed = 0 if value is None else max(1, int(value))  # registered, so that the sharing ones leave its cores
        self.every = max(1, int(every))
        self.registry = Path(registry)
        self._entry: Path | None = None
        self._limit: int | None = None  # PyTorch's thread count when the run started (OMP_NUM_THREADS, affinity)

    @property
    def enabled(self) -> bool:
        """Whether this training shares the cores (``num_threads`` null) rather than keeping a number."""
        return self.fixed == 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.update)
        for event in (Events.COMPLETED, Events.TERMINATE):
            engine.add_event_handler(event, self.leave)

    def started(self, engine: Engine | None = None) -> None:
        if self._limit is None:
            self._limit = torch.get_num_threads()
        self.registry.mkdir(parents=True, exist_ok=True)
        self._entry = self.registry / str(os.getpid())
        self._entry.write_text(str(self.fixed) if self.fixed else "")
        atexit.register(self.leave)  # also after an error (a dead pid's file is ignored anyway)
        if self.enabled:
            self.update(engine)

    def update(self, engine: Engine | None = None) -> None:
        threads = shared_threads(self.registry, limit=self._limit)
        if threads != torch.get_num_threads():
            logger.info("CPU threads: %d (cores shared with the other trainings on them)", threads)
            torch.set_num_threads(threads)

    def leave(self, *_args) -> None:
        if self._entry is not None:
            self._entry.unlink(missing_ok=True)
            self._entry = None
