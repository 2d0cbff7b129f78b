"""Running the batch finder's probes: in this process on CUDA, in one long-lived capped child on CPU.

A probe is a few optimizer steps of the recipe through the one loop (``fit``). Where it runs follows from
how each device runs out of memory:

- **CUDA** reports memory (``torch.cuda.mem_get_info``) and an allocation past it raises
  ``torch.cuda.OutOfMemoryError`` in the caller, leaving the process sound. So probes run in this
  process (:class:`InProcessRunner`): the data is loaded once (``setup._load_data`` caches it), and between
  probes everything is freed (``gc.collect``, ``empty_cache``, peak statistics reset). An optional limit is
  ``torch.cuda.set_per_process_memory_fraction``.
- **CPU** has no such report: past the machine's memory the kernel's OOM killer ends the process, whichever
  it is, and the only cap (``RLIMIT_DATA``) applies to a whole process. So probes run in a child, but ONE
  child for the whole search (:class:`ChildRunner`), not one per probe: it imports torch and loads the data
  once, sets the cap once (its data size after importing torch, plus the limit, by default the available
  memory), then reads one JSON request a line and answers one JSON line per probe. A probe that runs out of
  memory ends that child, and the next probe starts a fresh one: after an out-of-memory the heap may be
  fragmented and full up to the cap, which would make every later probe fail early. In-process probes on
  CPU were rejected: "far below the available memory" needs a memory estimate before the probe, and a
  wrong one kills the user's own process.

RLIMIT_DATA, not RLIMIT_AS: importing torch maps ~1 GB of libraries and every thread reserves malloc
arenas (address space, not memory); since Linux 4.7 RLIMIT_DATA counts private writable mappings, i.e.
what tensors really take. Measured: with +200 MB, RLIMIT_AS failed a 150 MB tensor, RLIMIT_DATA did not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import io
import json
import resource
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from gradwise import errors
from gradwise.config import RunConfig, to_yaml, validate
from gradwise.errors import GradwiseError, TrainingError

OUT_OF_MEMORY = "out of memory"
_LIMIT = resource.RLIMIT_DATA
_OOM_TEXT = ("can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory")


@dataclass(frozen=True)
class BatchProbe:
    """One probe: ``batch`` examples per step, and its throughput or why it failed.

    ``whole_set`` marks a probe whose batch was cut to the whole training set (the
    size asked for was larger); ``batch`` is then the training set's size. ``peak_mb``
    is the device's peak allocation during the probe, where the device reports it (CUDA).
    """

    batch: int
    examples_per_s: float | None = None
    error: str | None = None
    whole_set: bool = False
    peak_mb: float | None = None

    @property
    def fits(self) -> bool:
        return self.error is None


# (examples in the largest step, examples/s): what a finished probe measured.
Measured = tuple[int, float]
Trainer = Callable[[RunConfig, Path], Measured]


def train_probe(cfg: RunConfig, run_dir: Path) -> Measured:
    """Run the probe through ``fit`` and read its step size and throughput back from the metrics log."""
    import time

    import torch

    from gradwise.store.rundir import read_metrics, read_summary
    from gradwise.train.loop import fit

    ends: list[float] = []

    def clock() -> bool:  # fit polls this after every step; on CUDA the step's kernels are done first
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return False

    fit(cfg, run_dir, stop_requested=clock)
    train, _ = read_metrics(run_dir)
    batch = max(line["batch_size"] for line in train)
    # The first step pays for warm-up (allocations, kernel choice): timed from its end.
    elapsed = ends[len(train) - 1] - ends[0] if len(train) > 1 and len(ends) >= len(train) else 0.0
    if elapsed > 0:
        return batch, (train[-1]["examples"] - train[0]["examples"]) / elapsed
    return batch, float(read_summary(run_dir)["examples_per_s"])


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator running out of memory (torch's, Python's, or the C library's)."""
    import torch

    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    # Under the cap any allocation may be the one that fails: a file write (the run's own error then says
    # "[Errno 12] Cannot allocate memory: <path>"), or C code that returns NULL without setting an error.
    if isinstance(exc, SystemError) and "without exception set" in str(exc):
        return True
    return isinstance(exc, Exception) and any(text in str(exc).lower() for text in _OOM_TEXT)


