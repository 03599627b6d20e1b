"""Kills and stops: SIGTERM / Ctrl-C save a resumable state; no worker process outlives a killed run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts.data.phantom import ensure_phantom_dataset
from tests.test_bundle import FAST, LS, ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    return ensure_phantom_dataset(
        tmp_path_factory.mktemp("ph"), n_labeled=2, n_unlabeled=2, n_validation=1, n_test=0, seed=4
    )


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=ROOT,
        env=env,
        stdout=open(log.with_suffix(".out"), "w"),
        stderr=open(log, "w"),
        start_new_session=True,
    )


def _wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _training(run_dir: Path, phantom: str, *extra: str) -> list[str]:
    return [
        "run",
        "training",
        "--config_file",
        LS,
        "--bundle_root",
        str(run_dir),
        "--datalist_file",
        phantom,
        "--num_iterations",
        "60",
        "--val_interval",
        "25",
        *FAST,
        *extra,
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_state_at_the_iteration_and_resume_finishes(tmp_path, phantom, signum):
    log = tmp_path / "train.log"
    proc = _start(_training(tmp_path, phantom, "--val_interval", "40"), log)
    _wait_for(lambda: "training:" in log.read_text() and "/60 [" in log.read_text(), what="training to start")
    time.sleep(1.0)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) != 0
    text = log.read_text()
    assert (
        f"stopped: training stopped by {signal.Signals(signum).name} at iteration" in text and "Traceback" not in text
    )
    logs = log.with_suffix(".out").read_text()  # the logging handlers write to stdout (configs/logging.conf)
    assert " - ERROR - " not in logs and "Traceback" not in logs  # the one line only (no engine error logs)
    assert "Not all config files are in" not in logs  # the overlay sits beside train.yaml: no MONAI location warning
    iteration = int(text.split("at iteration ")[-1].split(";")[0])
    state = torch.load(tmp_path / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    assert state["trainer"]["iteration"] == iteration and 0 < iteration < 60
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            *_training(tmp_path, phantom, "--val_interval", "40", "--resume", "true"),
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f", iteration {iteration}" in resumed.stdout + resumed.stderr  # "resumed from ... at epoch E, iteration N"
    shown = [int(n) for n in re.findall(r"\| *(\d+)/60 \[", resumed.stderr)]
    assert (
        shown and shown[0] >= iteration
    )  # the resumed bar starts at the resumed iteration (its ETA: the rest of the run)
    final = torch.load(tmp_path / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    assert final["trainer"]["iteration"] == 60 and final["lr_scheduler"]["last_epoch"] == 60


def test_ctrl_c_in_a_terminal_still_saves_and_stops(tmp_path, phantom):
    """Ctrl-C in a terminal interrupts every process of the group, data-loader workers included: the workers leave
    the stop to the training, which saves its state and reports the one line (no worker dies first)."""
    log = tmp_path / "train.log"
    proc = _start(_training(tmp_path, phantom, "--num_workers", "1", "--device_sampling", "false"), log)
    _wait_for(lambda: "/60 [" in log.read_text(), what="training to start")
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # the test started it in a session of its own: the group is its pid
    assert proc.wait(timeout=120) != 0
    text = log.read_text()
    assert "stopped: training stopped by SIGINT at iteration" in text and "Traceback" not in text, text[-2000:]
    assert (tmp_path / "models" / "train_state.pt").exists()


def test_no_data_loader_worker_outlives_a_killed_training(tmp_path, phantom):
    log = tmp_path / "train.log"
    proc = _start(_training(tmp_path, phantom, "--num_workers", "2", "--device_sampling", "false"), log)
    _wait_for(lambda: "/60 [" in log.read_text() and len(_children(proc.pid)) >= 2, what="data loader workers")
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_for(lambda: not any(_alive(p) for p in workers), timeout=15, what=f"workers {workers} to exit")


def test_no_registration_worker_outlives_a_killed_registration(tmp_path, phantom):
    log = tmp_path / "reg.log"
    proc = _start(
        [
            "run",
            "registration",
            "--config_file",
            "configs/registration.yaml",
            "--bundle_root",
            str(tmp_path),
            "--datalist_file",
            phantom,
            "--workers",
            "2",
            "--batch_size",
            "2",
        ],
        log,
    )
    _wait_for(lambda: len(_children(proc.pid)) >= 2 and "pair" in log.read_text(), what="registration workers")
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_for(lambda: not any(_alive(p) for p in workers), timeout=60, what=f"workers {workers} to exit")


def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    from scripts.data.run_folders import OutputFolderError, lock_folder

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from scripts.data.run_folders import lock_folder; "
            f"lock_folder({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputFolderError, match=f"pid {holder.pid}"):
        lock_folder(tmp_path, "training run")
    holder.kill()
    holder.wait(timeout=30)
    assert lock_folder(tmp_path, "training run")  # the lock died with its process


def test_a_shared_registration_folder_is_waited_for_and_released_after_the_registration(tmp_path):
    """Trainings that start together on one registration folder: the second waits for the first's registration
    (not for its whole training) instead of failing."""
    from scripts.data.run_folders import _LOCKS, lock_folder, release_folder

    marker = tmp_path.parent / f"{tmp_path.name}_released"  # the holder touches it just before it releases
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, time; from scripts.data.run_folders import lock_folder, release_folder; "
            f"lock_folder({str(tmp_path)!r}, 'registration'); print('locked', flush=True); time.sleep(2); "
            f"pathlib.Path({str(marker)!r}).touch(); release_folder({str(tmp_path)!r}); "
            "print('released', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock_folder(tmp_path, "registration", wait=True)  # returns once the holder released it, holder still alive
        assert marker.exists(), "the lock was taken before the holder released it"
        assert holder.stdout.readline().strip() == "released" and holder.poll() is None
        release_folder(tmp_path)
        assert str(tmp_path.resolve()) not in _LOCKS
        lock_folder(tmp_path, "registration")  # free again at once
        release_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_handlers_never_swallow_a_training_error(tmp_path):
    """The bundle's handlers that clean up on EXCEPTION_RAISED re-raise: ignite itself re-raises only when no
    such handler exists, so without that an error would end training silently (e.g. off the main process,
    where the stats handler is disabled)."""
    from ignite.engine import Engine

    from scripts.training.checkpoint import TrainStateCheckpoint
    from scripts.training.progress import RunProgress

    def step(engine, batch):
        raise ValueError("boom")

    for handler in (
        TrainStateCheckpoint(str(tmp_path / "state.pt"), {}),
        RunProgress(4, Engine(lambda e, b: None), None, 2, ["background", "a"], progress=False),
    ):
        engine = Engine(step)
        handler.attach(engine)
        with pytest.raises(ValueError, match="boom"):
            engine.run([0, 1], max_epochs=1)
