"""`gradwise train --nproc 2` when a rank dies, stops answering or the user presses Ctrl-C: one short message,
a resumable run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from gradwise.errors import ConfigError
from gradwise.train import launch as launch_module
from gradwise.train.distributed import peer_failure_message
from gradwise.train.launch import StoppedRank, _failure_status, _StoppedWorkers, launch

# digits MLP without dropout (each rank would draw its own masks) and a constant LR: 6 epochs of 40 steps,
# a checkpoint every 20 steps so that the kill below always has one to fall back on.
OVERRIDES = [
    "model.dropout=0",
    "stop.epochs=6",
    "stop.patience=null",
    "schedule.name=constant",
    "log.progress=false",
    "log.plots=false",
    "checkpoint.every_steps=20",
]
TOTAL_STEPS = 240


def test_fewer_than_one_process_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^--nproc must be at least 1 \(got 0\)$"):
        launch(0, ["train", "digits-mlp"])


def failed(*exits: tuple[int, int]) -> ChildFailedError:
    """What torch's agent raises: (rank, exit code) in the order it saw them; negative codes are signals."""
    return ChildFailedError(
        "gradwise",
        {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="") for rank, code in exits},
    )


@pytest.mark.parametrize(
    "exits, status",
    [
        ([(0, 2), (1, 2)], 2),  # a config error on every rank: each printed its own line
        ([(0, 130)], 130),  # interrupted: rank 0 reports it, the other ranks exit 0
        ([(0, 2), (1, -signal.SIGTERM)], 2),  # rank 1 was still exiting when the agent saw rank 0 go
    ],
)
def test_a_status_the_ranks_agree_on_passes_through_silently(exits, status, capsys):
    assert _failure_status(failed(*exits), 2, ["train", "digits-mlp"]) == status
    assert capsys.readouterr().err == ""


def test_the_killed_rank_is_blamed_not_the_peer_that_lost_it(capsys):
    # Seen in the same poll (rank 0 first): rank 0 only exited because rank 1 was killed under it.
    assert _failure_status(failed((0, 2), (1, -signal.SIGKILL)), 2, ["resume", "runs/x"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "gradwise: rank 1 (pid 1001) was killed by SIGKILL; the other ranks were stopped.\n"
        "gradwise: the run directory keeps its last checkpoint; continue with: gradwise resume runs/x [--nproc N]\n"
    )


def test_a_rank_killed_for_being_stopped_is_named_not_the_rank_that_timed_out(capsys):
    # Rank 0 timed out waiting (exit 2, its own line); the launcher found rank 1 stopped and killed it.
    status = _failure_status(
        failed((0, 2), (1, -signal.SIGKILL)),
        2,
        ["train", "digits-mlp", "distributed.timeout_s=5"],
        (StoppedRank(rank=1, pid=1001, state="T"),),
    )
    assert status == 2
    assert capsys.readouterr().err == (
        "gradwise: rank 1 (pid 1001) stopped answering (it was stopped, e.g. by SIGSTOP, and was killed); "
        "the other ranks timed out waiting for it after distributed.timeout_s=5 s; the run directory keeps its "
        "last checkpoint; continue with: gradwise resume RUN_DIR [--nproc N]\n"
    )


def test_a_hung_rank_the_agent_had_to_kill_does_not_make_the_rank_that_timed_out_the_culprit(capsys):
    # Rank 1 hung (not stopped): rank 0 timed out and said so; the agent SIGKILLed rank 1 30 s later.
    failures = failed((0, 2), (1, -signal.SIGKILL))
    failures.failures[1].timestamp = failures.failures[0].timestamp + 30
    assert _failure_status(failures, 2, ["train", "digits-mlp"]) == 2
    assert capsys.readouterr().err == ""


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_worker_first_seen_before_its_exec_is_still_watched(monkeypatch):
    # Between fork and exec a worker shows the launcher's environment, so the first look may not find
    # its rank. The watcher must look again: a stopped worker it never recognized waits out the agent's
    # 30 s grace, and the report then blames the rank that only timed out (a CI failure, 2026-12-04).
    victim = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); time.sleep(60)"],
        start_new_session=True,  # a group of its own, as the agent starts each worker
    )
    gone = 2**22 + 1  # above the kernel's pid limit: a rank that has already exited
    looks = {victim.pid: iter([None, None]), gone: iter([0] * 1000)}
    monkeypatch.setattr(launch_module, "_children", lambda: [victim.pid, gone])
    monkeypatch.setattr(launch_module, "_worker_rank", lambda pid, run_id: next(looks[pid], 1))
    try:
        time.sleep(0.5)  # python is up and its handler is installed
        os.kill(victim.pid, signal.SIGSTOP)
        # Sent together, the lower-numbered SIGTERM would be taken first, before the process stops.
        wait_until(lambda: launch_module._proc_state(victim.pid) == "T")
        os.kill(victim.pid, signal.SIGTERM)  # the agent's teardown: pending, as the worker is stopped
        with _StoppedWorkers("run") as watcher:
            assert victim.wait(timeout=10) == -signal.SIGKILL
        assert watcher.stop() == (StoppedRank(rank=1, pid=victim.pid, state="T"),)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


