"""The CPU threads of a training shared with the other trainings on the same cores.

PyTorch gives each process one intra-op thread per core it may use. Two trainings side by side on a
2-core machine then run four busy threads on two cores, and each iteration took ten times as long
(36 s instead of 3.5 s, issue 32). With ``num_threads: null`` (the default) a training registers itself
in a folder of the machine's temporary directory (one file per process, named by its pid) and uses
``cores // trainings``: the cores it may use (its CPU affinity: ``taskset`` narrows it) divided among the
live trainings registered there whose cores overlap its own (itself included), at least one, and never
more than PyTorch's own count at the start (``OMP_NUM_THREADS`` lowers it). It looks
again every ``every`` iterations, so a run that started alone gives up threads when another starts and
takes them back when it ends. A number given for ``num_threads`` is kept as it is.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from pathlib import Path

import torch
from ignite.engine import Engine, Events

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


def shared_threads(registry: Path = REGISTRY, pid: int | None = None, limit: int | None = None) -> int:
    """``cores // n`` for this process: ``n`` counts the live registered trainings whose cores overlap its own;
    ``limit`` caps the cores (PyTorch's own count, which ``OMP_NUM_THREADS`` lowers)."""
    pid = os.getpid() if pid is None else pid
    mine = _cores(0)
    sharing = {pid}
    for entry in registry.glob("*") if registry.is_dir() else []:
        if not entry.name.isdigit():
            continue
        other = int(entry.name)
        if other == pid or not _alive(other):
            continue
        cores = _cores(other)
        if not cores or cores & mine:
            sharing.add(other)
    cores = len(mine) if limit is None else min(len(mine), int(limit))
    return max(1, cores // len(sharing))


class ThreadShare:
    """Handler: register this training, share the cores with the others (see the module docstring).

    Args:
        num_threads: the configured ``num_threads``; ``None`` (or null spelled as text) shares the cores,
            a number disables this handler (the config's ``initialize`` sets it).
        every: iterations between looks at the other trainings.
        registry: the folder of the registrations.
    """

    def __init__(self, num_threads: int | str | None = None, every: int = 50, registry: str | os.PathLike = REGISTRY):
        text = str(num_threads).strip().lower() if num_threads is not None else "null"
        self.enabled = text in ("null", "none", "~", "")
        self.every = max(1, int(every))
        self.registry = Path(registry)
        self._entry: Path | None = None
        self._limit: int | None = None  # PyTorch's thread count when the run started (OMP_NUM_THREADS, affinity)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.update)
        for event in (Events.COMPLETED, Events.TERMINATE):
            engine.add_event_handler(event, self.leave)

    def started(self, engine: Engine | None = None) -> None:
        if self._limit is None:
            self._limit = torch.get_num_threads()
        self.registry.mkdir(parents=True, exist_ok=True)
        self._entry = self.registry / str(os.getpid())
        self._entry.write_text("")
        atexit.register(self.leave)  # also after an error (a dead pid's file is ignored anyway)
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
