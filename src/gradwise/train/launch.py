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
from typing import Any

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, launch_agent

from gradwise.errors import ConfigError

EXIT_FAILED = 1
# gradwise.cli's code for "interrupted, checkpoint kept" (not imported: the CLI sits above this module).
EXIT_INTERRUPTED = 130
# Time the workers get after the one forwarded Ctrl-C to reach an agreed step and write a checkpoint.
SHUTDOWN_TIMEOUT_S = 60
# torch's agent turns these into SignalException (and installs its handlers on them for the whole process).
_AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# The loggers torch's agent, rendezvous and process context write to (warnings included, on stderr).
_TORCH_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")

_SignalHandler = Any  # what signal.getsignal returns: a callable, an int or None


def launch(nproc: int, command: list[str]) -> int:
    """Run ``python -m gradwise *command`` as ``nproc`` ranks of one job on this machine.

    Args:
        nproc: Worker processes (ranks) to start, at least 1.
        command: The ``gradwise`` arguments every worker runs, e.g. ``["train", "digits-mlp", "name=x"]``.

    Returns:
        The exit status for the ``gradwise`` command: 0, the code the failed workers agree on,
        1 when a rank died, or 130 when the launcher was interrupted.

    Raises:
        ConfigError: ``nproc`` is smaller than 1.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc})")
    # torchrun's default for nproc > 1: N processes with a thread pool each per core oversubscribe the machine.
    omp = {"OMP_NUM_THREADS": "1"} if nproc > 1 and "OMP_NUM_THREADS" not in os.environ else {}
    # Rank error files land in a directory of ours, removed afterwards (torch's default leaks one in /tmp per run).
    with tempfile.TemporaryDirectory(prefix="gradwise-launch-") as log_dir, _quiet_torch(), _restored_signals():
        # The agent sets TORCHELASTIC_SIGNALS_TO_HANDLE in os.environ; workers copy os.environ when started.
        with _environ(omp, keep=("TORCHELASTIC_SIGNALS_TO_HANDLE",)):
            config = LaunchConfig(
                min_nodes=1,
                max_nodes=1,
                nproc_per_node=nproc,
                run_id=str(uuid.uuid4()),
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
                return _failure_status(failed, nproc, command)
            except SignalException as interrupted:
                # The agent has already forwarded the signal to every worker and waited for them.
                sig = interrupted.sigval
                return EXIT_INTERRUPTED if sig in (signal.SIGINT, signal.SIGTERM) else 128 + int(sig)
    return 0


def _failure_status(failed: ChildFailedError, nproc: int, command: list[str]) -> int:
    """The exit status for a job some of whose workers failed; prints the block when a rank died on its own."""
    rank, first = _root_failure(failed.failures)
    # A rank still on its way out when another's exit was seen gets the agent's SIGTERM: it follows, not differs.
    others = {failure.exitcode for r, failure in failed.failures.items() if r != rank} - {-signal.SIGTERM}
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
    # Only ``resume RUN_DIR`` names the run directory; a ``train`` run's name is decided by the workers.
    run_dir = command[1] if len(command) > 1 and command[0] == "resume" else "RUN_DIR"
    stopped = "; the other ranks were stopped" if nproc > 1 else ""
    return (
        f"gradwise: rank {rank} (pid {failure.pid}) {how}{stopped}.\n"
        f"gradwise: the run directory keeps its last checkpoint; continue with: "
        f"gradwise resume {run_dir} [--nproc N]"
    )


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