def probe_error(asked: int, kind: type[BaseException] | None, message: str) -> GradwiseError:
    """A probe's failure that is not an out-of-memory, as the gradwise error it was (else a TrainingError)."""
    error_class = kind if isinstance(kind, type) and issubclass(kind, GradwiseError) else TrainingError
    return error_class(f"batch_find: probe at batch {asked}: {message}")


def _asked(cfg: RunConfig) -> int:
    return int(cfg.batch.size)  # type: ignore[arg-type]  # probe configs always have an integer size


def _measured_probe(asked: int, measured: Measured, peak_mb: float | None = None) -> BatchProbe:
    took, examples_per_s = measured
    return BatchProbe(batch=took, examples_per_s=examples_per_s, whole_set=took < asked, peak_mb=peak_mb)


# --------------------------------------------------------------------------- in this process (CUDA)


class InProcessRunner:
    """Probes in this process, for a device whose out-of-memory is an exception the process survives (CUDA).

    Args:
        device: The probes' device; on CUDA its memory is freed and its peak statistics reset between probes.
        limit_mb: Cap on CUDA allocations (``set_per_process_memory_fraction``); None: the whole device.
        train: Runs one probe (the real one trains; tests pass a fake that raises an out-of-memory).
    """

    def __init__(self, device: Any, limit_mb: int | None = None, train: Trainer = train_probe) -> None:
        import torch

        self.device = device
        self.train = train
        self._cuda = device.type == "cuda"
        self._capped = self._cuda and limit_mb is not None
        if self._capped:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit_mb * 2**20 / total), device)

    def __call__(self, cfg: RunConfig, run_dir: Path) -> BatchProbe:
        asked = _asked(cfg)
        self._free()
        try:
            # Every probe would repeat the same warnings and notes; the search prints its own table.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                measured = self.train(cfg, run_dir)
        except Exception as exc:  # an out-of-memory is a result; anything else is re-raised
            if not is_oom(exc):
                raise probe_error(asked, type(exc), str(exc)[:500]) from exc
            result = BatchProbe(batch=asked, error=OUT_OF_MEMORY)
        else:
            result = _measured_probe(asked, measured, self._peak_mb())
        finally:
            self._free()  # the failed probe's tensors die with its traceback, which is gone by now
        return result

    def _peak_mb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self._cuda else None

    def _free(self) -> None:
        import torch

        gc.collect()
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def close(self) -> None:
        """Lift the memory cap (the caller's process goes on); nothing else outlives a probe here."""
        if self._capped:
            import torch

            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            self._capped = False


# --------------------------------------------------------------------------- one capped child (CPU)


