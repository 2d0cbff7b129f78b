"""Run ``gradwise COMMAND`` as N data-parallel processes on this machine, on torch's elastic launcher.

This is what ``torchrun --standalone --nproc-per-node=N -m gradwise COMMAND``
does, run in-process through ``torch.distributed.launcher.api`` so that gradwise
decides what the user reads: a c10d rendezvous on ``localhost:0`` (a free port,
so two jobs on one machine never collide), a random run id, one node, no
restarts, and the workers' stdout/stderr inherited. The workers find their
place in the job from torchrun's variables (``gradwise.train.distributed``).

What the user sees when the job ends:

- every worker succeeded: exit 0;
- the workers that failed all exited with the same code (a config error, exit
  2, or an interruption, exit 130, which each worker already reported in its
  own line): that code, nothing added;
- a rank died (a crash, the OOM killer, ``kill -9``): one short block naming the
  rank, its pid and how it died, instead of torch's ChildFailedError dump; exit 1;
- a rank stopped answering (``kill -STOP``, a debugger): its peers time out after
  ``distributed.timeout_s`` and say so in their own line; torch's agent would then wait 30 s for the
  stopped rank to act on its SIGTERM, which it cannot, so ``_StoppedWorkers`` kills it at once, and one
  line names it; exit 2;
- Ctrl-C: the workers live in their own sessions, so only the launcher gets the
  terminal's SIGINT; torch's agent forwards it once to every worker (the loop
  checkpoints at the next agreed step), waits ``SHUTDOWN_TIMEOUT_S``, then
  kills what is left; exit 130.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, launch_agent

from gradwise.errors import ConfigError

EXIT_FAILED = 1
# gradwise.cli's code for bad input and machine failures (a rank that stopped answering is one).
EXIT_MACHINE_FAILURE = 2
# gradwise.cli's code for "interrupted, checkpoint kept" (not imported: the CLI sits above this module).
EXIT_INTERRUPTED = 130
# Time the workers get after the one forwarded Ctrl-C to reach an agreed step and write a checkpoint.
SHUTDOWN_TIMEOUT_S = 60
# torch's agent turns these into SignalException (and installs its handlers on them for the whole process).
_AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# The loggers torch's agent, rendezvous and process context write to (warnings included, on stderr).
_TORCH_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")

# How often the launcher looks for a stopped worker (torch's agent polls its workers as often).
_WATCH_INTERVAL_S = 0.1

_SignalHandler = Any  # what signal.getsignal returns: a callable, an int or None


@dataclass(frozen=True)
class StoppedRank:
    """A worker that was stopped (``/proc`` state T: SIGSTOP/SIGTSTP, or t: a debugger) when the job failed."""

    rank: int
    pid: int
    state: str


def launch(nproc: int, command: list[str]) -> int:
    """Run ``python -m gradwise *command`` as ``nproc`` ranks of one job on this machine.

    Args:
        nproc: Worker processes (ranks) to start, at least 1.
        command: The ``gradwise`` arguments every worker runs, e.g. ``["train", "digits-mlp", "name=x"]``.

    Returns:
        The exit status for the ``gradwise`` command: 0, the code the failed workers agree on,
        1 when a rank died, 2 when a rank stopped answering, or 130 when the launcher was interrupted.

    Raises:
        ConfigError: ``nproc`` is smaller than 1.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc})")
    # torchrun's default for nproc > 1: N processes with a thread pool each per core oversubscribe the machine.
    omp = {"OMP_NUM_THREADS": "1"} if nproc > 1 and "OMP_NUM_THREADS" not in os.environ else {}
    run_id = str(uuid.uuid4())
    # Rank error files land in a directory of ours, removed afterwards (torch's default leaks one in /tmp per run).
    with tempfile.TemporaryDirectory(prefix="gradwise-launch-") as log_dir, _quiet_torch(), _restored_signals():
        # The agent sets TORCHELASTIC_SIGNALS_TO_HANDLE in os.environ; workers copy os.environ when started.
        with _environ(omp, keep=("TORCHELASTIC_SIGNALS_TO_HANDLE",)), _StoppedWorkers(run_id) as stopped:
            config = LaunchConfig(
                min_nodes=1,
                max_nodes=1,
                nproc_per_node=nproc,
                run_id=run_id,
                rdzv_backend="c10d",
                rdzv_endpoint="localhost:0",
                max_restarts=0,
                shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                logs_specs=DefaultLogsSpecs(log_dir=log_dir),  # no redirects, no tee: workers inherit our stdio
            )
            # -u as torchrun: rank 0's lines reach a pipe when printed, not when the job ends.
            args = ["-u", "-m", "gradwise", *command]
            try:
                launch_agent(config, sys.executable, args)
            except ChildFailedError as failed:
                return _failure_status(failed, nproc, command, stopped.stop())
            except SignalException as interrupted:
                # The agent has already forwarded the signal to every worker and waited for them.
                sig = interrupted.sigval
                return EXIT_INTERRUPTED if sig in (signal.SIGINT, signal.SIGTERM) else 128 + int(sig)
    return 0


