"""Run and compare folders: which folders gradsift may write into, and one writer at a time.

* A fresh ``--out`` must be missing or empty. A folder that already holds a gradsift run is
  continued with ``--resume``; any other non-empty folder is refused, so gradsift never writes
  over files it did not create (such as the config file being used).
* :func:`locked` takes an exclusive ``flock`` on ``<folder>/.gradsift.lock`` (which holds the
  owner's pid) for as long as a run or compare writes there. A second process is refused with
  the owner's pid; the kernel drops the lock when its owner dies, even by ``kill -9``, so a
  dead process never blocks a resume. Locks are re-entrant within a process (a compare locks
  its folder, then each run its own).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".gradsift.lock"
RUN_FILES = ("metrics.jsonl", "selections.jsonl", "checkpoints", LOCK_FILE)
COMPARE_FILES = ("summary.json", "report.html", "label_noise.json", "data")

_held: dict[str, list[int]] = {}  # folder -> [fd, depth] for the locks this process holds


class RunFolderError(ValueError):
    """A folder cannot be used as a run or compare folder (the message says what to do)."""


class RunLockedError(RunFolderError):
    """Another live gradsift process is writing into the folder."""


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a gradsift run (a ``config.yaml`` next to a run's files)."""
    return (folder / "config.yaml").is_file() and any((folder / f).exists() for f in RUN_FILES)


def _entries(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a folder: choose another --out")
    # the lock, and a config.yaml half-written by a process killed at once, are gradsift's own
    return sorted(p.name for p in folder.iterdir()
                  if p.name != LOCK_FILE and not p.name.startswith(".config.yaml.tmp-"))


def check_new_run_dir(folder: Path) -> None:
    """Refuse ``folder`` for a fresh run unless it is missing or empty.

    Raises:
        RunFolderError: it holds a run (resume it) or other files (choose another folder).
    """
    entries = _entries(folder)
    if not entries:
        return
    if is_run_dir(folder):
        raise RunFolderError(f"{folder} already holds a run: continue it with "
                             f"`gradsift run --resume {folder}`, or choose a new --out")
    raise RunFolderError(
        f"{folder} is not empty and is not a gradsift run folder ({', '.join(entries[:3])}"
        f"{', ...' if len(entries) > 3 else ''}); gradsift does not write over files it did "
        "not create: choose a new or empty --out")


def check_compare_dir(folder: Path) -> None:
    """Refuse ``folder`` for a compare unless it is missing, empty, or a compare folder.

    Raises:
        RunFolderError: it holds files a compare did not write.
    """
    entries = _entries(folder)
    if not entries or (folder / LOCK_FILE).exists():
        return
    foreign = [e for e in entries if e not in COMPARE_FILES and not (
        (folder / e).is_dir() and any(p.name.startswith("seed_") for p in (folder / e).iterdir()))]
    if foreign:
        raise RunFolderError(
            f"{folder} is not empty and is not a gradsift compare folder ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty --out")


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    Raises:
        RunLockedError: another live process holds it (its pid is in the message).
        OSError: the folder cannot be created or written (read-only, full disk).
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLockedError(
                f"{folder} is in use by another gradsift process (pid {owner}): wait for it to "
                "finish, or choose another --out") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
