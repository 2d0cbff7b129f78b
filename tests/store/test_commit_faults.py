"""A writer killed at any file-system call of a checkpoint commit loses nothing: resume ends bit-for-bit the same.

Every call the keeper's save makes to the file system (mkdir, open for writing, write, fsync, rename, symlink,
unlink, rmdir, rmtree and safetensors' save_file) is a kill point. A forked child trains the run and SIGKILLs
itself just before the N-th such call of one commit; the test then resumes the run in this process to the end and
compares it with the uninterrupted run: the final weights, every logged loss, the best checkpoint and its step in
the summary and the manifest, and a ``checkpoints/`` directory with no leftovers and links that match the manifest.
"""

from __future__ import annotations

import builtins
import gc
import io
import json
import os
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwise.store.checkpoint as checkpoint_module
from gradwise.config import RunConfig, validate
from gradwise.errors import CheckpointError
from gradwise.store.checkpoint import load_model_state, read_manifest, resolve_checkpoint
from gradwise.store.rundir import read_summary
from gradwise.train.keeper import CheckpointKeeper
from gradwise.train.loop import fit

# A momentum run that overshoots at the end (val loss 0.149 at step 18, 0.188 at step 20), evaluated every 3 steps
# and saved every 4: commits stage `last` alone, `last` and `best` in one directory, or a weights-only `best` beside
# `last`, and prune what the previous commit named.
CONFIG = {
    "data": {"name": "digits", "limit": 400},
    "model": {"name": "mlp", "hidden": [32]},
    "optim": {"name": "momentum", "lr": 0.3},
    "batch": {"size": 32},
    "stop": {"epochs": None, "max_steps": 20, "monitor": "val_loss"},
    "eval": {"every_steps": 3},
    # min_interval_s keeps evaluations from writing (but the first): a new best waits in memory for the next save.
    "checkpoint": {"every_steps": 4, "min_interval_s": 1e9, "keep_best": True},
    "log": {"progress": False, "plots": False},
}

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHILD_TIMEOUT_S = 60


def _writes(mode: str = "r", *args: Any, **kwargs: Any) -> bool:
    return any(c in mode for c in "wax+")


# Every entry point the commit path (store/checkpoint.py, store/files.py, the metrics log's sync) reaches the file
# system through, with the condition under which a call counts (reads never do).
_INTERCEPTED: list[tuple[Any, str, Callable[..., bool] | None]] = [
    (os, "mkdir", None),
    (os, "rmdir", None),
    (os, "unlink", None),
    (os, "remove", None),
    (os, "rename", None),
    (os, "replace", None),
    (os, "symlink", None),
    (os, "fsync", None),
    (os, "write", None),
    (os, "ftruncate", None),
    (os, "open", lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS)),
    (io, "open", lambda file, mode="r", *a, **k: _writes(mode)),
    (builtins, "open", lambda file, mode="r", *a, **k: _writes(mode)),
    (shutil, "rmtree", None),
    (checkpoint_module, "save_file", None),
]


@dataclass
class FaultPlan:
    """Counts the file-system calls of each keeper save; SIGKILLs the process at call ``kill_call`` of ``kill_save``."""

    kill_save: int | None = None
    kill_call: int | None = None
    saves: list[list[str]] = field(default_factory=list)  # per save invocation: the calls it made, labelled
    armed: bool = False

    def hit(self, name: str, args: tuple[Any, ...]) -> None:
        if not self.armed:
            return
        calls = self.saves[-1]
        calls.append(_label(name, args))
        if len(self.saves) == self.kill_save and len(calls) == self.kill_call:
            os.kill(os.getpid(), signal.SIGKILL)


def _label(name: str, args: tuple[Any, ...]) -> str:
    if not args:
        return f"{name}()"
    first = args[0]
    if isinstance(first, int) and not isinstance(first, bool):
        try:
            first = os.readlink(f"/proc/self/fd/{first}")
        except OSError:
            return f"{name}(fd {first})"
    if isinstance(first, str | os.PathLike):
        return f"{name}({Path(first).name})"
    return f"{name}({type(first).__name__})"


