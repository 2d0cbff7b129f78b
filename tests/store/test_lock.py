"""One writer per run directory: a kernel lock that names its holder and dies with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gradwise.errors import CheckpointError, StorageError
from gradwise.store import lock
from gradwise.store.checkpoint import load_model_state, resolve_checkpoint

# A process that takes the lock of argv[1], says so, and holds it until it is killed.
_HOLDER = (
    "import sys, time; from pathlib import Path; from gradwise.store import lock; "
    "lock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)"
)
# A process that tries to take the lock of argv[1] once and prints what happened.
_TRY = (
    "import sys; from pathlib import Path; from gradwise.store import lock\n"
    "try:\n    lock.acquire(Path(sys.argv[1])); print('took')\nexcept Exception as exc:\n    print(exc)"
)
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same kernels in every process: bit-exact runs


@contextmanager
def holder(run_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock of ``run_dir`` for the block (SIGKILLed at its end)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "held\n", proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path):
    run = tmp_path / "run"
    with holder(run) as proc:
        descriptors = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
        with pytest.raises(CheckpointError) as refused:
            lock.acquire(run)
        if descriptors is not None:  # a refused acquire keeps no descriptor open
            assert len(os.listdir("/proc/self/fd")) == descriptors
        message = str(refused.value)
        assert f"in use by another gradwise process (pid {proc.pid})" in message
        assert str(run) in message and "\n" not in message
        with pytest.raises(CheckpointError, match=rf"\(pid {proc.pid}\)"), lock.holding(run):
            pytest.fail("the block ran without the lock")


def test_a_holder_killed_with_sigkill_leaves_no_stale_lock(tmp_path: Path):
    run = tmp_path / "run"
    with holder(run) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (run / lock.LOCK_FILE).exists()  # the file stays (removing it would race a waiting writer) …
    try:
        assert lock.acquire(run) is True  # … but the kernel released the lock with the process
        assert (run / lock.LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the dead holder's pid is gone
    finally:
        lock.release(run)
    with holder(run):  # released: another process takes it at once
        pass


def test_the_holder_and_the_ranks_it_launches_do_not_lock_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "run"
    assert lock.acquire(run) is True
    try:
        assert lock.acquire(run) is False  # already held by this process: a no-op, not a deadlock
        with lock.holding(run):
            pass
        assert lock.acquire(run) is False  # the nested block did not give the outer hold away
        refused = subprocess.run([sys.executable, "-c", _TRY, str(run)], capture_output=True, text=True)
        assert f"in use by another gradwise process (pid {os.getpid()})" in refused.stdout, refused.stderr
    finally:
        lock.release(run)
    assert subprocess.run([sys.executable, "-c", _TRY, str(run)], capture_output=True, text=True).stdout == "took\n"
    # A rank started by the process that holds the lock writes under it.
    other = tmp_path / "other"
    monkeypatch.setenv(lock.HELD_BY_PARENT_ENV, str((other / lock.LOCK_FILE).resolve()))
    assert lock.acquire(other) is False
    monkeypatch.delenv(lock.HELD_BY_PARENT_ENV)
    assert subprocess.run([sys.executable, "-c", _TRY, str(other)], capture_output=True, text=True).stdout == "took\n"


def test_a_planted_lock_link_is_never_written_through(tmp_path: Path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / lock.LOCK_FILE).symlink_to(outside)
    with pytest.raises(StorageError, match=r"\.lock: .*symbolic link"):
        lock.acquire(run)
    assert outside.read_text() == "keep me\n"


# --------------------------------------------------------------------------- two `gradwise resume` of one run


def _interrupted_run(tmp_path: Path, name: str, stop_after: int | None) -> Path:
    """A digits-mlp run trained in this process; interrupted after ``stop_after`` steps (None: run to its end)."""
    from gradwise.config import apply_overrides, read_yaml, validate
    from gradwise.experiments.recipes import find_recipe
    from gradwise.train.loop import fit

    overrides = ["data.limit=300", "stop.epochs=8", "schedule.step_size=20", "log.progress=false", "log.plots=false"]
    overrides += [f"name={name}", f"out_dir={tmp_path / 'runs'}"]
    cfg = validate(apply_overrides(read_yaml(find_recipe("digits-mlp")), overrides))
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == stop_after

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = fit(cfg, cfg.out_dir / name, stop_requested=stop)
    finally:
        torch.set_num_threads(threads)
    assert summary["status"] == ("interrupted" if stop_after else "completed")
    return cfg.out_dir / name


def _holder_of(run: Path, candidates: list[subprocess.Popen[str]], timeout_s: float = 120) -> subprocess.Popen[str]:
    """The one of ``candidates`` whose pid the run's lock file names, as soon as it does."""
    deadline = time.monotonic() + timeout_s
    by_pid = {proc.pid: proc for proc in candidates}
    while time.monotonic() < deadline:
        try:
            text = (run / lock.LOCK_FILE).read_text().strip()
        except FileNotFoundError:
            text = ""
        if text.isdigit() and int(text) in by_pid:
            return by_pid[int(text)]
        if all(proc.poll() is not None for proc in candidates):
            break
        time.sleep(0.002)
    outputs = [proc.communicate() for proc in candidates]
    pytest.fail(f"no resume took the lock of {run}: {outputs}")


@pytest.mark.slow
def test_two_concurrent_resumes_of_one_run_one_runs_the_other_is_one_line(tmp_path: Path):
    whole = _interrupted_run(tmp_path, "whole", stop_after=None)
    run = _interrupted_run(tmp_path, "r", stop_after=13)  # mid-epoch (8 steps an epoch)
    env = {**os.environ, **_ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gradwise", "resume", str(run)]
    procs = [
        subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        winner = _holder_of(run, procs)
        # Stopped while it holds the lock, the winner cannot finish before the other has tried: no race decides.
        os.kill(winner.pid, signal.SIGSTOP)
        (loser,) = [proc for proc in procs if proc is not winner]
        out, err = loser.communicate(timeout=120)
        os.kill(winner.pid, signal.SIGCONT)
        assert loser.returncode == 2, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"in use by another gradwise process (pid {winner.pid})" in err
        assert out == ""
        out, err = winner.communicate(timeout=120)
        assert winner.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.communicate()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] in ("completed", "early_stopped")
    a = load_model_state(resolve_checkpoint(whole, "last"))
    b = load_model_state(resolve_checkpoint(run, "last"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = {}
    for path in (whole, run):
        lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        losses[path.name] = [(line["step"], line["loss"]) for line in lines if line["kind"] == "train"]
    assert losses["r"] == losses["whole"]  # every step once: the refused resume wrote nothing