class ChildRunner:
    """Probes in one long-lived child process under one ``RLIMIT_DATA`` cap, restarted after an out-of-memory.

    Args:
        limit_mb: Memory the child may use beyond its imported libraries (None: no cap).
        log: Where the child's stderr goes (read back when a probe fails).
    """

    def __init__(self, limit_mb: int | None, log: Path) -> None:
        self.limit_mb = limit_mb
        self.log = log
        self.starts = 0  # children started so far (1 for a search without an out-of-memory)
        self._child: subprocess.Popen[str] | None = None

    def __call__(self, cfg: RunConfig, run_dir: Path) -> BatchProbe:
        asked = _asked(cfg)
        child = self._child or self.start()
        line = ""
        try:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(json.dumps({"config": to_yaml(cfg), "run_dir": str(run_dir)}) + "\n")
            child.stdin.flush()
            line = child.stdout.readline()
        except BrokenPipeError:
            pass  # the child died before reading: its exit status says why
        answer = _parse(line)
        if answer is None:
            return self._died(asked)
        if answer["status"] == "ok":
            return _measured_probe(asked, (int(answer["batch"]), float(answer["examples_per_s"])))
        if answer["status"] == "oom":
            self.close()  # its heap may be fragmented and up to the cap: the next probe gets a fresh child
            return BatchProbe(batch=asked, error=OUT_OF_MEMORY)
        raise probe_error(asked, getattr(errors, str(answer.get("type")), None), str(answer["message"]))

    def start(self) -> subprocess.Popen[str]:
        """Start the child now (it starts at the first probe otherwise)."""
        if self._child is not None:
            return self._child
        command = [sys.executable, "-m", "gradwise.experiments.batch_probe", json.dumps(self.limit_mb)]
        with self.log.open("a") as stderr:  # the child keeps its own descriptor
            self._child = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1
            )
        self.starts += 1
        return self._child

    def _died(self, asked: int) -> BatchProbe:
        assert self._child is not None
        code = self._child.wait()
        self._child = None
        if code < 0:
            name = signal.Signals(-code).name
            # SIGKILL is the kernel's OOM killer (or a memory cgroup) ending the child.
            why = OUT_OF_MEMORY if name == "SIGKILL" else "crashed"
            return BatchProbe(batch=asked, error=f"{why} (probe killed by {name})")
        tail = (self.log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        return BatchProbe(batch=asked, error=f"probe failed (exit {code}): {tail[:200]}")

    def close(self) -> None:
        """End the child (it exits when its stdin closes); kill it if it does not."""
        child, self._child = self._child, None
        if child is None:
            return
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "status" in value else None


# --------------------------------------------------------------------------- inside the child


def _data_bytes() -> int:
    """This process's private writable memory (VmData), what RLIMIT_DATA counts."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _limit_memory(limit_mb: int | None) -> None:
    import torch

    if limit_mb is None:
        return
    # Start the intra-op thread pool first: its thread stacks count as data, and they are the libraries'
    # memory, not the run's (8 MB a thread, which on a 16-core machine would eat a small limit).
    torch.ones(256, 256) @ torch.ones(256, 256)
    # Relative to what the imported libraries already hold, so the limit is the run's own memory.
    limit = _data_bytes() + limit_mb * 2**20
    _, hard = resource.getrlimit(_LIMIT)
    resource.setrlimit(_LIMIT, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _trim_heap() -> None:
    """Hand freed heap back to the system, so the next probe starts from the same data size (glibc only)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    try:
        cfg = validate(yaml.safe_load(request["config"]), source="batch_find probe")
        batch, examples_per_s = train_probe(cfg, Path(request["run_dir"]))
        return {"status": "ok", "batch": batch, "examples_per_s": examples_per_s}
    except BaseException as exc:  # report every failure as data; the parent decides what it means
        if is_oom(exc):
            return {"status": "oom", "message": str(exc).splitlines()[0][:300] if str(exc) else ""}
        return {"status": "error", "type": type(exc).__name__, "message": str(exc)[:500]}


def _child_main(limit_mb: int | None, requests: IO[str], answers: IO[str]) -> None:
    """Child: cap memory once, then one JSON answer line per JSON request line until stdin closes."""
    # Imported before the cap is measured: the libraries are not the run's memory. torch._inductor (and the
    # dynamo it brings) is what a torch.optim step and deterministic mode import on first use; scikit-learn
    # is what the bundled data and the row split import when a run first reads them (~100 MB).
    import sklearn.datasets
    import sklearn.model_selection  # noqa: F401
    import torch._inductor  # noqa: F401

    import gradwise.store.rundir
    import gradwise.train.loop  # noqa: F401

    _limit_memory(limit_mb)
    for line in requests:
        answer = _answer(json.loads(line))
        _trim_heap()
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
        if answer["status"] == "oom":
            return  # the parent starts a fresh child for the next probe


if __name__ == "__main__":
    answer_to, sys.stdout = sys.stdout, sys.stderr  # only answers go to stdout
    _child_main(json.loads(sys.argv[1]), sys.stdin, answer_to)
