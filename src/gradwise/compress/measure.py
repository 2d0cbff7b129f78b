"""One measurement for every model variant: size, sparsity, latency, throughput and quality.

Every variant a compression recipe produces (the fp32 run, a pruned copy, a
torchao-quantized model, an ONNX Runtime session wrapped in
:class:`~gradwise.compress.onnx_runtime.OnnxModule`) goes through the same
:func:`measure`, so the numbers in a comparison table differ only by the model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwise.data import Dataset
from gradwise.data.batches import take
from gradwise.tasks import Task
from gradwise.train.device import to_device
from gradwise.train.evaluate import evaluate


@dataclass(frozen=True)
class MeasureSettings:
    """How latency is measured.

    Attributes:
        batch_sizes: Batch sizes timed, each on the first ``b`` rows of the test split.
        repeats: Timed calls per batch size (median and 95th percentile are reported).
        warmup: Untimed calls first (allocator, caches, lazy kernel selection, compilation).
        threads: Intra-op threads while timing; None keeps the current torch setting.
    """

    batch_sizes: tuple[int, ...] = (1, 64)
    repeats: int = 30
    warmup: int = 5
    threads: int | None = None


@dataclass
class Measurement:
    """What one variant costs and how well it does.

    Attributes:
        parameters: Logical weight elements (a quantized weight counts its unquantized shape).
        nonzeros: Of those, the elements that are not exactly zero.
        bytes_on_disk: Total size of the files that hold the variant.
        latency_ms: ``{batch: {"median": ms, "p95": ms}}`` for one forward call.
        throughput: ``{batch: examples per second}`` at the median latency.
        threads: Intra-op threads used while timing.
        metrics: ``val_*`` and ``test_*`` metrics from :func:`gradwise.train.evaluate.evaluate`.
    """

    parameters: int
    nonzeros: int
    bytes_on_disk: int
    latency_ms: dict[int, dict[str, float]]
    throughput: dict[int, float]
    threads: int
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (batch-size keys become strings, as JSON requires)."""
        record = asdict(self)
        record["latency_ms"] = {str(b): dict(v) for b, v in self.latency_ms.items()}
        record["throughput"] = {str(b): v for b, v in self.throughput.items()}
        return record


def _logical_nonzeros(tensor: torch.Tensor) -> int:
    # torchao's quantized weights (Int8Tensor, IntxUnpackedToInt8Tensor …) are tensor subclasses whose
    # shape is the float weight's; counting on the dequantized values is the only view every one supports.
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "dequantize"):
        tensor = tensor.dequantize()
    return int(torch.count_nonzero(tensor.detach()))


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzeros) of ``model``, counted from the tensors themselves.

    torchao-quantized weights count their logical elements; an
    :class:`~gradwise.compress.onnx_runtime.OnnxModule` counts the weights among its graph's initializers.
    """
    from gradwise.compress.onnx_runtime import OnnxModule

    if isinstance(model, OnnxModule):
        return model.count_weights()
    parameters = nonzeros = 0
    for param in model.parameters():
        parameters += param.numel()
        nonzeros += _logical_nonzeros(param)
    return parameters, nonzeros


def _input_dtype(model: nn.Module) -> torch.dtype:
    # The same rule as evaluate(): floating inputs are cast to the weights' dtype.
    param = next(model.parameters(), None)
    return param.dtype if param is not None else torch.float32


def _fixed_batch(data: Dataset, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
    """The first ``batch`` test rows, cycling when the split is smaller."""
    split = data.test if len(data.test.y) else data.val
    rows = torch.arange(batch) % len(split.y)
    return to_device(take(split, rows)[0], device, dtype)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for ``device`` to finish its queued work: CUDA runs kernels asynchronously, so a clock read
    right after a call would time the launch, not the computation. A no-op on the CPU."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@torch.inference_mode()
def _time_calls(model: nn.Module, x: Any, settings: MeasureSettings) -> list[float]:
    first = next(iter(x.values())) if isinstance(x, dict) else x  # a table's features and category ids
    sync = synchronizer(first.device)
    for _ in range(settings.warmup):
        model(x)
    sync()
    times = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def time_model(
    model: nn.Module, data: Dataset, settings: MeasureSettings, device: torch.device
) -> tuple[dict[int, dict[str, float]], dict[int, float], int]:
    """Latency (ms) and throughput per batch size, and the thread count used; threads are restored after."""
    from gradwise.compress.onnx_runtime import OnnxModule

    previous = torch.get_num_threads()
    threads = settings.threads or previous
    onnx_previous = model.threads if isinstance(model, OnnxModule) else None
    was_training = model.training
    model.eval()
    latency: dict[int, dict[str, float]] = {}
    throughput: dict[int, float] = {}
    try:
        torch.set_num_threads(threads)
        if isinstance(model, OnnxModule):
            model.set_threads(threads)
        for batch in settings.batch_sizes:
            x = _fixed_batch(data, batch, device, _input_dtype(model))
            times = _time_calls(model, x, settings)
            median = statistics.median(times)
            latency[batch] = {"median": median, "p95": float(np.percentile(times, 95))}
            throughput[batch] = batch / (median / 1000.0)
    finally:
        torch.set_num_threads(previous)
        if isinstance(model, OnnxModule):
            model.set_threads(onnx_previous)
        model.train(was_training)
    return latency, throughput, threads


def measure(
    model: nn.Module,
    task: Task,
    data: Dataset,
    files: list[Path],
    settings: MeasureSettings,
    *,
    device: torch.device,
    precision: str,
    eval_batch_size: int,
) -> Measurement:
    """Measure one variant: weights, bytes of ``files``, latency on fixed test rows, val and test metrics.

    Args:
        model: Any model gradwise evaluates (plain, pruned, torchao-quantized, :class:`OnnxModule`).
        task: The base task whose meter scores the outputs.
        data: The dataset; latency uses the first rows of ``data.test``, metrics use val and test.
        files: The files that store the variant; their sizes are summed.
        settings: Batch sizes, repeats, warm-up calls and threads of the timing.
        device: Where inputs go.
        precision: Autocast precision for evaluation (the run's ``precision``).
        eval_batch_size: Rows per evaluation batch.
    """
    parameters, nonzeros = count_weights(model)
    size = sum(Path(file).stat().st_size for file in files)
    latency, throughput, threads = time_model(model, data, settings, device)
    metrics: dict[str, float] = {}
    for name, split in (("val", data.val), ("test", data.test)):
        if len(split.y):
            metrics.update(evaluate(model, task, split, name, eval_batch_size, device, precision).metrics)
    return Measurement(
        parameters=parameters,
        nonzeros=nonzeros,
        bytes_on_disk=size,
        latency_ms=latency,
        throughput=throughput,
        threads=threads,
        metrics=metrics,
    )
