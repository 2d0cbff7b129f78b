"""Owning a run directory while training writes it: the lock, the audit, repair, and undoing a failed start."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gradwise.store import lock as run_lock
from gradwise.store.checkpoint import read_manifest, repair
from gradwise.store.paths import audit_for_writing
from gradwise.store.rundir import CONFIG_FILE, clear_for_new_run, discard_unstarted_run


@contextmanager
def writing_run(run_dir: Path, *, resume: bool, started: Callable[[], bool]) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block, after refusing foreign links and tidying what a kill left.

    Args:
        run_dir: The run directory the block trains into.
        resume: The block continues the run from its ``last`` checkpoint.
        started: Whether the block took its first step; a new run that fails before it is removed, so
            the corrected command can use the same ``name=`` again.
    """
    fresh = not resume and not (run_dir / CONFIG_FILE).exists()
    with run_lock.holding(run_dir):
        if run_dir.exists():
            audit_for_writing(run_dir)
        if resume:
            manifest = read_manifest(run_dir / "checkpoints")
            if manifest is not None:  # links and leftovers of a writer killed mid-commit
                repair(run_dir / "checkpoints", manifest)
        else:
            # A new run inherits nothing: an earlier attempt's checkpoints (a compare or compress step
            # killed before it finished) would otherwise be reused as this run's own.
            clear_for_new_run(run_dir)
        try:
            yield
        except BaseException:
            if fresh and not started():
                discard_unstarted_run(run_dir)
            raise