def _failure_status(
    failed: ChildFailedError, nproc: int, command: list[str], stopped: tuple[StoppedRank, ...] = ()
) -> int:
    """The exit status for a job some of whose workers failed; prints a line when the ranks' own lines miss the cause.

    Args:
        failed: What torch's agent raised.
        nproc: The job's process count.
        command: The ``gradwise`` arguments the workers ran.
        stopped: The workers ``_StoppedWorkers`` found stopped and killed while the job was failing.
    """
    # The ranks we killed for being stopped did not fail on their own; what the others did decides.
    failures = {r: f for r, f in failed.failures.items() if r not in {s.rank for s in stopped}}
    rank, first = _root_failure(failures) if failures else (-1, None)
    if stopped and (first is None or first.exitcode > 0):
        # The others gave up waiting (each said so in its own line) because a stopped rank could not answer.
        print(_stopped_message(stopped[0], command), file=sys.stderr)
        return EXIT_MACHINE_FAILURE
    assert first is not None  # ChildFailedError always carries at least one failure
    # A rank still on its way out when another's exit was seen gets the agent's SIGTERM, and SIGKILL if it
    # has not left 30 s later (hung): it follows, not differs. A rank killed first by a signal is the root.
    others = {f.exitcode for r, f in failures.items() if r != rank} - {-signal.SIGTERM, -signal.SIGKILL}
    if first.exitcode > 0 and others <= {first.exitcode}:
        return first.exitcode  # every failed rank gave the same status and has said why
    print(_failure_message(rank, first, nproc, command), file=sys.stderr)
    return EXIT_FAILED


