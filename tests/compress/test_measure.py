"""measure: weight counts, file sizes, latency records, thread restore, metrics equal to evaluate()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gradwise.compress.measure import MeasureSettings, count_weights, measure
from gradwise.config import validate
from gradwise.train.evaluate import evaluate
from gradwise.train.setup import build_model_and_data


@pytest.fixture(scope="module")
def digits():
    cfg = validate({"data": {"name": "digits", "limit": 200}, "model": {"name": "mlp", "hidden": [16]}})
    data, model, task, device = build_model_and_data(cfg)
    return data, model, task, device


def test_count_weights_counts_exact_zeros():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(12.0).reshape(3, 4))  # one zero, at [0, 0]
        model[0].bias.zero_()  # three zeros
        model[2].weight.copy_(torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 5.0]]))  # three zeros
    # 12 + 3 + 6 = 21 weights; 21 - 1 - 3 - 3 = 14 nonzero. Buffers (none here) would not count.
    assert count_weights(model) == (21, 14)


def test_count_weights_ignores_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    # Linear 4 + 2, BatchNorm weight 2 + bias 2 (running stats are buffers, not weights); BN bias starts at 0.
    parameters, nonzeros = count_weights(model)
    assert parameters == 10
    assert nonzeros == 10 - 2 - int((model[0].weight == 0).sum()) - int((model[0].bias == 0).sum())


class ThreadProbe(nn.Module):
    """Records torch's thread count at every call; the output is a fixed linear map."""

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(n_features, n_classes)
        self.threads_seen: set[int] = set()
        self.batches_seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads_seen.add(torch.get_num_threads())
        self.batches_seen.add(x.shape[0])
        return self.head(x)


def test_measure_records_and_restores(tmp_path: Path, digits):
    data, _, task, device = digits
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    files[0].write_bytes(b"x" * 1000)
    files[1].write_bytes(b"y" * 234)
    probe = ThreadProbe(data.info.n_features, data.info.n_outputs)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    settings = MeasureSettings(batch_sizes=(1, 7, 500), repeats=6, warmup=2, threads=target)

    result = measure(probe, task, data, files, settings, device=device, precision="fp32", eval_batch_size=64)

    assert torch.get_num_threads() == before
    assert target in probe.threads_seen
    assert result.threads == target
    assert result.bytes_on_disk == 1234
    # 500 rows: more than the test split holds, so rows are repeated up to the batch size.
    assert {1, 7, 500} <= probe.batches_seen
    assert set(result.latency_ms) == {1, 7, 500}
    for batch, record in result.latency_ms.items():
        assert 0 < record["median"] <= record["p95"]
        assert result.throughput[batch] == pytest.approx(batch / (record["median"] / 1000))
    assert (result.parameters, result.nonzeros) == count_weights(probe)
    json.dumps(result.to_dict())  # JSON-able, batch keys as strings
    assert set(result.to_dict()["latency_ms"]) == {"1", "7", "500"}


def test_measure_metrics_equal_evaluate(tmp_path: Path, digits):
    data, model, task, device = digits
    file = tmp_path / "w.bin"
    file.write_bytes(b"0")
    settings = MeasureSettings(batch_sizes=(2,), repeats=2, warmup=0)
    result = measure(model, task, data, [file], settings, device=device, precision="fp32", eval_batch_size=32)
    expected = {}
    for name, split in (("val", data.val), ("test", data.test)):
        expected.update(evaluate(model, task, split, name, 32, device, "fp32").metrics)
    assert result.metrics == expected
    assert "test_accuracy" in result.metrics and "val_accuracy" in result.metrics
    assert result.parameters == sum(p.numel() for p in model.parameters())


def test_timings_wait_for_the_device_on_cuda():
    """CUDA kernels run asynchronously: the timer must synchronize, or it measures kernel launches."""
    from gradwise.compress.measure import synchronizer

    assert synchronizer(torch.device("cuda")) is torch.cuda.synchronize
    synchronizer(torch.device("cpu"))()  # a no-op that needs no GPU
