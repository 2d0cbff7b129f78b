"""Quantization of Linear layers with torchao, QAT, and saving/restoring quantized weights.

Post-training quantization goes through ``torchao.quantization.quantize_``:
``dynamic`` is int8 weights (per output channel) with int8 activations
quantized per token at run time; ``weight_only`` is int8 weights with float
activations; ``static`` is int8 weights with per-tensor activation scales
calibrated on training rows. Quantization-aware training uses torchao's
``QATConfig`` prepare/convert. Quantized weights are stored as safetensors
with torchao's tensor-subclass metadata (never pickled). The ONNX Runtime
backend lives in :mod:`gradwise.compress.onnx_runtime`; ``write_quantized`` and
``restore_quantized`` handle both. torchao is imported inside the functions:
its import is slow and loud.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.config import RunConfig
from gradwise.config.schema import QATConfig
from gradwise.errors import CheckpointError, ConfigError
from gradwise.store.records import compressed_weight_file
from gradwise.train.strategies import RunStrategy

QUANTIZED_FILE = "quantized.safetensors"
ONNX_FILE = "model.onnx"
# Calibration batches are run this many rows at a time (bounded memory for text models).
CALIBRATION_BATCH = 64

# Which backend ``backend: auto`` picks, per method, measured on this 2-core AVX-512-VNNI CPU (torch 2.13,
# torchao 0.18, onnxruntime 1.32; median ms per forward, the bundled MiniLM topics classifier, 64 tokens max,
# 1 thread, batch 1 / batch 64; the machine was shared, so ±30%):
#   fp32 eager 21 / 1624         torchao int8 dynamic eager 30 / 1595   torchao int8 dynamic compiled 6.0 / 692
#   onnxruntime fp32 12 / 1739   onnxruntime int8 dynamic 1.2 / 757     onnxruntime int8 static 1.3 / 531
#   torchao int8 weight-only 7.4 / 4324                                 onnxruntime int4 weight-only 8.9 / 1153
# Accuracy on the topics test split (172 rows, head trained on frozen features) moved by at most one example
# for onnxruntime dynamic and torchao; onnxruntime is as fast or faster without torch.compile's warm-up and is
# the only CPU int4 path. torchao stays selectable (backend: torchao) and is the QAT path.
DEFAULT_BACKEND: dict[str, str] = {
    "dynamic": "onnxruntime",
    "weight_only": "onnxruntime",
    "static": "onnxruntime",
    "none": "onnxruntime",
}

# "none" deploys the fp32 graph through ONNX Runtime: the baseline that separates the runtime's own
# speed from what int8 adds.
_METHODS = ("dynamic", "weight_only", "static", "none")
_BACKENDS = ("torchao", "onnxruntime")


@dataclass(frozen=True)
class QuantizeSpec:
    """What quantization to apply.

    Attributes:
        method: ``dynamic`` (int8 weights and per-call int8 activations), ``weight_only`` (int weights,
            float activations) or ``static`` (int8 weights and activations with calibrated ranges).
        bits: Weight bits, 8 or 4 (4 only for ``weight_only`` on onnxruntime; see :func:`quantize_model`).
        backend: ``torchao`` (a quantized nn.Module) or ``onnxruntime`` (a quantized ONNX graph).
        group_size: Columns per quantization block for 4-bit (and onnxruntime weight-only) weights.
        calibration_samples: Training rows that calibrate ``static`` activation ranges.
    """

    method: str = "dynamic"
    bits: int = 8
    backend: str = "torchao"
    group_size: int = 32
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ConfigError(f"quantize.method {self.method!r} is not one of {', '.join(_METHODS)}")
        if self.bits not in (4, 8):
            raise ConfigError(f"quantize.bits {self.bits} is not 8 or 4")
        if self.backend not in _BACKENDS:
            raise ConfigError(f"quantize.backend {self.backend!r} is not one of {', '.join(_BACKENDS)}")
        if self.method == "none" and self.backend != "onnxruntime":
            raise ConfigError("quantize.method 'none' (an fp32 export) needs quantize.backend 'onnxruntime'")
        if self.bits == 4 and self.method != "weight_only":
            raise ConfigError(f"quantize.bits 4 is for method 'weight_only'; method {self.method!r} is int8 only")
        if self.group_size < 1 or self.calibration_samples < 1:
            raise ConfigError("quantize.group_size and quantize.calibration_samples must be positive")


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return type(module) is nn.Linear


@torch.no_grad()
def _calibrate(model: nn.Module, calibration: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Largest |input| and input rank seen by every Linear layer over the calibration rows."""
    seen: dict[str, tuple[float, int]] = {}

    def observe(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            seen[name] = (max(seen.get(name, (0.0, 0))[0], float(x.detach().abs().max())), x.dim())

        return hook

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in model.named_modules() if _is_linear(m, n)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(calibration), CALIBRATION_BATCH):
            model(calibration[start : start + CALIBRATION_BATCH])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return seen


