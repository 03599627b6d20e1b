"""No process of the bundle outlives its parent.

Worker processes (DataLoader workers, the registration process pool) block on a queue that a killed
parent never closes, so a ``kill -9`` of a run used to leave them behind, each holding its torch
import and data (hundreds of MB). :func:`exit_with_parent` is their initialiser: the kernel sends the
worker SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``), and, where that is unavailable, a
daemon thread checks every second whether the parent is still there and ends the worker if not.

Workers also ignore SIGINT: Ctrl-C in a terminal interrupts the whole foreground process group, and the
stop is the parent's to handle (a training finishes its iteration, saves its state and stops,
``scripts.training.checkpoint``; its workers end with it). A worker that took the signal itself would
die first and turn the stop into a crash. SIGTERM keeps its default in workers: Python's
multiprocessing ends daemonic workers with it at exit, so a worker ignoring it would hang the exit.
Send SIGTERM to the main process (a group SIGTERM kills the workers, and the run then resumes from the
training state saved at its last validation round).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["exit_with_parent", "data_loader_worker_init"]

_PR_SET_PDEATHSIG = 1


def _watch(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(1)


def exit_with_parent(*_args, interval: float = 1.0) -> None:
    """Make this (worker) process end when its parent does, and leave Ctrl-C (SIGINT) to the parent.
    Accepts and ignores the worker id that ``DataLoader(worker_init_fn=...)`` passes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent or parent == 1:  # the parent died before the line above ran
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, interval), daemon=True, name="exit-with-parent").start()


def data_loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the bundle's DataLoaders: MONAI's (a seed per worker for the random
    transforms) plus :func:`exit_with_parent`."""
    from monai.data.utils import worker_init_fn

    exit_with_parent()
    worker_init_fn(worker_id)
