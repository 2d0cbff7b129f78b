"""The largest batch that fits in memory, its throughput, and a batch plan that keeps the recipe's global batch.

Each probe is a few optimizer steps of the recipe at batch ``b`` through the one
loop, run in a child process (``python -m gradwise.experiments.batch_find``,
config in, JSON out) so that running out of memory ends only that probe. On
CPU the child caps its own memory with ``RLIMIT_DATA``: the limit is the
child's data size after importing torch plus ``memory_limit_mb``, and an
allocation past it fails inside torch's allocator like a real out-of-memory.
On CUDA ``torch.cuda.OutOfMemoryError`` is the signal, with
``torch.cuda.set_per_process_memory_fraction`` as the optional limit. The search
doubles the batch until a probe fails, then bisects between the last fit and the
first failure.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradwise import errors
from gradwise.config import RunConfig, apply_overrides, read_yaml, set_path, to_yaml, validate
from gradwise.errors import ConfigError, GradwiseError, TrainingError

# Bisection stops once the gap between fit and failure is at most this fraction of the fitting batch.
RESOLUTION = 1 / 16
OUT_OF_MEMORY = "out of memory"
# RLIMIT_DATA, not RLIMIT_AS: importing torch maps ~1 GB of libraries and every thread reserves malloc arenas
# (address space, not memory); since Linux 4.7 RLIMIT_DATA counts private writable mappings, i.e. what
# tensors really take. Measured here: with +200 MB, RLIMIT_AS failed a 150 MB tensor, RLIMIT_DATA did not.
_LIMIT = resource.RLIMIT_DATA
_OOM_TEXT = ("can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory")


@dataclass(frozen=True)
class BatchProbe:
    """One probe: ``batch`` examples per step, and its throughput or why it failed.

    ``whole_set`` marks a probe whose batch was cut to the whole training set (the
    size asked for was larger); ``batch`` is then the training set's size.
    """

    batch: int
    examples_per_s: float | None = None
    error: str | None = None
    whole_set: bool = False

    @property
    def fits(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class BatchFindResult:
    """What the batch-size search found.

    Attributes:
        device: Where the probes ran (``cpu``, ``cuda``).
        memory_limit_mb: The memory each probe could use beyond its imported libraries (None: the device's own).
        probes: Every probe, in the order tried.
        largest: The largest batch that fitted (None: not even batch 1).
        global_batch: The recipe's ``batch.size`` (examples per optimizer step).
        suggested_batch: The suggested ``batch.size``: the recipe's global batch, kept.
        suggested_accumulate: The suggested ``batch.accumulate``: micro-batches of at most ``largest``.
        data_limited: The whole training set fitted in one batch (the search could go no higher).
    """

    device: str
    memory_limit_mb: int | None
    probes: tuple[BatchProbe, ...]
    largest: int | None
    global_batch: int
    suggested_batch: int | None
    suggested_accumulate: int | None
    data_limited: bool = False

    def overrides(self) -> list[str]:
        """The suggestion as ``key=value`` overrides (empty when nothing fitted)."""
        if self.suggested_batch is None:
            return []
        return [f"batch.size={self.suggested_batch}", f"batch.accumulate={self.suggested_accumulate}"]

    def __str__(self) -> str:
        limit = f", limit {self.memory_limit_mb} MB beyond the libraries" if self.memory_limit_mb else ""
        lines = [f"batch-size search on {self.device}{limit}:", "    batch  examples/s"]
        for probe in sorted(self.probes, key=lambda p: p.batch):
            shown = f"{probe.examples_per_s:.1f}" if probe.examples_per_s is not None else probe.error
            lines.append(f"  {probe.batch:>7}  {shown}")
        if self.largest is None:
            lines.append("no batch fits, not even 1 example; lower memory use or raise the limit")
            return "\n".join(lines)
        whole = " (the whole training set)" if self.data_limited else ""
        lines.append(f"largest batch that fits: {self.largest}{whole}")
        micro = math.ceil(self.global_batch / (self.suggested_accumulate or 1))
        lines.append(
            f"suggestion: {' '.join(self.overrides())} (global batch {self.global_batch} kept, micro-batches of "
            f"<= {micro}); or batch.size={self.largest} to use the largest batch (retune optim.lr)"
        )
        return "\n".join(lines)


def batch_find(
    recipe: Path,
    overrides: list[str] | None = None,
    *,
    start: int = 8,
    max_batch: int = 65536,
    steps: int = 3,
    memory_limit_mb: int | None = None,
) -> BatchFindResult:
    """Find the largest batch of ``recipe`` that fits in memory and suggest a batch plan.

    Args:
        recipe: The recipe file.
        overrides: ``key.path=value`` overrides applied to the recipe first.
        start: The first batch size tried; the search doubles from there.
        max_batch: The largest batch size tried.
        steps: Optimizer steps per probe (throughput is measured after the first).
        memory_limit_mb: Memory a probe may use beyond its imported libraries; default on CPU the
            available memory, on CUDA the whole device.

    Returns:
        The probes, the largest fitting batch and the suggestion.

    Raises:
        ConfigError: A bad argument or recipe.
    """
    if start < 1 or max_batch < start:
        raise ConfigError(f"batch_find start/max_batch: need 1 <= start <= max_batch (got {start}, {max_batch})")
    if steps < 1:
        raise ConfigError(f"batch_find steps: must be >= 1 (got {steps})")
    if memory_limit_mb is not None and memory_limit_mb < 1:
        raise ConfigError(f"batch_find memory_limit_mb: must be >= 1 (got {memory_limit_mb})")
    raw = apply_overrides(read_yaml(recipe), overrides or [])
    raw.pop("variants", None)
    cfg = validate(raw, source=str(recipe))
    from gradwise.train.device import resolve_device

    device = resolve_device(cfg.device)
    limit = memory_limit_mb if memory_limit_mb is not None or device.type != "cpu" else _available_mb()
    global_batch = cfg.batch.size if isinstance(cfg.batch.size, int) else _train_size(cfg)

    with tempfile.TemporaryDirectory(prefix="gradwise-batch-find-") as tmp:

        def probe(batch: int) -> BatchProbe:
            probe_cfg = probe_config(raw, batch, steps, Path(tmp) / f"batch-{batch}", source=str(recipe))
            return run_probe(probe_cfg, Path(tmp) / f"batch-{batch}", limit)

        probes = search_batch(probe, start, max_batch)

    fitting = [p.batch for p in probes if p.fits]
    largest = max(fitting) if fitting else None
    data_limited = any(p.whole_set for p in probes)
    size, accumulate = suggest_plan(global_batch, largest) if largest else (None, None)
    return BatchFindResult(
        device=device.type,
        memory_limit_mb=limit,
        probes=tuple(probes),
        largest=largest,
        global_batch=global_batch,
        suggested_batch=size,
        suggested_accumulate=accumulate,
        data_limited=data_limited,
    )


def search_batch(probe: Callable[[int], BatchProbe], start: int, max_batch: int) -> list[BatchProbe]:
    """Double from ``start`` until a probe fails (or ``max_batch``), then bisect between the last fit and it.

    With no fit at all the bisection runs between 0 and ``start``. A probe that took fewer
    examples than asked (the training set is smaller) ends the search: no larger batch exists.

    Args:
        probe: Runs one probe at a batch size.
        start: The first batch size.
        max_batch: The largest batch size to try.

    Returns:
        Every probe in the order taken.
    """
    probes: list[BatchProbe] = []
    low, high = 0, None  # largest fit, smallest failure
    batch = start
    while True:
        result = probe(batch)
        probes.append(result)
        if not result.fits:
            high = batch
            break
        low = result.batch
        if result.whole_set or batch >= max_batch:
            return probes
        batch = min(2 * batch, max_batch)
    while high - low > max(1, int(low * RESOLUTION)):
        middle = (low + high) // 2
        result = probe(middle)
        probes.append(result)
        if not result.fits:
            high = middle
        elif result.whole_set:
            break
        else:
            low = middle
    return probes


def suggest_plan(global_batch: int, largest: int) -> tuple[int, int]:
    """(batch.size, batch.accumulate) keeping ``global_batch`` with micro-batches of at most ``largest``.

    ``accumulate`` is the fewest micro-batches that fit: ceil(global / largest); the
    loop splits a step into near-equal micro-batches of at most ceil(global / accumulate).
    """
    if largest < 1:
        raise ValueError(f"largest must be >= 1, got {largest}")
    return global_batch, max(1, math.ceil(global_batch / largest))


def probe_config(raw: dict[str, Any], batch: int, steps: int, run_dir: Path, *, source: str) -> RunConfig:
    """The recipe as a probe: ``batch`` examples in one micro-batch, ``steps`` steps, no extras."""
    from gradwise.config import deep_copy

    probe_raw = deep_copy(raw)
    changes: dict[str, Any] = {
        "name": run_dir.name,
        "out_dir": str(run_dir.parent),
        "batch": {"size": batch, "accumulate": 1},
        "schedule": {"name": "constant"},  # the LR does not change memory; a long warmup would not fit 3 steps
        "stop.epochs": None,
        "stop.max_steps": steps,
        "stop.patience": None,
        "eval.every_steps": steps,
        "checkpoint.keep_best": False,
        "log.progress": False,
        "log.plots": False,
        "log.tensorboard": False,
        "log.mlflow": None,
    }
    for path, value in changes.items():
        set_path(probe_raw, path, value)
    eval_batch = int((raw.get("eval") or {}).get("batch_size") or 1024)
    # Evaluation must not be what runs out of memory: it never takes more examples than the training step.
    set_path(probe_raw, "eval.batch_size", min(eval_batch, batch))
    return validate(probe_raw, source=f"{source} (batch {batch})")


def run_probe(cfg: RunConfig, run_dir: Path, limit_mb: int | None) -> BatchProbe:
    """Run one probe in a child process and read its JSON answer; an out-of-memory ends only the child."""
    asked = int(cfg.batch.size)  # type: ignore[arg-type]  # probe configs always have an integer size
    request = {"config": to_yaml(cfg), "run_dir": str(run_dir), "limit_mb": limit_mb}
    done = subprocess.run(
        [sys.executable, "-m", "gradwise.experiments.batch_find"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=False,
    )
    answer = _last_json(done.stdout)
    if answer is None:
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            # SIGKILL is the kernel's OOM killer (or a memory cgroup) ending the child.
            why = OUT_OF_MEMORY if name == "SIGKILL" else "crashed"
            return BatchProbe(batch=asked, error=f"{why} (probe killed by {name})")
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return BatchProbe(batch=asked, error=f"probe failed (exit {done.returncode}): {tail[:200]}")
    if answer["status"] == "ok":
        took = int(answer["batch"])
        return BatchProbe(batch=took, examples_per_s=float(answer["examples_per_s"]), whole_set=took < asked)
    if answer["status"] == "oom":
        return BatchProbe(batch=asked, error=OUT_OF_MEMORY)
    kind = getattr(errors, str(answer.get("type")), None)
    error_class = kind if isinstance(kind, type) and issubclass(kind, GradwiseError) else TrainingError
    raise error_class(f"batch_find: probe at batch {asked}: {answer['message']}")


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "status" in value:
            return value
    return None


def _available_mb() -> int:
    """MemAvailable from /proc/meminfo (Linux), else 4 GB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


def _train_size(cfg: RunConfig) -> int:
    """Training examples (the global batch of ``batch.size: full``); loads the data once."""
    from gradwise.data import load_dataset
    from gradwise.train.adapt import model_dir

    return len(load_dataset(cfg.data, cfg.task.kind, cfg.seed, tokenizer_dir=model_dir(cfg)).train.y)


# --------------------------------------------------------------------------- the child process


def _data_bytes() -> int:
    """This process's private writable memory (VmData), what RLIMIT_DATA counts."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _limit_memory(cfg: RunConfig, limit_mb: int | None) -> None:
    import torch

    from gradwise.train.device import resolve_device

    device = resolve_device(cfg.device)
    if limit_mb is None:
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_mb * 2**20 / total), device)
        return
    # Start the intra-op thread pool first: its thread stacks count as data, and they are the libraries'
    # memory, not the run's (8 MB a thread, which on a 16-core machine would eat a small limit).
    torch.ones(256, 256) @ torch.ones(256, 256)
    # Relative to what the imported libraries already hold, so the limit is the run's own memory.
    limit = _data_bytes() + limit_mb * 2**20
    _, hard = resource.getrlimit(_LIMIT)
    resource.setrlimit(_LIMIT, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OOM_TEXT)


def _probe_main() -> None:
    """Child: read {config, run_dir, limit_mb} on stdin, train, print one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    answer_to, sys.stdout = sys.stdout, sys.stderr  # only the answer goes to stdout
    from gradwise.store.rundir import read_metrics, read_summary
    from gradwise.train.loop import fit

    cfg = validate(yaml.safe_load(request["config"]), source="batch_find probe")
    run_dir = Path(request["run_dir"])
    answer: dict[str, Any]
    try:
        _limit_memory(cfg, request["limit_mb"])
        fit(cfg, run_dir)
        train, _ = read_metrics(run_dir)
        answer = {"status": "ok", "batch": max(line["batch_size"] for line in train), "examples_per_s": 0.0}
        later = train[1:]  # the first step pays for warm-up (allocations, kernel choice)
        elapsed = later[-1]["time"] - train[0]["time"] if later else 0.0
        if elapsed > 0:
            answer["examples_per_s"] = (later[-1]["examples"] - train[0]["examples"]) / elapsed
        else:
            answer["examples_per_s"] = float(read_summary(run_dir)["examples_per_s"])
    except BaseException as exc:  # report every failure as data; the parent decides what it means
        if _is_oom(exc):
            answer = {"status": "oom", "message": str(exc).splitlines()[0][:300] if str(exc) else ""}
        else:
            answer = {"status": "error", "type": type(exc).__name__, "message": str(exc)[:500]}
    answer_to.write(json.dumps(answer) + "\n")
    answer_to.flush()


if __name__ == "__main__":
    _probe_main()