@contextmanager
def intercepted(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Route every intercepted call and every keeper save through ``plan`` for the block."""
    saved: list[tuple[Any, str, Any]] = []

    def wrap(module: Any, name: str, counts: Callable[..., bool] | None) -> None:
        original = getattr(module, name)
        saved.append((module, name, original))

        def call(*args: Any, **kwargs: Any) -> Any:
            if plan.armed and (counts is None or counts(*args, **kwargs)):
                plan.hit(name, args)
            return original(*args, **kwargs)

        setattr(module, name, call)

    for module, name, counts in _INTERCEPTED:
        wrap(module, name, counts)
    original_save = CheckpointKeeper.save

    def save(keeper: CheckpointKeeper, step: int) -> None:
        plan.saves.append([])
        plan.armed = True
        try:
            original_save(keeper, step)
        finally:
            plan.armed = False

    saved.append((CheckpointKeeper, "save", original_save))
    CheckpointKeeper.save = save  # type: ignore[method-assign]
    try:
        yield plan
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


# --------------------------------------------------------------------------- the uninterrupted run


@dataclass(frozen=True)
class Outcome:
    """What a finished run is compared by."""

    weights: dict[str, torch.Tensor]
    best_weights: dict[str, torch.Tensor]
    best_step: int
    losses: list[tuple[int, float]]
    final: dict[str, float]
    entries: set[str]
    committed: set[str]


def outcome(run_dir: Path) -> Outcome:
    root = run_dir / "checkpoints"
    manifest = read_manifest(root)
    assert manifest is not None
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    # The summary, the manifest and the links tell the same story.
    assert summary["best"]["step"] == manifest.steps["best"]
    for tag in ("last", "best"):
        assert os.readlink(root / tag) == manifest.tags[tag], f"{tag} link is stale"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return Outcome(
        weights=load_model_state(resolve_checkpoint(run_dir, "last")),
        best_weights=load_model_state(resolve_checkpoint(run_dir, "best")),
        best_step=manifest.steps["best"],
        losses=[(line["step"], line["loss"]) for line in lines if line["kind"] == "train"],
        final=summary["final"],
        entries={p.name for p in root.iterdir()},
        committed={"manifest.json", "last", "best", *manifest.tags.values()},
    )


@dataclass(frozen=True)
class Reference:
    cfg: RunConfig
    outcome: Outcome
    saves: list[list[str]]  # the calls of each keeper save of the uninterrupted run


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the runs are written: memory (tmpfs) where the machine has it, so each of the many runs is quick.

    ``os.fsync`` does nothing here: a SIGKILL loses nothing the kernel has accepted, so flushing to the device
    cannot change what a killed writer leaves behind (it still counts as a kill point).
    """
    shm = Path("/dev/shm")
    in_memory = shm.is_dir() and os.access(shm, os.W_OK)
    base = Path(tempfile.mkdtemp(prefix="gradwise-faults-", dir=shm)) if in_memory else None
    real_fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        yield base or tmp_path_factory.mktemp("faults")
    finally:
        os.fsync = real_fsync
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(scratch: Path) -> Iterator[Reference]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked children must not inherit a thread pool; and every run computes alike
    try:
        cfg = validate(CONFIG)
        run_dir = scratch / "whole"
        with intercepted(FaultPlan()) as plan:  # counting only: the uninterrupted run is also the call census
            fit(cfg, run_dir)
        whole = outcome(run_dir)
        assert whole.best_step != len(whole.losses), "the run must end with best != last"
        yield Reference(cfg=cfg, outcome=whole, saves=plan.saves)
    finally:
        torch.set_num_threads(threads)


def _pick(saves: list[list[str]], which: str) -> int:
    """The 1-based index of the keeper save of kind ``which`` among those that wrote anything."""
    writing = [i for i, calls in enumerate(saves, 1) if calls]
    if which == "first":
        return writing[0]
    if which == "final":
        return writing[-1]
    # The first commit that stages a weights-only best beside last and prunes what the previous manifest named.
    both = [i for i in writing if any("weights-" in c for c in saves[i - 1])]
    return next(i for i in both if any(c.startswith("rmtree(") for c in saves[i - 1]))


# --------------------------------------------------------------------------- killing and resuming


def _killed_run(cfg: RunConfig, run_dir: Path, save: int, call: int) -> None:
    """Train ``cfg`` into ``run_dir`` in a forked child that SIGKILLs itself at call ``call`` of save ``save``."""
    gc.freeze()  # the child touches fewer of the parent's pages (copy-on-write) when its collector skips them
    pid = os.fork()
    if pid != 0:
        gc.unfreeze()
    else:  # the child: never returns into pytest
        code = 3
        try:
            with intercepted(FaultPlan(kill_save=save, kill_call=call)):
                fit(cfg, run_dir)
            code = 0  # not killed: the kill point was never reached
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    status = _wait(pid)
    if status is None:
        pytest.fail(f"save {save} call {call}: the child writing {run_dir} hung")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"save {save} call {call}: the child was not killed (exit status {os.waitstatus_to_exitcode(status)})"
    )


