"""One writer per run directory: an exclusive ``flock`` on ``RUN/.lock``, held while the process writes.

The kernel releases a ``flock`` when its process dies, however it dies, so a
killed run never leaves a stale lock behind. A second writer (two ``gradwise
resume RUN``, a resume beside a running train, two ``compress`` of one run)
gets one line naming the holder's pid. Readers (``eval``, ``report``,
``compare`` of finished runs) take no lock.

Under ``--nproc`` the launching process takes the lock and names it in
``GRADWISE_RUN_LOCK`` for the ranks it starts, which then write under it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gradwise.errors import CheckpointError
from gradwise.store.files import storage_error

LOCK_FILE = ".lock"
# Set by a process that holds a run's lock for the processes it launches (the ranks of --nproc).
HELD_BY_PARENT_ENV = "GRADWISE_RUN_LOCK"

_held: dict[Path, int] = {}  # lock file (resolved) -> descriptor, for the life of the hold


def _key(run_dir: Path) -> Path:
    # The directory is resolved, never the lock file: a `.lock` planted as a link must be refused (O_NOFOLLOW),
    # not followed to a file outside the run that would then be truncated.
    return run_dir.resolve() / LOCK_FILE


def acquire(run_dir: Path) -> bool:
    """Take the exclusive lock of ``run_dir`` (creating the directory); False if this process already holds it.

    Raises:
        CheckpointError: another process holds it (the message names its pid).
        StorageError: the lock file cannot be created (the path names why).
    """
    key = _key(run_dir)
    if key in _held or os.environ.get(HELD_BY_PARENT_ENV) == str(key):
        return False
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise storage_error(exc, run_dir / LOCK_FILE) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise CheckpointError(
            f"{run_dir}: in use by another gradwise process ({who}); one process writes a run at a time — "
            "wait for it to finish or stop it"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    return True


def release(run_dir: Path) -> None:
    """Give the lock of ``run_dir`` back (the file stays: removing it would race a waiting writer)."""
    fd = _held.pop(_key(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


@contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` for the block (a no-op if this process or its launcher already holds it)."""
    taken = acquire(run_dir)
    try:
        yield
    finally:
        if taken:
            release(run_dir)


@contextmanager
def handed_to_children(run_dir: Path) -> Iterator[None]:
    """Tell the processes started in the block (the ranks of ``--nproc``) that this process holds the lock."""
    before = os.environ.get(HELD_BY_PARENT_ENV)
    os.environ[HELD_BY_PARENT_ENV] = str(_key(run_dir))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(HELD_BY_PARENT_ENV, None)
        else:
            os.environ[HELD_BY_PARENT_ENV] = before


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