# What torch 2.13's gloo raises in a collective when a peer is stopped (distributed.timeout_s=5).
GLOO_TIMEOUT = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
    "Timed out waiting 5000ms for recv operation to complete"
)
KEPT = "checkpoint 'last' (step 40) is kept"


@pytest.mark.parametrize(
    "exc, message",
    [
        (
            RuntimeError(GLOO_TIMEOUT),
            f"rank 0 timed out waiting for a peer at step 43 (Timed out waiting 5000ms for recv operation to "
            f"complete); {KEPT}",
        ),
        (
            torch.distributed.DistBackendError(
                "[PG ID 0 PG GUID 0(default_pg) Rank 0] Watchdog caught collective operation timeout: "
                "WorkNCCL(SeqNum=9, OpType=ALLREDUCE, Timeout(ms)=5000) ran for 5012 milliseconds before timing out."
            ),
            "rank 0 timed out waiting for a peer at step 43 (Watchdog caught collective operation timeout: "
            f"WorkNCCL(SeqNum=9, OpType=ALLREDUCE, Timeout(ms)=5000) ran for 5012 milliseconds before timing out.); "
            f"{KEPT}",
        ),
        (
            # A closed connection is not a timeout, and NCCL's Timeout(ms) field alone does not make one.
            RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:24754. WorkNCCL(Timeout(ms)=5000)\nmore"),
            "rank 0: a collective failed at step 43 (RuntimeError: [pair.cc:553] Connection closed by peer "
            "[127.0.0.1]:24754. WorkNCCL(Timeout(ms)=5000)); another rank died or stopped answering, or the ranks "
            f"diverged; {KEPT}",
        ),
        (
            RuntimeError(),
            f"rank 0: a collective failed at step 43 (RuntimeError: ); another rank died or "
            f"stopped answering, or the ranks diverged; {KEPT}",
        ),
    ],
)
def test_peer_failure_message_says_when_the_rank_only_waited(exc: BaseException, message: str):
    assert peer_failure_message(exc, 0, 43, KEPT) == message


def last_step(run_dir: Path) -> int:
    """The step ``checkpoints/last`` points at (-1 while there is none)."""
    try:
        return int(os.readlink(run_dir / "checkpoints" / "last").split("-")[-1])
    except (FileNotFoundError, ValueError):
        return -1


