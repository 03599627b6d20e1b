"""One output folder per run: ``eval/<kind>_<YYYYmmdd-HHMMSS>`` unless the user names one.

Training, inference and evaluation each write into a folder of their own, so a second run never
overwrites the first one's predictions, reports or pictures, and every run says where it wrote.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from scripts.user_errors import BundleInputError

__all__ = ["OutputFolderError", "OutputsLog", "run_folder", "check_writable", "lock_folder", "release_folder"]

logger = logging.getLogger(__name__)


class OutputFolderError(BundleInputError):
    """An output location that cannot be written."""


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) and check that a file can be written in it.

    Raises:
        OutputFolderError: naming the folder and why (a regular file in the way, no permission, ...).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputFolderError(f"{folder}: cannot write output there ({e.strerror or e})") from None
    return folder


def run_folder(
    root: str | os.PathLike, kind: str, folder: str | os.PathLike | None = None, name: str | None = None
) -> str:
    """The output folder of one run, created and checked writable.

    Args:
        root: where new run folders go (``eval/``).
        kind: ``training``, ``inference``, ``evaluation``, ...
        folder: an explicit folder (``--output_dir``): used as given.
        name: a run name (``--run_name``): ``root/name``.

    Without ``folder`` or ``name`` the folder is ``root/<kind>_<YYYYmmdd-HHMMSS>``, with ``-2``,
    ``-3``... appended when a run started in the same second. Within one process the same
    ``(root, kind)`` gets the same new folder every time (a bundle config may be parsed twice, e.g.
    by ``--tracking``).
    """
    key = (os.path.abspath(root), kind)
    target_given = Path(folder) if folder else (Path(root) / str(name) if name else None)
    if target_given is not None and not target_given.exists():
        _remove_if_empty_at_exit(target_given)
    if folder:
        target = Path(folder)
    elif name:
        target = Path(root) / str(name)
    elif key in _NEW_FOLDERS and Path(_NEW_FOLDERS[key]).is_dir():
        return _NEW_FOLDERS[key]
    else:
        stem = f"{kind}_{time.strftime('%Y%m%d-%H%M%S')}"
        target, n = Path(root) / stem, 1
        while True:
            try:
                Path(root).mkdir(parents=True, exist_ok=True)
                target.mkdir()
                _remove_if_empty_at_exit(target)
                break
            except FileExistsError:
                n += 1
                target = Path(root) / f"{stem}-{n}"
            except OSError as e:
                raise OutputFolderError(f"{root}: cannot create a run folder there ({e.strerror or e})") from None
    check_writable(target)
    if not (folder or name):
        _NEW_FOLDERS[key] = str(target)
    logger.info("%s output folder: %s", kind, target)
    return str(target)


_NEW_FOLDERS: dict[tuple[str, str], str] = {}
_CREATED: list[Path] = []


def _remove_if_empty_at_exit(folder: Path) -> None:
    """A run folder this process creates and leaves empty (a refused input, an error before any output) is
    removed when the process ends, so a failed command leaves nothing behind."""
    import atexit

    if not _CREATED:
        atexit.register(_remove_empty_created)
    _CREATED.append(Path(folder))


def _remove_empty_created() -> None:
    for folder in reversed(_CREATED):
        try:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        except OSError:
            pass


class OutputsLog:
    """Ignite handler: when the run completes, say where its outputs went (and how many cases)."""

    def __init__(self, folder: str | os.PathLike, what: str = "outputs") -> None:
        self.folder, self.what = str(folder), what

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        cases = int(engine.state.iteration)
        logger.info("%d case(s) done: %s written to %s", cases, self.what, os.path.abspath(self.folder))


_LOCKS: dict[str, object] = {}


def lock_folder(folder: str | os.PathLike, what: str = "run", wait: bool = False) -> str:
    """Hold an exclusive lock on ``folder`` (``<folder>/.lock``) until :func:`release_folder` or the process ends.

    A second run writing into the same folder (the same ``models/`` of two trainings) is refused at once, naming the
    process that holds it, instead of both overwriting each other's files. With ``wait`` (a registration folder that
    several trainings share) it waits for the holder instead, saying so once a minute. The operating system releases
    the lock when the process ends, however it ends (a killed run leaves no stale lock).

    Raises:
        OutputFolderError: another process holds the lock (and ``wait`` is false).
    """
    import fcntl

    folder = check_writable(folder)
    key = str(folder.resolve())
    if key in _LOCKS:
        return key
    handle = open(folder / ".lock", "a+")
    waited, said = 0.0, -60.0
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                handle.close()
                raise OutputFolderError(
                    f"{folder}: another {what} ({holder}) is writing here; wait for it to finish, or give this run "
                    "another folder (--bundle_root / --ckpt_dir)"
                ) from None
            if waited - said >= 60.0:
                logger.info("%s: waiting for the %s of %s to finish (%.0f s so far)", folder, what, holder, waited)
                said = waited
            time.sleep(1.0)
            waited += 1.0
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _LOCKS[key] = handle
    return key


def release_folder(folder: str | os.PathLike) -> None:
    """Release the lock :func:`lock_folder` took on ``folder`` (nothing if this process holds none)."""
    import fcntl

    handle = _LOCKS.pop(str(Path(folder).resolve()), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