def quantize_model(model: nn.Module, spec: QuantizeSpec, calibration: torch.Tensor | None = None) -> nn.Module:
    """A torchao-quantized copy of ``model`` (its nn.Linear layers); ``model`` itself is left as it is.

    Args:
        model: The fp32 model.
        spec: The quantization; ``spec.backend`` must be ``torchao``.
        calibration: Input rows (already gathered, on the model's device) for ``static``.

    Raises:
        ConfigError: the onnxruntime backend (use :mod:`gradwise.compress.onnx_runtime`), 4-bit weights
            (torchao 0.18 has no CPU int4 kernel), or ``static`` without calibration rows.

    References:
        Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
        Integer-Arithmetic-Only Inference".
    """
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8StaticActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    if spec.backend != "torchao":
        raise ConfigError("quantize_model is the torchao path; quantize.backend 'onnxruntime' goes through ONNX export")
    if spec.bits == 4:
        # Int4WeightOnlyConfig's packings need CUDA (plain: mslk; tile_packed_to_4d: tinygemm) or XPU/NPU (plain_int32).
        raise ConfigError("quantize.bits 4 has no CPU kernel in torchao 0.18; use backend onnxruntime or bits 8")
    quantized = copy.deepcopy(model)
    if spec.method == "dynamic":
        quantize_(quantized, Int8DynamicActivationInt8WeightConfig(), filter_fn=_is_linear)
    elif spec.method == "weight_only":
        quantize_(quantized, Int8WeightOnlyConfig(), filter_fn=_is_linear)
    else:
        if calibration is None or len(calibration) == 0:
            raise ConfigError("quantize.method 'static' needs calibration rows (quantize.calibration_samples)")
        ranges = _calibrate(quantized, calibration)
        for name, (absmax, rank) in ranges.items():
            # Symmetric per-tensor activation scale; the scale tensor must have the activation's rank.
            scale = torch.full([1] * rank, max(absmax, 1e-8) / 127.0, device=calibration.device)
            config = Int8StaticActivationInt8WeightConfig(act_quant_scale=scale, granularity=[PerTensor(), PerRow()])
            quantize_(quantized, config, filter_fn=lambda m, fqn, name=name: fqn == name and _is_linear(m, fqn))
    return quantized