def parent_pid(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its closing parenthesis.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of ``rank``'s worker under the ``launcher`` process (torch's agent sets RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ and parent_pid(int(entry.name)) == launcher:
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return None


def start(
    tmp_path: Path, name: str, *command: str, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``gradwise train digits-mlp --nproc 2 name=NAME ...`` in the background; its stdout and stderr go to files.

    ``extra`` overrides come after ``OVERRIDES``, so they win.
    """
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gradwise",
                *command,
                f"out_dir={tmp_path / 'runs'}",
                f"name={name}",
                *OVERRIDES,
                *extra,
            ],
            cwd=tmp_path,
            stdout=stdout,
            stderr=stderr,
        )
    return proc, out, err


def wait_for_checkpoint(proc: subprocess.Popen[bytes], run_dir: Path, step: int, err: Path) -> None:
    deadline = time.monotonic() + 90
    while last_step(run_dir) < step:
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) first:\n{err.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint at step {step} after 90 s:\n{err.read_text()[-3000:]}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "train"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, int]:
    """A 2-process run whose rank 1 got SIGKILL after step 40: (run dir, exit status, stderr, rank 1's pid)."""
    tmp_path = tmp_path_factory.mktemp("killed")
    run_dir = tmp_path / "runs" / "killed"
    proc, _, err = start(tmp_path, "killed", "train", "digits-mlp", "--nproc", "2")
    try:
        wait_for_checkpoint(proc, run_dir, 40, err)
        victim, survivor = worker_pid(proc.pid, 1), worker_pid(proc.pid, 0)
        assert victim and survivor, f"a worker is gone before the kill:\n{err.read_text()[-3000:]}"
        os.kill(victim, signal.SIGKILL)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not alive(survivor), "the launcher left rank 0 running"
    return run_dir, status, err.read_text(), victim


@pytest.mark.slow
def test_a_killed_rank_is_one_short_message(killed: tuple[Path, int, str, int]):
    run_dir, status, stderr, victim = killed
    assert status == 1, stderr
    # The launcher's own line; rank 0 may print its own one-line "lost contact" error beside it.
    assert re.search(
        rf"^gradwise: rank 1 \(pid {victim}\) was killed by SIGKILL; the other ranks were stopped\.$",
        stderr,
        re.MULTILINE,
    ), stderr
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr
    assert len(stderr.splitlines()) <= 4, stderr  # no torch elastic log lines
    assert last_step(run_dir) >= 40
    assert weights(run_dir)  # `last` survived the kill and loads


@pytest.mark.slow
def test_a_killed_run_resumes_with_one_process(killed: tuple[Path, int, str, int], tmp_path: Path):
    run_dir = killed[0]
    resumed = subprocess.run(
        [sys.executable, "-m", "gradwise", "resume", str(run_dir)], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = subprocess.run(
        [sys.executable, "-m", "gradwise", "train", "digits-mlp", f"out_dir={tmp_path}", "name=whole", *OVERRIDES],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    # 1 process resuming a 1-process checkpoint is bit-exact; here the first steps ran on 2 processes, whose
    # gradients gloo's all-reduce sums in another order than one process's backward does: close, not equal.
    one, resumed_losses = train_losses(tmp_path / "whole"), train_losses(run_dir)
    assert len(resumed_losses) == len(one) == TOTAL_STEPS
    assert max(abs(a - b) for a, b in zip(one, resumed_losses, strict=True)) < 1e-5
    reference = weights(tmp_path / "whole")
    for key, tensor in weights(run_dir).items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_stopped_rank_is_named_killed_and_the_run_resumes(tmp_path: Path):
    # 2 epochs (80 steps). The schema allows timeout_s=1, but joining the job waits under the same limit,
    # and on a loaded machine one rank can start seconds after the other: 5 s keeps that from failing instead.
    run_dir = tmp_path / "runs" / "paused"
    extra = ("stop.epochs=2", "distributed.timeout_s=5")
    proc, _, err = start(tmp_path, "paused", "train", "digits-mlp", "--nproc", "2", extra=extra)
    victim = None
    try:
        wait_for_checkpoint(proc, run_dir, 20, err)
        victim, survivor = worker_pid(proc.pid, 1), worker_pid(proc.pid, 0)
        assert victim and survivor, f"a worker is gone before the stop:\n{err.read_text()[-3000:]}"
        os.kill(victim, signal.SIGSTOP)  # alive and connected, but answering nothing: rank 0 can only time out
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim and alive(victim):
            os.kill(victim, signal.SIGKILL)  # so a failure here leaves nothing stopped behind
    stderr = err.read_text()
    assert not alive(victim) and not alive(survivor), "the launcher left a worker behind"
    assert status == 2, stderr
    lines = stderr.splitlines()
    # Rank 0's own "timed out" line, then the launcher's, which names the stopped rank: nothing else.
    assert len(lines) <= 2 and "Traceback" not in stderr, stderr
    assert re.fullmatch(
        rf"gradwise: rank 1 \(pid {victim}\) stopped answering \(it was stopped, e\.g\. by SIGSTOP, and was "
        rf"killed\); the other ranks timed out waiting for it after distributed\.timeout_s=5 s; the run directory "
        rf"keeps its last checkpoint; continue with: gradwise resume RUN_DIR \[--nproc N\]",
        lines[-1],
    ), stderr
    assert last_step(run_dir) >= 20
    resumed = subprocess.run(
        [sys.executable, "-m", "gradwise", "resume", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_step(run_dir) == 80


@pytest.mark.slow
def test_ctrl_c_reaches_each_rank_once_and_the_run_checkpoints(tmp_path: Path):
    run_dir = tmp_path / "runs" / "stopped"
    proc, out, err = start(tmp_path, "stopped", "train", "digits-mlp", "--nproc", "2")
    try:
        wait_for_checkpoint(proc, run_dir, 20, err)
        # What the terminal does on Ctrl-C: the workers run in their own sessions, so only the launcher gets it.
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err.read_text()
    assert status == 130, stderr
    # A second signal would abort a worker ("aborted") instead of letting it checkpoint.
    assert "aborted" not in stderr and "Traceback" not in stderr, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert 20 < last_step(run_dir) < TOTAL_STEPS
    assert f"resume with: gradwise resume {run_dir}" in out.read_text()