def _root_failure(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The failure that caused the others: the earliest, and among those seen together, a rank killed by a signal.

    torch's own pick (``get_first_failure``) goes by timestamps in whole seconds, so when a peer of a
    killed rank notices the broken connection and exits within the same monitor poll, the tie goes to
    whichever rank is polled first. A rank killed by a signal (SIGKILL, SIGSEGV, ...) did not die because
    of a peer; the agent's own SIGTERM to the survivors is the exception.
    """
    order = {rank: index for index, rank in enumerate(failures)}  # the order the agent saw them in

    def key(rank: int) -> tuple[int, bool, int]:
        code = failures[rank].exitcode
        return failures[rank].timestamp, not (code < 0 and code != -signal.SIGTERM), order[rank]

    rank = min(failures, key=key)
    return rank, failures[rank]


def _failure_message(rank: int, failure: ProcessFailure, nproc: int, command: list[str]) -> str:
    """Two lines: which rank died and how, then how to continue from the last checkpoint."""
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    stopped = "; the other ranks were stopped" if nproc > 1 else ""
    return (
        f"gradwise: rank {rank} (pid {failure.pid}) {how}{stopped}.\n"
        f"gradwise: the run directory keeps its last checkpoint; continue with: {_resume_hint(command)}"
    )


def _stopped_message(stopped: StoppedRank, command: list[str]) -> str:
    """One line: which rank stopped answering and why the others gave up, then how to continue."""
    why = "it was stopped by a debugger" if stopped.state == "t" else "it was stopped, e.g. by SIGSTOP"
    # The launcher does not read the config; the workers do. An override on the command line is what it can see.
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith("distributed.timeout_s=")]
    timeout = f"distributed.timeout_s={values[-1]} s" if values else "distributed.timeout_s"
    return (
        f"gradwise: rank {stopped.rank} (pid {stopped.pid}) stopped answering ({why}, and was killed); the other "
        f"ranks timed out waiting for it after {timeout}; the run directory keeps its last checkpoint; "
        f"continue with: {_resume_hint(command)}"
    )


def _resume_hint(command: list[str]) -> str:
    # Only ``resume RUN_DIR`` names the run directory; a ``train`` run's name is decided by the workers.
    run_dir = command[1] if len(command) > 1 and command[0] == "resume" else "RUN_DIR"
    return f"gradwise resume {run_dir} [--nproc N]"


class _StoppedWorkers:
    """Kills, and remembers, a worker that is stopped while the job is failing around it.

    A stopped process cannot act on the SIGTERM torch's agent sends when another rank fails (the rank
    that timed out waiting for it), so the agent would wait its 30 s grace before the SIGKILL, and the
    report would then blame the rank that merely timed out, being the first to fail. A watcher thread
    looks, while the job runs, for a worker stopped (``/proc`` state T or t) with a SIGTERM pending after
    some other worker has exited: the agent's teardown, which it would end with SIGKILL anyway. It sends
    that SIGKILL now (it works on a stopped process) to the worker's process group (the agent starts
    each worker in its own session), so nothing is left behind. No one else's stopped process is touched:
    a worker stopped while its peers still run (a user pausing it) is left alone.
    """

    def __init__(self, run_id: str) -> None:
        self.found: list[StoppedRank] = []  # read through stop(), once the thread is joined
        self._run_id = run_id
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gradwise-stopped-workers", daemon=True)

    def __enter__(self) -> _StoppedWorkers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> tuple[StoppedRank, ...]:
        """End the watch (again is fine) and return the workers it killed."""
        self._done.set()
        self._thread.join()
        return tuple(self.found)

    def _watch(self) -> None:
        ranks: dict[int, int] = {}  # worker pid -> its rank
        while not self._done.wait(_WATCH_INTERVAL_S):
            for pid in _children():
                if pid not in ranks:
                    # Asked again each poll until it answers: between fork and exec a child still shows the
                    # launcher's environment, so a worker caught in that window reads as no worker at all.
                    rank = _worker_rank(pid, self._run_id)
                    if rank is not None:
                        ranks[pid] = rank
            states = {pid: (rank, _proc_state(pid)) for pid, rank in ranks.items()}
            if all(state not in (None, "Z") for _, state in states.values()):
                continue  # every worker that started is still there: nothing is failing yet
            for pid, (rank, state) in states.items():
                if state in ("T", "t") and _sigterm_pending(pid) and all(s.pid != pid for s in self.found):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue  # it went meanwhile
                    self.found.append(StoppedRank(rank=rank, pid=pid, state=state))


def _children() -> list[int]:
    """This process's children: torch's agent starts the workers from it."""
    pids: list[int] = []
    # /proc/self/task/TID/children (Linux >= 3.5, CONFIG_PROC_CHILDREN) lists the children each thread started.
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            pids.extend(int(pid) for pid in children.read_text().split())
        except OSError:
            continue  # the thread ended meanwhile
    return pids


def _worker_rank(pid: int, run_id: str) -> int | None:
    """The RANK torch's agent gave process ``pid``, when it is a worker of run ``run_id``."""
    try:
        environ = dict(
            item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
        )
        if environ.get(b"TORCHELASTIC_RUN_ID") == run_id.encode():
            return int(environ[b"RANK"])
    except (OSError, KeyError, ValueError):
        pass  # gone meanwhile, or not a worker
    return None


def _proc_state(pid: int) -> str | None:
    """The one-letter state in /proc/PID/stat (R, S, D, T, t, Z, ...), None when the process is gone."""
    try:
        # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ')'.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _sigterm_pending(pid: int) -> bool:
    """Whether a SIGTERM waits undelivered on ``pid`` (ShdPnd: sent to the process, as killpg does)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
                return True
    except (OSError, ValueError, IndexError):
        pass
    return False


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's launcher logging (config dumps, 'Sending process closing signal', failure reports).

    Its loggers carry their own levels, so raising the parent's level would not do; a handler that drops
    the records, with propagation cut, keeps them from the root logger and from logging's last resort.
    """
    saved = []
    for name in _TORCH_LOGGERS:
        logger = logging.getLogger(name)
        handler = logging.NullHandler()
        saved.append((logger, handler, logger.propagate))
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handler, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate


@contextmanager
def _restored_signals() -> Iterator[None]:
    """Put back the signal handlers torch's agent replaces for good (else a later Ctrl-C is a SignalException)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # the agent installs nothing off the main thread either
        return
    saved: dict[signal.Signals, _SignalHandler] = {sig: signal.getsignal(sig) for sig in _AGENT_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def _environ(values: dict[str, str], keep: tuple[str, ...] = ()) -> Iterator[None]:
    """Set ``values`` in os.environ for the block; put those and the ``keep`` names back as they were after it."""
    names = {*values, *keep}
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
