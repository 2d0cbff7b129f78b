"""ONNX Runtime backend: export, int8/int4 quantization of the graph, OnnxModule as a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from gradwise.compress.measure import count_weights
from gradwise.compress.onnx_runtime import OnnxModule, export_onnx, quantize_onnx
from gradwise.compress.quantize import QuantizeSpec, restore_quantized, write_quantized
from gradwise.compress.runs import load_run_model
from gradwise.config import validate
from gradwise.errors import CheckpointError, ConfigError
from gradwise.train.evaluate import evaluate
from gradwise.train.loop import fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    cfg = validate(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp", "hidden": [64]},
            "stop": {"epochs": 5},
            "log": {"progress": False, "plots": False},
        }
    )
    fit(cfg, root / "run")
    _, data, model, task, device = load_run_model(root / "run")
    export_onnx(model, data.test.x[:1], root / "fp32.onnx")
    return root, data, model, task, device


def accuracy(model: nn.Module, trained) -> float:
    _, data, _, task, device = trained
    return evaluate(model, task, data.test, "test", 128, device, "fp32").metrics["test_accuracy"]


def initializer_bytes(file: Path) -> int:
    return sum(numpy_helper.to_array(init).nbytes for init in onnx.load(str(file)).graph.initializer)


def test_fp32_onnx_matches_torch_at_any_batch(trained):
    root, data, model, _, _ = trained
    session = OnnxModule(root / "fp32.onnx", threads=1)
    for rows in (1, 5, len(data.test.y)):  # exported from one row: the batch axis must still be dynamic
        x = data.test.x[:rows]
        with torch.no_grad():
            torch.testing.assert_close(session(x), model(x), rtol=0, atol=1e-4)
    assert accuracy(session, trained) == accuracy(model, trained)
    assert count_weights(session) == count_weights(model)


def test_token_model_exports_dynamic_batch_and_sequence(tmp_path: Path):
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x).mean(dim=1))

    torch.manual_seed(0)
    model = Tokens().eval()
    export_onnx(model, torch.randint(0, 20, (1, 4)), tmp_path / "tokens.onnx")
    session = OnnxModule(tmp_path / "tokens.onnx")
    for shape in ((1, 4), (3, 9), (7, 2)):
        x = torch.randint(0, 20, shape)
        with torch.no_grad():
            torch.testing.assert_close(session(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("method", "bits"), [("dynamic", 8), ("static", 8), ("weight_only", 4), ("weight_only", 8)])
def test_quantized_graph_keeps_accuracy_and_is_smaller(trained, method: str, bits: int):
    root, data, model, _, _ = trained
    spec = QuantizeSpec(method=method, bits=bits, backend="onnxruntime")
    calibration = [data.train.x[start : start + 64].numpy() for start in range(0, 256, 64)]
    dst = quantize_onnx(root / "fp32.onnx", root / f"{method}{bits}.onnx", spec, calibration)
    session = OnnxModule(dst)
    assert abs(accuracy(session, trained) - accuracy(model, trained)) <= 0.02
    # All stored tensors (weights, scales, zero points, int32 biases) against the fp32 graph's float32 tensors.
    assert initializer_bytes(root / "fp32.onnx") / initializer_bytes(dst) >= 3
    parameters, nonzeros = count_weights(session)
    assert parameters == count_weights(model)[0]
    assert 0.8 * parameters < nonzeros <= parameters  # some small weights round to exactly 0


def test_static_needs_calibration(trained, tmp_path: Path):
    root = trained[0]
    with pytest.raises(ConfigError, match="calibration"):
        quantize_onnx(root / "fp32.onnx", tmp_path / "s.onnx", QuantizeSpec(method="static", backend="onnxruntime"))


def test_count_weights_of_a_packed_int4_graph(tmp_path: Path):
    model = nn.Sequential(nn.Linear(64, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(256.0).reshape(4, 64) - 100.0)  # exactly one zero, at [1, 36]
        model[0].weight[3, 10:] = 0.0  # 54 more zeros
    export_onnx(model, torch.randn(2, 64), tmp_path / "fp32.onnx")
    spec = QuantizeSpec(method="weight_only", bits=4, backend="onnxruntime", group_size=32)
    dst = quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", spec)
    parameters, nonzeros = count_weights(OnnxModule(dst))
    assert parameters == 256
    # 4-bit blocks of 32 with scale max|w|/8: |w| below half a step rounds to 0. Count those by hand.
    weight = model[0].weight.detach().reshape(4, 2, 32)
    step = weight.abs().amax(dim=-1, keepdim=True) / 8
    expected = int((torch.round(weight / torch.where(step == 0, 1, step)) != 0).sum())
    assert nonzeros == expected


def test_write_restore_onnx(trained, tmp_path: Path):
    root, data, _, _, _ = trained
    spec = QuantizeSpec(method="dynamic", backend="onnxruntime")
    session = OnnxModule(quantize_onnx(root / "fp32.onnx", root / "rt.onnx", spec))
    record = write_quantized(tmp_path, session, spec)
    assert record["file"] == "model.onnx" and record["backend"] == "onnxruntime"
    restored = restore_quantized(tmp_path, nn.Linear(1, 1), record)
    x = data.test.x[:9]
    assert torch.equal(restored(x), session(x))


def test_threads_and_bad_files(trained, tmp_path: Path):
    root, data, _, _, _ = trained
    session = OnnxModule(root / "fp32.onnx", threads=1)
    before = session(data.test.x[:3])
    session.set_threads(2)
    assert session.threads == 2
    np.testing.assert_allclose(session(data.test.x[:3]).numpy(), before.numpy(), atol=1e-6)
    with pytest.raises(CheckpointError, match="missing"):
        OnnxModule(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        OnnxModule(tmp_path / "bad.onnx")