def _wait(pid: int) -> int | None:
    """The wait status of child ``pid``; None (and the child killed) if it has not ended within the timeout."""
    deadline = time.monotonic() + _CHILD_TIMEOUT_S
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: sleep until the child ends instead of polling
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            select.select([fd], [], [], _CHILD_TIMEOUT_S)
        finally:
            os.close(fd)
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _continue(cfg: RunConfig, run_dir: Path) -> Path:
    """What a user does after the kill: resume; a run killed before its first commit is trained again."""
    if read_manifest(run_dir / "checkpoints") is None:
        with pytest.raises(CheckpointError, match="no 'last' checkpoint"):
            fit(cfg, run_dir, resume=True)
        run_dir = run_dir.with_name(f"{run_dir.name}-again")
        fit(cfg, run_dir)
    else:
        fit(cfg, run_dir, resume=True)
    return run_dir


def _assert_same(got: Outcome, want: Outcome, where: str) -> None:
    for key, tensor in want.weights.items():
        assert torch.equal(got.weights[key], tensor), f"{where}: final weights differ at {key}"
    assert got.losses == want.losses, f"{where}: the logged losses differ (or a step is logged twice)"
    assert got.best_step == want.best_step, f"{where}: best is step {got.best_step}, not {want.best_step}"
    for key, tensor in want.best_weights.items():
        assert torch.equal(got.best_weights[key], tensor), f"{where}: best weights differ at {key}"
    assert got.final == want.final, f"{where}: the summary's final metrics differ"
    leftovers = sorted(name for name in got.entries if ".tmp" in name)
    assert not leftovers, f"{where}: temporary files left in checkpoints/: {leftovers}"
    # Nothing but what the manifest names (a resumed run may keep best as a full checkpoint: its first evaluation
    # writes one, as any run's does).
    assert got.entries == got.committed, f"{where}: checkpoints/ holds {sorted(got.entries)}"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["first", "weights-best", "final"])
def test_a_kill_at_every_call_of_a_commit_resumes_bit_exact(reference: Reference, scratch: Path, which: str):
    save = _pick(reference.saves, which)
    calls = reference.saves[save - 1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        for call, label in enumerate(calls, 1):
            run_dir = scratch / which / f"killed-{call:03d}"
            _killed_run(reference.cfg, run_dir, save, call)
            run_dir = _continue(reference.cfg, run_dir)
            _assert_same(outcome(run_dir), reference.outcome, f"killed before call {call} ({label}) of save {save}")
            shutil.rmtree(scratch / which, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - started
    print(f"\ncommit {which!r} (keeper save {save}): {len(calls)} kill points in {elapsed:.1f} s: {', '.join(calls)}")
    assert len(calls) > 10 and any(c.startswith("replace(.manifest.json.tmp-") for c in calls)  # the commit point
    if which != "first":  # a commit of last and best, pruning the checkpoints the previous manifest named
        assert sum("save_file" in c for c in calls) == 4 and any(c.startswith("rmtree") for c in calls)
