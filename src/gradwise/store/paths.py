"""Everything gradwise writes for a run stays inside that run directory.

A run directory is something people download and share, so its contents are
untrusted input: a symlink planted in it, or a path in one of its files that
is absolute or climbs out with ``..``, must never make gradwise read or write
elsewhere. Two rules enforce it:

* a path read from a run file goes through :func:`inside` (relative, and it
  resolves under the run root);
* before a process writes into an existing run directory it calls
  :func:`audit_for_writing`, which refuses any symlink in the tree except the
  checkpoint tags ``last`` and ``best`` of a ``checkpoints/`` directory (the
  run's, or a compressed variant's), whose target must be the plain name of a
  sibling checkpoint directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from gradwise.errors import CheckpointError

# The only symlinks a run directory may hold: checkpoints/{last,best} -> step-NNNNNNNN or weights-NNNNNNNN.
TAG_LINKS = ("last", "best")
CHECKPOINT_NAME = re.compile(r"(step|weights)-\d{8}")


def inside(root: Path, relative: object, *, source: Path | str) -> Path:
    """``root / relative`` for a path read from run file ``source``; refused unless it stays inside ``root``.

    Raises:
        CheckpointError: ``relative`` is not a string, is absolute, climbs out of ``root`` or resolves
            (through symlinks) outside it.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise CheckpointError(f"{source}: path {relative!r} is not a relative file name")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or Path(relative).is_absolute() or ".." in pure.parts:
        raise CheckpointError(f"{source}: path {relative!r} must be relative and stay inside {root}")
    candidate = root / relative
    if not _is_within(candidate.resolve(), root.resolve()):
        raise CheckpointError(f"{source}: path {relative!r} leads outside {root}")
    return candidate


def checkpoint_link_target(link: Path) -> str:
    """The checkpoint directory name a tag link names; refused unless it is a plain sibling name."""
    target = os.readlink(link)
    if not CHECKPOINT_NAME.fullmatch(target):
        raise CheckpointError(f"{link}: points to {target!r}, not to a checkpoint of this run")
    return target


def audit_for_writing(run_dir: Path) -> None:
    """Refuse to write into ``run_dir`` when it holds a symlink gradwise did not make.

    Raises:
        CheckpointError: naming the first offending link and where it points.
    """
    # A run directory named through a link is fine (os.walk lists its target); links inside it are not.
    for parent, dirs, files in os.walk(run_dir, followlinks=False):
        base = Path(parent)
        for name in [*dirs, *files]:
            path = base / name
            if not path.is_symlink():
                continue
            # Any checkpoints/ of the tree: the run's own, and those of the variant runs that
            # `gradwise compress` writes under RUN/compressed/. A plain sibling name cannot lead out.
            if base.name == "checkpoints" and name in TAG_LINKS:
                checkpoint_link_target(path)
                continue
            if base.name == "checkpoints" and name.startswith(".") and ".tmp-" in name:
                continue  # a tag link a killed writer left half-swapped; replaced, never followed
            raise CheckpointError(
                f"{path}: a symbolic link (to {os.readlink(path)!r}) inside the run directory; gradwise never "
                "writes through links — remove it (or copy the run without links) and try again"
            )


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
