"""Durable, confined file writes and reads that fail with one line naming the path.

Every file gradwise writes inside a run directory goes through here or through
:mod:`gradwise.store.checkpoint`: written under a temporary name, fsynced and
renamed, so a reader sees the old file or the new one, never a torn one; and
opened with ``O_NOFOLLOW``, so a symlink planted in a run directory is never
written through. An ``OSError`` becomes a :class:`~gradwise.errors.StorageError`
naming the path and the operating system's reason.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from gradwise.errors import StorageError

# A file we create inside a run directory: never through a symlink, never an existing file.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def describe_os_error(exc: OSError, path: Path | str | None = None) -> str:
    """``<path>: <reason>`` for an OSError, with a hint for the reasons a user can act on."""
    where = path if path is not None else (exc.filename or "?")
    reason = exc.strerror or type(exc).__name__
    hint = {
        errno.ENOSPC: "free some space (the last good checkpoint is kept)",
        errno.EDQUOT: "free some space (the last good checkpoint is kept)",
        errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
        errno.EROFS: "the file system is read-only; choose out_dir on a writable one",
        errno.EACCES: "no permission; choose another out_dir or fix the permissions",
        errno.EPERM: "not permitted; choose another out_dir or fix the permissions",
        errno.ENOTDIR: "a file stands where a directory is needed",
        errno.ELOOP: "a symbolic link stands where gradwise writes; it is never followed",
    }.get(exc.errno or 0)
    return f"{where}: {reason}" + (f" ({hint})" if hint else "")


def storage_error(exc: OSError, path: Path | str | None = None, doing: str = "") -> StorageError:
    """A one-line StorageError for ``exc``; ``doing`` says what was being written (e.g. 'checkpoint step 120')."""
    text = describe_os_error(exc, path)
    return StorageError(f"{text} while writing {doing}" if doing else text)


def fsync_dir(path: Path) -> None:
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    _fsync(path, os.O_RDONLY | os.O_NOFOLLOW)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """The hidden sibling a file is written to before it is renamed over ``path``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a torn one.

    The temporary file is created with ``O_EXCL | O_NOFOLLOW``, and ``os.replace`` replaces a symlink
    at ``path`` instead of following it: nothing is written outside the directory of ``path``.
    A failure removes the temporary file and raises a one-line StorageError.
    """
    tmp = temporary_name(path)
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        fd = os.open(tmp, _CREATE_FLAGS, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise storage_error(exc, path) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def read_text(path: Path, *, what: str = "file") -> str:
    """A UTF-8 text file's contents; a file that is not UTF-8 or cannot be read is one StorageError line."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StorageError(f"{path}: not a UTF-8 text {what} (byte {exc.start}: {exc.reason})") from None
    except IsADirectoryError:
        raise StorageError(f"{path}: is a directory, not a {what}") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path)) from None


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
