"""The largest batch that fits in memory, its throughput, and a batch plan that keeps the recipe's global batch.

Each probe is a few optimizer steps of the recipe at batch ``b`` through the one loop; where the probes run
(in this process on CUDA, in one long-lived memory-capped child on CPU) and why is in
:mod:`gradwise.experiments.batch_probe`. The search doubles the batch until a probe fails, then bisects
between the last fit and the first failure.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradwise.config import RunConfig, apply_overrides, read_yaml, set_path, validate
from gradwise.errors import ConfigError
from gradwise.experiments.batch_probe import OUT_OF_MEMORY, BatchProbe, ChildRunner, InProcessRunner

__all__ = ["OUT_OF_MEMORY", "BatchFindResult", "BatchProbe", "batch_find", "search_batch", "suggest_plan"]

# Bisection stops once the gap between fit and failure is at most this fraction of the fitting batch.
RESOLUTION = 1 / 16


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
        free_mb: Free device memory when the search started, where the device reports it (CUDA).
    """

    device: str
    memory_limit_mb: int | None
    probes: tuple[BatchProbe, ...]
    largest: int | None
    global_batch: int
    suggested_batch: int | None
    suggested_accumulate: int | None
    data_limited: bool = False
    free_mb: int | None = None

    def overrides(self) -> list[str]:
        """The suggestion as ``key=value`` overrides (empty when nothing fitted)."""
        if self.suggested_batch is None:
            return []
        return [f"batch.size={self.suggested_batch}", f"batch.accumulate={self.suggested_accumulate}"]

    def __str__(self) -> str:
        limit = f", limit {self.memory_limit_mb} MB beyond the libraries" if self.memory_limit_mb else ""
        free = f", {self.free_mb} MB free at the start" if self.free_mb is not None else ""
        peaks = any(p.peak_mb is not None for p in self.probes)
        lines = [f"batch-size search on {self.device}{limit}{free}:", "    batch  examples/s" + ("  peak MB" * peaks)]
        for probe in sorted(self.probes, key=lambda p: p.batch):
            shown = f"{probe.examples_per_s:>10.1f}" if probe.examples_per_s is not None else probe.error
            peak = f"  {probe.peak_mb:>7.0f}" if probe.peak_mb is not None else ""
            lines.append(f"  {probe.batch:>7}  {shown}{peak}")
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
    global_batch = cfg.batch.size if isinstance(cfg.batch.size, int) else _train_size(cfg)

    with tempfile.TemporaryDirectory(prefix="gradwise-batch-find-") as tmp:
        runner, device, limit = _runner(cfg.device, memory_limit_mb, Path(tmp))
        free_mb = _cuda_free_mb(device) if device.type == "cuda" else None
        try:

            def probe(batch: int) -> BatchProbe:
                run_dir = Path(tmp) / f"batch-{batch}"
                return runner(probe_config(raw, batch, steps, run_dir, source=str(recipe)), run_dir)

            probes = search_batch(probe, start, max_batch)
        finally:
            runner.close()

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
        free_mb=free_mb,
    )


def _runner(
    wanted: str, memory_limit_mb: int | None, tmp: Path
) -> tuple[InProcessRunner | ChildRunner, Any, int | None]:
    """The probe runner, the device and the memory limit: in this process where an out-of-memory is an
    exception the process survives (CUDA), else in a child capped by default at the available memory."""
    # The CPU child starts before this process imports torch (seconds), so that its own imports overlap them;
    # a device that turns out not to be the CPU closes it unused.
    limit = memory_limit_mb if memory_limit_mb is not None else _available_mb()
    child = ChildRunner(limit, tmp / "probe-stderr.log")
    if wanted in ("auto", "cpu"):
        child.start()
    from gradwise.train.device import resolve_device

    device = resolve_device(wanted)
    if device.type == "cpu":
        return child, device, limit
    child.close()
    if device.type == "cuda":
        return InProcessRunner(device, memory_limit_mb), device, memory_limit_mb
    return ChildRunner(memory_limit_mb, tmp / "probe-stderr.log"), device, memory_limit_mb


def _cuda_free_mb(device: Any) -> int:
    """Free memory on the CUDA device now (after other processes' use), as the device reports it."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return int(free // 2**20)


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
