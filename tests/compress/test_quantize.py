"""torchao quantization: int8 dynamic/weight-only/static, QAT, and the safetensors round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from gradwise.compress.measure import count_weights
from gradwise.compress.quantize import (
    QuantizeSpec,
    convert_qat,
    prepare_qat,
    quantize_model,
    restore_quantized,
    write_quantized,
)
from gradwise.compress.runs import load_run_model
from gradwise.config import validate
from gradwise.config.schema import QATConfig
from gradwise.errors import CheckpointError, ConfigError
from gradwise.train.evaluate import evaluate
from gradwise.train.loop import fit


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    cfg = validate(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp", "hidden": [64]},
            "stop": {"epochs": 5},
            "log": {"progress": False, "plots": False},
        }
    )
    fit(cfg, run_dir)
    _, data, model, task, device = load_run_model(run_dir)
    return data, model, task, device


def accuracy(model, trained) -> float:
    data, _, task, device = trained
    return evaluate(model, task, data.test, "test", 512, device, "fp32").metrics["test_accuracy"]


def test_spec_rejects_bad_fields():
    with pytest.raises(ConfigError, match=r"quantize\.method"):
        QuantizeSpec(method="fp8")
    with pytest.raises(ConfigError, match=r"quantize\.bits 4"):
        QuantizeSpec(method="dynamic", bits=4)
    with pytest.raises(ConfigError, match=r"quantize\.backend"):
        QuantizeSpec(backend="tensorrt")


def test_int4_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CPU kernel"):
        quantize_model(small_mlp(), QuantizeSpec(method="weight_only", bits=4))


@pytest.mark.parametrize("method", ["dynamic", "weight_only"])
def test_int8_matches_hand_quantized_reference(method: str):
    from torchao.quantization import Int8Tensor

    model = small_mlp()
    x = torch.randn(8, 64)
    quantized = quantize_model(model, QuantizeSpec(method=method))
    assert type(model[0].weight) is nn.Parameter  # the fp32 model is untouched
    assert isinstance(quantized[0].weight, Int8Tensor) and isinstance(quantized[2].weight, Int8Tensor)

    def fake_int8(t: torch.Tensor, dim: int) -> torch.Tensor:
        # symmetric int8 with one scale per row (dim=-1 → per row of a weight / per token of an input)
        scale = t.abs().amax(dim=dim, keepdim=True) / 127.5
        return torch.clamp(torch.round(t / scale), -128, 127) * scale

    def reference(x: torch.Tensor) -> torch.Tensor:
        for layer in (model[0], model[2]):
            inputs = fake_int8(x, -1) if method == "dynamic" else x
            x = inputs @ fake_int8(layer.weight, -1).T + layer.bias
            x = torch.relu(x) if layer is model[0] else x
        return x

    with torch.no_grad():
        got, want, full = quantized(x), reference(x), model(x)
    # The hand-made quantization agrees far more closely than fp32 does with either.
    assert (got - want).abs().max() < 0.2 * (full - want).abs().max()


def test_static_uses_calibrated_activation_scale():
    model = small_mlp()
    calibration = torch.randn(100, 64)
    quantized = quantize_model(model, QuantizeSpec(method="static"), calibration)
    with torch.no_grad():
        hidden = torch.relu(model[0](calibration))
    # per-tensor symmetric scale = max |input| / 127 over the calibration rows
    assert float(quantized[0].weight.act_quant_scale) == pytest.approx(float(calibration.abs().max()) / 127)
    assert float(quantized[2].weight.act_quant_scale) == pytest.approx(float(hidden.abs().max()) / 127, rel=1e-5)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert (quantized(x) - model(x)).abs().max() < 0.05
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(model, QuantizeSpec(method="static"))


@pytest.mark.parametrize("method", ["dynamic", "weight_only", "static"])
def test_write_restore_round_trip_is_exact(tmp_path: Path, method: str):
    model = small_mlp()
    quantized = quantize_model(model, QuantizeSpec(method=method), torch.randn(50, 64))
    record = write_quantized(tmp_path, quantized, QuantizeSpec(method=method))
    assert record == {"backend": "torchao", "method": method, "bits": 8, "group_size": 32, "file": record["file"]}
    json.dumps(record)
    restored = restore_quantized(tmp_path, small_mlp(seed=1), record)
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), quantized(x))
    assert type(restored[0].weight.data) is type(quantized[0].weight.data)


def test_restore_rejects_missing_and_mismatched_files(tmp_path: Path):
    spec = QuantizeSpec()
    record = write_quantized(tmp_path, quantize_model(small_mlp(), spec), spec)
    with pytest.raises(CheckpointError, match="does not match"):
        restore_quantized(tmp_path, nn.Sequential(nn.Linear(64, 96)), record)
    (tmp_path / record["file"]).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a quantized safetensors"):
        restore_quantized(tmp_path, small_mlp(), record)
    with pytest.raises(CheckpointError, match="missing"):
        restore_quantized(tmp_path, small_mlp(), {**record, "file": "nope.safetensors"})


def test_trained_digits_int8_keeps_accuracy_and_shrinks_weights(tmp_path: Path, trained_digits):
    _, model, _, _ = trained_digits
    spec = QuantizeSpec(method="dynamic")
    quantized = quantize_model(model, spec)
    assert abs(accuracy(quantized, trained_digits) - accuracy(model, trained_digits)) <= 0.01
    assert count_weights(quantized)[0] == count_weights(model)[0]  # logical elements unchanged

    record = write_quantized(tmp_path, quantized, spec)
    with safe_open(str(tmp_path / record["file"]), framework="pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    linear_names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert linear_names
    for name in linear_names:
        fp32_bytes = model.get_submodule(name).weight.numel() * 4
        qdata = stored[f"{name}._weight_qdata"]
        assert qdata.dtype == torch.int8
        int8_bytes = sum(
            t.numel() * t.element_size() for key, t in stored.items() if key.startswith(f"{name}._weight_")
        )
        assert fp32_bytes / int8_bytes >= 3.5


@pytest.mark.parametrize(("method", "bits"), [("dynamic", 8), ("weight_only", 4)])
def test_qat_keeps_state_dict_keys_and_converts_to_fake_numerics(method: str, bits: int):
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    cfg = QATConfig(method=method, bits=bits, group_size=32)
    model = small_mlp()
    plain_keys = list(model.state_dict())
    prepare_qat(model, cfg)
    assert isinstance(model[0], FakeQuantizedLinear)
    assert list(model.state_dict()) == plain_keys
    fresh = small_mlp(seed=3)
    fresh.load_state_dict(model.state_dict(), strict=True)  # a QAT checkpoint loads into the fp32 model

    x = torch.randn(6, 64)
    model(x).sum().backward()  # fake quantization passes gradients (straight-through)
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        fake = model(x)
        plain = fresh(x)
    assert not torch.equal(fake, plain)  # the fake quantization does change the forward pass
    convert_qat(model, cfg)
    convert_qat(fresh, cfg)  # a fresh fp32 model holding the QAT weights converts the same way
    with torch.no_grad():
        assert torch.equal(model(x), fake)
        assert torch.equal(fresh(x), fake)


def test_qat_group_size_must_divide_inputs():
    with pytest.raises(ConfigError, match=r"qat\.group_size 48"):
        prepare_qat(small_mlp(), QATConfig(method="weight_only", bits=4, group_size=48))
