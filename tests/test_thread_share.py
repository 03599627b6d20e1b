"""scripts.training.thread_share: trainings on the same cores share them instead of each taking all."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from ignite.engine import Engine, Events

from scripts.training.thread_share import ThreadShare, shared_threads


def test_the_cores_are_divided_among_the_live_trainings(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert shared_threads(tmp_path) == cores  # alone (nothing registered)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / str(other.pid)).write_text("")
        (tmp_path / "999999999").write_text("")  # a training that ended without removing its file
        assert shared_threads(tmp_path) == max(1, cores // 2)
    finally:
        other.kill()
        other.wait()
    assert shared_threads(tmp_path) == cores  # the other ended
    assert shared_threads(tmp_path, limit=1) == 1  # OMP_NUM_THREADS=1 (PyTorch's own count) is a ceiling


def test_the_handler_registers_sets_threads_and_leaves(tmp_path):
    before = torch.get_num_threads()
    share = ThreadShare(None, every=1, registry=tmp_path)
    engine = Engine(lambda e, b: None)
    share.attach(engine)
    seen = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append(sorted(p.name for p in tmp_path.iterdir()))
    )
    try:
        engine.run([0, 1], max_epochs=1)
        assert seen[0] == [str(os.getpid())] and torch.get_num_threads() == shared_threads(tmp_path, limit=before)
        assert list(tmp_path.iterdir()) == []  # removed at the end
    finally:
        torch.set_num_threads(before)


def test_a_configured_number_is_kept_and_left_to_it(tmp_path):
    before = torch.get_num_threads()
    share = ThreadShare(1, registry=tmp_path)
    engine = Engine(lambda e, b: None)
    share.attach(engine)
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(shared_threads(tmp_path, pid=1)))
    engine.run([0], max_epochs=1)
    cores = len(os.sched_getaffinity(0))
    assert not share.enabled and torch.get_num_threads() == before  # not changed
    assert seen == [max(1, cores - 1)]  # a sharing training (another pid) leaves it its one core
    assert list(tmp_path.iterdir()) == []  # removed at the end