def _qat_base_config(cfg: QATConfig, model: nn.Module) -> Any:
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    dtype = torch.int8 if cfg.bits == 8 else torch.int4
    # 8-bit weights: one scale per output channel; 4-bit: one per group_size input columns.
    granularity = PerAxis(0) if cfg.bits == 8 else PerGroup(cfg.group_size)
    if cfg.bits == 4:
        for name, module in model.named_modules():
            if _is_linear(module, name) and module.in_features % cfg.group_size:
                raise ConfigError(
                    f"qat.group_size {cfg.group_size} does not divide the {module.in_features} inputs of layer "
                    f"{name!r}; pick a divisor"
                )
    if cfg.method == "dynamic":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def prepare_qat(model: nn.Module, cfg: QATConfig) -> nn.Module:
    """Swap ``model``'s nn.Linear layers in place for torchao fake-quantized ones (before the optimizer is built).

    The state_dict keys do not change (FakeQuantizedLinear keeps ``weight``/``bias`` and its fake
    quantizers hold no state), so checkpoints of a QAT run load into the plain fp32 model.

    References:
        Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
        Integer-Arithmetic-Only Inference".
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as AOQATConfig

    quantize_(model, AOQATConfig(_qat_base_config(cfg, model), step="prepare"), filter_fn=_is_linear)
    return model


def convert_qat(model: nn.Module, cfg: QATConfig) -> nn.Module:
    """Replace the fake-quantized layers by really quantized ones, in place (same numerics as the fake ones).

    Works on a model after :func:`prepare_qat` and also on a fresh fp32 model holding a QAT run's weights.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as AOQATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    base = _qat_base_config(cfg, model)
    if not any(isinstance(m, FakeQuantizedLinear) for m in model.modules()):
        quantize_(model, base, filter_fn=_is_linear)
        return model
    quantize_(model, AOQATConfig(base, step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return model


def write_quantized(run_dir: Path, model: nn.Module, spec: QuantizeSpec) -> dict[str, Any]:
    """Store the quantized model in ``run_dir`` and return the JSON-able record that restores it.

    torchao: the state_dict, tensor subclasses flattened by torchao's safetensors support (qdata,
    scales, zero points as plain tensors; the subclass layout in the header metadata).
    onnxruntime: ``model`` is an :class:`OnnxModule` whose graph file is copied to ``model.onnx``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"backend": spec.backend, "method": spec.method, "bits": spec.bits, "group_size": spec.group_size}
    if spec.backend == "onnxruntime":
        from gradwise.compress.onnx_runtime import OnnxModule

        if not isinstance(model, OnnxModule):
            raise ConfigError("quantize.backend 'onnxruntime' writes an OnnxModule; got a torch model")
        target = run_dir / ONNX_FILE
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.copyfile(model.file, tmp)
        os.replace(tmp, target)
        return {**record, "file": ONNX_FILE}
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    target = run_dir / QUANTIZED_FILE
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, target)
    return {**record, "file": QUANTIZED_FILE}


def restore_quantized(run_dir: Path, model_fp32: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized model written by :func:`write_quantized` from the fp32 structure and the file.

    For torchao the saved quantized tensors are assigned into ``model_fp32`` in place (no re-quantization,
    so outputs are identical to the model that was written); for onnxruntime an :class:`OnnxModule` is returned.

    Raises:
        CheckpointError: the file is missing, corrupt, or does not match the model.
    """
    file = compressed_weight_file(Path(run_dir), record)  # a path read from a run file: confined to the run
    if not file.is_file():
        raise CheckpointError(f"{file}: quantized model file is missing")
    if record.get("backend") == "onnxruntime":
        from gradwise.compress.onnx_runtime import OnnxModule

        return OnnxModule(file)
    if record.get("backend") != "torchao":
        raise CheckpointError(f"{file}: unknown quantization backend {record.get('backend')!r}")
    from safetensors import SafetensorError, safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    device = next(model_fp32.parameters()).device
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a quantized safetensors file ({exc})") from None
    if leftover:
        raise CheckpointError(f"{file}: tensors {sorted(leftover)[:3]} are not described by the file's metadata")
    try:
        model_fp32.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: does not match the model ({str(exc).splitlines()[-1].strip()})") from None
    return model_fp32


def _prepare_run_for_qat(cfg: RunConfig, model: nn.Module) -> None:
    prepare_qat(model, cfg.qat)


# The `qat:` section of a training config, registered as a strategy (pyproject entry point).
QAT_STRATEGY = RunStrategy(section="qat", prepare_model=_prepare_run_for_qat)
